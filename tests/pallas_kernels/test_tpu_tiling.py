"""The TPU block-size rule (pallas_kernels/tpu_tiling.py): its outputs satisfy Mosaic's tiling
constraints and the VMEM budget, the kernels take them by default, still lower for TPU, and match
the references in interpret mode with the rule's blocks."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import pytest

from ling_jax.testing import assert_close
from pallas_kernels import tpu_tiling
from pallas_kernels.block_sparse_attention import api as attn_api
from pallas_kernels.block_sparse_attention import block_sparse_attention, reference_attention
from pallas_kernels.grouped_matmul import api as gmm_api
from pallas_kernels.grouped_matmul import gmm
from pallas_kernels.grouped_matmul.reference import gmm_loop

DTYPES = (jnp.float32, jnp.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_attention_rule_satisfies_tpu_constraints(dtype):
    for b, tq, tk, d in itertools.product((1, 4, 64), (1, 40, 300, 2048, 8192, 32768, 131072),
                                          (128, 4096, 32768), (64, 128, 256)):
        bq, bk = tpu_tiling.attention_blocks(b, tq, tk, d, dtype)
        assert bk % 128 == 0 and bq % tpu_tiling.sublanes(dtype) == 0, (b, tq, tk, d, bq, bk)
        assert bq <= max(tpu_tiling._round_up(tq, 16), 16) and bk <= tpu_tiling._round_up(tk, 128)
        assert tpu_tiling.attention_vmem_bytes(bq, bk, d, dtype) <= tpu_tiling.VMEM_BUDGET
        entries = b * -(-tq // bq) * -(-tk // bk)
        assert entries <= tpu_tiling.SMEM_BUDGET_ENTRIES or max(bq, bk) >= tpu_tiling.MAX_BLOCK // 2
    # The shape sets the starting size: fine blocks for short sequences, large for long ones.
    assert tpu_tiling.attention_blocks(4, 1024, 1024, 128, dtype) == (128, 128)
    assert tpu_tiling.attention_blocks(4, 4096, 4096, 128, dtype) == (256, 256)
    assert tpu_tiling.attention_blocks(4, 32768, 32768, 128, dtype) == (512, 512)
    with pytest.raises(ValueError, match="seq_q"):
        tpu_tiling.attention_blocks(1, 0, 128, 64, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_gmm_rule_satisfies_tpu_constraints(dtype):
    for m, k, n, g in itertools.product((8, 512, 8192, 262144), (64, 256, 2048, 8192), (96, 512, 4096, 14336),
                                        (1, 8, 64, 256)):
        tm, tk, tn = tpu_tiling.gmm_tiling(m, k, n, g, dtype)
        assert tm % tpu_tiling.sublanes(dtype) == 0 and tm <= max(tpu_tiling._round_up(m, 16), 16)
        assert (tk % 128 == 0 or tk == k) and (tn % 128 == 0 or tn == n), (m, k, n, g, tm, tk, tn)
        assert tpu_tiling.gmm_vmem_bytes(tm, tk, tn, dtype) <= tpu_tiling.VMEM_BUDGET
    assert tpu_tiling.gmm_tiling(8192, 2048, 1024, 16, dtype) == (256, 512, 256)
    assert tpu_tiling.gmm_tiling(8192, 256, 256, 64, dtype)[0] == 128  # 128 rows per group
    with pytest.raises(ValueError, match="num_groups"):
        tpu_tiling.gmm_tiling(8, 8, 8, 0, dtype)


def test_kernels_lower_for_tpu_with_rule_blocks():
    """Default (None) blocks on the TPU kernels: the rule's sizes, and fwd + bwd lower via Mosaic."""
    b, t, h, hkv, d = 2, 4096, 4, 2, 128  # rule: (256, 256)
    S = jax.ShapeDtypeStruct

    def attn_loss(q, k, v, kv_mask):
        out = block_sparse_attention(q, k, v, kv_mask=kv_mask, impl="pallas_tpu", interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    specs = (S((b, t, h, d), jnp.bfloat16), S((b, t, hkv, d), jnp.bfloat16), S((b, t, hkv, d), jnp.bfloat16),
             S((b, t), bool))
    fn = jax.jit(jax.value_and_grad(attn_loss, argnums=(0, 1, 2)))
    text = jax.export.export(fn, platforms=("tpu",))(*specs).mlir_module()
    assert text.count("tpu_custom_call") == 3

    def gmm_loss(lhs, rhs, sizes):
        out = gmm(lhs, rhs, sizes, impl="pallas", kernel_backend="tpu", interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    specs = (S((8192, 1024), jnp.bfloat16), S((16, 1024, 512), jnp.bfloat16), S((16,), jnp.int32))
    fn = jax.jit(jax.value_and_grad(gmm_loss, argnums=(0, 1)))
    assert jax.export.export(fn, platforms=("tpu",))(*specs).mlir_module().count("tpu_custom_call") == 3


def test_attention_with_rule_blocks_matches_reference_interpret(monkeypatch):
    """T = 2048: the rule picks 256-blocks; forward and gradients match the reference."""
    chosen = []
    rule = attn_api.attention_blocks
    monkeypatch.setattr(attn_api, "attention_blocks", lambda *a: chosen.append(rule(*a)) or chosen[-1])
    b, t, h, hkv, d = 1, 2048, 2, 1, 16
    kq, kk, kv, km = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (b, t, h, d))
    k, v = jax.random.normal(kk, (b, t, hkv, d)), jax.random.normal(kv, (b, t, hkv, d))
    kv_mask = jax.random.bernoulli(km, 0.3, (b, t)) & (jnp.arange(t) < 1500)  # whole blocks skipped

    def loss(impl):
        def f(q, k, v):
            out = (block_sparse_attention(q, k, v, kv_mask=kv_mask, window=64, impl="pallas", interpret=True)
                   if impl == "pallas" else reference_attention(q, k, v, kv_mask=kv_mask, window=64))
            return jnp.sum(out * jnp.cos(jnp.arange(d, dtype=jnp.float32))), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, out), grads = loss("pallas")
    assert chosen == [(256, 256)]
    (_, out_ref), grads_ref = loss("reference")
    assert_close(out, out_ref)
    assert_close(grads, grads_ref, kind="grad")


def test_gmm_with_rule_tiling_matches_reference_interpret(monkeypatch):
    chosen = []
    rule = gmm_api.gmm_tiling
    monkeypatch.setattr(gmm_api, "gmm_tiling", lambda *a: chosen.append(rule(*a)) or chosen[-1])
    m, k, n, g = 2048, 256, 512, 4  # 512 rows per group: tm 256
    kl, kr = jax.random.split(jax.random.key(1))
    lhs, rhs = jax.random.normal(kl, (m, k)), jax.random.normal(kr, (g, k, n)) * k**-0.5
    sizes = jnp.array([700, 0, 1000, 300], jnp.int32)
    out = gmm(lhs, rhs, sizes, impl="pallas", kernel_backend="tpu", interpret=True)
    assert chosen and chosen[0] == (256, 128, 256)
    assert_close(out, gmm_loop(lhs, rhs, sizes))
    grad = lambda f: jax.grad(lambda a, b: jnp.sum(jnp.sin(f(a, b))), argnums=(0, 1))(lhs, rhs)  # noqa: E731
    assert_close(grad(lambda a, b: gmm(a, b, sizes, impl="pallas", kernel_backend="tpu", interpret=True)),
                 grad(lambda a, b: gmm_loop(a, b, sizes)), kind="grad")
