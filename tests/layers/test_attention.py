"""The xla attention path against the plain-jnp reference: forward and gradients, with grouped KV
heads, a soft-pruning bias, hard keeps, padding and a fully masked query row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.layers.attention import AttentionMask, dpa_attention, reference_attention, xla_attention
from ling_jax.testing import assert_close

pytestmark = pytest.mark.fast_xla  # tiny programs compared with each other: see tests/conftest.py

B, T, H, HKV, D = 2, 24, 4, 2, 8


def _inputs(seed: int):
    kq, kk, kv, kb, kkeep = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(kq, (B, T, H, D))
    k = jax.random.normal(kk, (B, T, HKV, D))
    v = jax.random.normal(kv, (B, T, HKV, D))
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    valid = jnp.arange(T)[None, :] >= jnp.array([[0], [5]])  # second row left-padded: rows 0..4 see nothing
    mask = AttentionMask.causal_self(positions, valid).replace(num_sinks=1, window=3)
    return q, k, v, mask, jax.random.normal(kb, (B, T)), jax.random.bernoulli(kkeep, 0.5, (B, T))


@pytest.mark.parametrize("fast", [xla_attention, dpa_attention], ids=["head_major", "dot_product_attention"])
@pytest.mark.parametrize("variant", ["causal", "soft_bias", "hard_keep"])
def test_xla_attention_matches_reference_forward_and_grad(variant, fast):
    q, k, v, mask, scores, keep = _inputs(0)
    if variant == "soft_bias":
        mask = mask.replace(kv_log_keep=jax.nn.log_sigmoid(scores))
    elif variant == "hard_keep":
        mask = mask.replace(kv_keep=keep)
    dense, bias = mask.dense()
    assert not bool(jnp.all(jnp.any(dense, -1)))  # the padded rows are fully masked
    out_x = jax.jit(fast)(q, k, v, dense, bias)
    out_r = reference_attention(q, k, v, dense, bias)
    assert np.isfinite(np.asarray(out_x)).all()
    assert_close(out_x, out_r)
    cot = jax.random.normal(jax.random.key(9), out_r.shape)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, dense, bias) * cot)  # noqa: E731
    grads_x = jax.jit(jax.grad(loss(fast), argnums=(0, 1, 2)))(q, k, v)
    grads_r = jax.grad(loss(reference_attention), argnums=(0, 1, 2))(q, k, v)
    assert_close(grads_x, grads_r, kind="grad")
    assert float(jnp.max(jnp.abs(grads_x[0][1, :5]))) == 0.0  # masked queries get no gradient
