"""Block-sparse flash attention: kernels (interpret mode) vs reference, schedule, lowering, errors.

Speed: each (impl, case) is compiled ONCE (fixed shapes, masks/segment ids/values are array
inputs drawn by hypothesis), with XLA's backend optimisation off (the interpret-mode kernels are
big while loops; -O0 halves compile time and the shapes are tiny).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_jax.testing import assert_close
from pallas_kernels.block_sparse_attention import (
    attention_mask,
    block_sparse_attention,
    build_block_schedule,
    count_visited_blocks,
    reference_attention,
)


pytestmark = pytest.mark.fast_xla  # tiny programs compared with each other: see tests/conftest.py
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)
FAST_COMPILE = {"xla_backend_optimization_level": 0}
MASK_KINDS = ("random", "all", "none", "single", "prefix", "blocks")


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    tq: int
    tk: int
    h: int
    hkv: int
    d: int
    block_q: int
    block_k: int
    causal: bool
    window: int
    segments: str | None  # None, "shared" ([B, T] array) or "pair" ((q_ids, kv_ids) tuple)
    dtype: str


CASES = {
    # GQA 4:2, causal, no window, ragged (40 = 2.5 blocks of 16).
    "gqa_causal_ragged": Case(2, 40, 40, 4, 2, 8, 16, 16, True, 0, None, "float32"),
    # Tq != Tk (end-aligned), non-causal + window, cross segment ids, block_q != block_k.
    "cross_window_segments": Case(1, 24, 56, 2, 1, 16, 16, 32, False, 5, "pair", "float32"),
    # bfloat16, MHA, causal + window, packed documents (shared segment ids), ragged.
    "bf16_window_packed": Case(2, 40, 40, 2, 2, 16, 32, 16, True, 6, "shared", "bfloat16"),
}
KERNELS = ("pallas_tpu", "pallas_gpu")


def _segments(case: Case, q_seg, kv_seg):
    return {None: None, "shared": q_seg, "pair": (q_seg, kv_seg)}[case.segments]


@functools.lru_cache(maxsize=None)
def _compiled(impl: str, case: Case):
    """(kernel out, dq, dk, dv), (reference out, dq, dk, dv); one compile per (impl, case)."""

    def run(q, k, v, k_ref, v_ref, do, q_mask, kv_mask, q_seg, kv_seg):
        kw = dict(q_mask=q_mask, kv_mask=kv_mask, causal=case.causal, window=case.window,
                  segment_ids=_segments(case, q_seg, kv_seg))
        f = lambda q, k, v: block_sparse_attention(  # noqa: E731
            q, k, v, impl=impl, block_q=case.block_q, block_k=case.block_k, **kw)
        r = lambda q, k, v: reference_attention(q, k, v, **kw)  # noqa: E731
        out, f_vjp = jax.vjp(f, q, k, v)
        ref, r_vjp = jax.vjp(r, q, k_ref, v_ref)
        return (out, *f_vjp(do)), (ref, *r_vjp(do))

    dt = jnp.dtype(case.dtype)
    S = jax.ShapeDtypeStruct
    qs, ks = S((case.b, case.tq, case.h, case.d), dt), S((case.b, case.tk, case.hkv, case.d), dt)
    specs = (qs, ks, ks, ks, ks, qs, S((case.b, case.tq), bool), S((case.b, case.tk), bool),
             S((case.b, case.tq), jnp.int32), S((case.b, case.tk), jnp.int32))
    return jax.jit(run).lower(*specs).compile(compiler_options=FAST_COMPILE)


def _mask(rng, kind: str, b: int, t: int, block: int) -> np.ndarray:
    if kind == "random":
        return rng.random((b, t)) < rng.uniform(0.1, 0.9)
    if kind == "all":
        return np.ones((b, t), bool)
    if kind == "none":  # all rows masked (for kv: only the window keeps anything)
        return np.zeros((b, t), bool)
    if kind == "single":  # a single valid token per row
        m = np.zeros((b, t), bool)
        m[np.arange(b), rng.integers(0, t, b)] = True
        return m
    if kind == "prefix":  # ragged lengths, batch-dependent
        return np.arange(t)[None] < rng.integers(0, t + 1, (b, 1))
    # "blocks": whole blocks kept or dropped -> empty and full tiles
    keep = rng.random((b, -(-t // block))) < 0.5
    return np.repeat(keep, block, axis=1)[:, :t]


def _inputs(case: Case, seed: int, q_kind: str, kv_kind: str):
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(case.dtype)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dt)  # noqa: E731
    q, do = normal(case.b, case.tq, case.h, case.d), normal(case.b, case.tq, case.h, case.d)
    k, v = normal(case.b, case.tk, case.hkv, case.d), normal(case.b, case.tk, case.hkv, case.d)
    q_mask = _mask(rng, q_kind, case.b, case.tq, case.block_q)
    kv_mask = _mask(rng, kv_kind, case.b, case.tk, case.block_k)
    q_seg = np.sort(rng.integers(0, 3, (case.b, case.tq)), axis=1).astype(np.int32)
    kv_seg = q_seg if case.segments == "shared" else np.sort(rng.integers(0, 3, (case.b, case.tk)), axis=1)
    return q, k, v, do, q_mask, kv_mask, q_seg, kv_seg.astype(np.int32)


def _check(impl: str, case: Case, q, k, v, do, q_mask, kv_mask, q_seg, kv_seg, k_in=None, v_in=None):
    k_in = k if k_in is None else k_in
    v_in = v if v_in is None else v_in
    got, want = _compiled(impl, case)(q, k_in, v_in, k, v, do, q_mask, kv_mask, q_seg, kv_seg)
    assert got[0].dtype == q.dtype and got[0].shape == q.shape
    assert_close(got[0], want[0], dtype=case.dtype, kind="forward")
    assert_close(got[1:], want[1:], dtype=case.dtype, kind="grad")


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("impl", KERNELS + ("xla",))
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), q_kind=st.sampled_from(MASK_KINDS), kv_kind=st.sampled_from(MASK_KINDS))
def test_matches_reference(impl, case_name, seed, q_kind, kv_kind):
    """Forward + dq/dk/dv vs reference over random masks (f32/bf16, GQA, ragged, window, segs)."""
    case = CASES[case_name]
    _check(impl, case, *_inputs(case, seed, q_kind, kv_kind))


@pytest.mark.parametrize("impl", KERNELS)
def test_pruned_blocks_are_never_read(impl):
    """NaN-poison K/V in a key block nobody can see: a kernel that touched it would emit NaN."""
    case = CASES["gqa_causal_ragged"]
    q, k, v, do, q_mask, _, q_seg, kv_seg = _inputs(case, 0, "random", "all")
    kv_mask = np.ones((case.b, case.tk), bool)
    kv_mask[:, 16:32] = False  # key block 1 (block_k=16) is empty for every query block
    poison = jnp.zeros_like(k).at[:, 16:32].set(jnp.nan)
    _check(impl, case, q, k, v, do, q_mask, kv_mask, q_seg, kv_seg, k_in=k + poison, v_in=v + poison)


def _uses_kernel(d: int, block: int, **kw) -> bool:
    q, k = jnp.ones((1, 32, 2, d)), jnp.ones((1, 32, 1, d))
    fn = lambda q, k: block_sparse_attention(q, k, k, block_q=block, block_k=block, **kw)  # noqa: E731
    return "pallas_call" in str(jax.make_jaxpr(fn)(q, k))  # tracing only, nothing compiles


def test_impl_dispatch(monkeypatch):
    """CPU: auto -> xla, pallas -> interpreted kernel. GPU: auto -> kernel unless untileable."""
    assert not _uses_kernel(8, 8, impl="auto") and not _uses_kernel(8, 8, impl="reference")
    assert not _uses_kernel(8, 8, impl="xla")
    assert _uses_kernel(8, 8, impl="pallas") and _uses_kernel(8, 8, impl="pallas_gpu")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _uses_kernel(16, 16, impl="auto", interpret=False)
    assert not _uses_kernel(8, 16, impl="auto", interpret=False)  # head_dim 8: Triton can't tile
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        _uses_kernel(8, 16, impl="pallas", interpret=False)


# ----------------------------------------------------------------------------- schedule
def _blocks(t, block, valid):
    m = np.zeros((1, -(-t // block) * block), bool)
    m[0, :t] = valid
    return jnp.asarray(m[:, :t])


@pytest.mark.parametrize(
    "name, tq, tk, q_valid, kv_valid, kw, visited, full",
    [
        ("causal 4x4", 64, 64, slice(None), slice(None), dict(causal=True), 10, 6),
        ("dense 4x4", 64, 64, slice(None), slice(None), dict(causal=False), 16, 16),
        ("kv only first block", 64, 64, slice(None), slice(0, 16), dict(causal=False), 4, 4),
        ("causal, kv first block", 64, 64, slice(None), slice(0, 16), dict(causal=True), 4, 3),
        ("causal, q last block", 64, 64, slice(48, 64), slice(None), dict(causal=True), 4, 3),
        ("all masked", 64, 64, slice(0, 0), slice(None), dict(causal=True), 0, 0),
        ("window 16, kv all pruned", 64, 64, slice(None), slice(0, 0), dict(causal=True, window=16), 7, 0),
        ("end-aligned Tq=32 Tk=64", 32, 64, slice(None), slice(None), dict(causal=True), 7, 5),
        ("ragged 40 (padding is partial)", 40, 40, slice(None), slice(None), dict(causal=False), 9, 4),
    ],
)
def test_schedule_counts(name, tq, tk, q_valid, kv_valid, kw, visited, full):
    q_mask = np.zeros((1, tq), bool)
    q_mask[0, q_valid] = True
    kv_mask = np.zeros((1, tk), bool)
    kv_mask[0, kv_valid] = True
    sched = build_block_schedule(jnp.asarray(q_mask), jnp.asarray(kv_mask), block_q=16, block_k=16, **kw)
    assert int(sched.visited_blocks()[0]) == visited, name
    assert int(sched.full_blocks()[0]) == full, name
    counted = count_visited_blocks(jnp.asarray(q_mask), jnp.asarray(kv_mask), block_q=16, block_k=16, **kw)
    assert int(counted[0]) == visited
    assert int(sched.q_count.sum()) == visited  # transposed schedule visits the same tiles


def test_schedule_segments_block_diagonal():
    seg = jnp.asarray(np.repeat(np.arange(2), 32)[None].astype(np.int32))  # two 32-token documents
    ones = jnp.ones((1, 64), bool)
    sched = build_block_schedule(ones, ones, causal=False, segment_ids=seg, block_q=16, block_k=16)
    assert int(sched.visited_blocks()[0]) == 8 and int(sched.full_blocks()[0]) == 8


@functools.lru_cache(maxsize=None)
def _schedule_fn(case: Case):
    def run(q_mask, kv_mask, q_seg, kv_seg):
        kw = dict(causal=case.causal, window=case.window, segment_ids=_segments(case, q_seg, kv_seg))
        sched = build_block_schedule(q_mask, kv_mask, block_q=case.block_q, block_k=case.block_k, **kw)
        dense = attention_mask(case.b, case.tq, case.tk, q_mask=q_mask, kv_mask=kv_mask, **kw)
        return sched, dense

    return jax.jit(run)


@pytest.mark.parametrize("case_name", list(CASES))
@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), q_kind=st.sampled_from(MASK_KINDS), kv_kind=st.sampled_from(MASK_KINDS))
def test_schedule_is_exact(case_name, seed, q_kind, kv_kind):
    """Listed tiles == tiles with >= 1 visible pair (no empty tile visited, none missed)."""
    case = CASES[case_name]
    *_, q_mask, kv_mask, q_seg, kv_seg = _inputs(case, seed, q_kind, kv_kind)
    sched, dense = jax.tree.map(np.asarray, _schedule_fn(case)(q_mask, kv_mask, q_seg, kv_seg))
    nq, nk = -(-case.tq // case.block_q), -(-case.tk // case.block_k)
    padded = np.zeros((case.b, nq * case.block_q, nk * case.block_k), bool)
    padded[:, : case.tq, : case.tk] = dense
    tiles = padded.reshape(case.b, nq, case.block_q, nk, case.block_k)
    nonempty, full = tiles.any(axis=(2, 4)), tiles.all(axis=(2, 4))
    for index, is_full, count, ne, fl in (
        (sched.kv_index, sched.kv_full, sched.kv_count, nonempty, full),
        (sched.q_index, sched.q_full, sched.q_count, nonempty.transpose(0, 2, 1), full.transpose(0, 2, 1)),
    ):
        for b in range(case.b):
            for r in range(ne.shape[1]):
                n = count[b, r]
                listed = index[b, r, :n]
                np.testing.assert_array_equal(listed, np.flatnonzero(ne[b, r]))  # ascending, exact
                np.testing.assert_array_equal(is_full[b, r, :n], fl[b, r, listed])
                assert not is_full[b, r, n:].any()
                if n:  # padding repeats the last listed block (no extra DMA on TPU)
                    assert (index[b, r, n:] == listed[-1]).all()


# ----------------------------------------------------------------------------- lowering
def _export_grad_fn(impl: str, dtype, platform: str, **export_kw):
    b, t, h, hkv, d = 1, 300, 4, 2, 64  # ragged: 300 -> padded to blocks (nq, nk not powers of 2)

    def loss(q, k, v, q_mask, kv_mask):
        out = block_sparse_attention(q, k, v, q_mask=q_mask, kv_mask=kv_mask, causal=True, window=32,
                                     impl=impl, interpret=False,
                                     block_q=64 if impl == "pallas_gpu" else 128, block_k=128)
        return jnp.sum(out.astype(jnp.float32))

    S = jax.ShapeDtypeStruct
    specs = (S((b, t, h, d), dtype), S((b, t, hkv, d), dtype), S((b, t, hkv, d), dtype),
             S((b, t), bool), S((b, t), bool))
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return jax.export.export(fn, platforms=(platform,), **export_kw)(*specs).mlir_module()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_kernels_lower_for_tpu(dtype):
    """Forward, dq and dk/dv Mosaic kernels lower for TPU on this CPU-only machine."""
    module = _export_grad_fn("pallas_tpu", dtype, "tpu")
    assert module.count("tpu_custom_call") == 3


def test_gpu_kernels_lower_for_cuda():
    """Forward, dq and dk/dv lower for CUDA through the Triton backend (Pallas -> TTIR here;
    PTX is produced by XLA on a GPU). Triton custom calls carry no serialization-compatibility
    guarantee, so jax.export needs that safety check disabled explicitly."""
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    module = _export_grad_fn("pallas_gpu", jnp.bfloat16, "cuda", disabled_checks=checks)
    assert module.count("gpu.triton") == 3


# ----------------------------------------------------------------------------- bad input
_Q, _K = (2, 24, 4, 8), (2, 24, 2, 8)


@pytest.mark.parametrize(
    "q_shape, k_shape, kw, match",
    [
        (_Q, (2, 24, 3, 8), {}, "H=4 .* multiple of H_kv=3"),
        (_Q, (2, 24, 2, 16), {}, "head_dim mismatch"),
        ((2, 24, 4), _K, {}, r"q must have shape \[B, Tq, H, D\]"),
        (_Q, (3, 24, 2, 8), {}, "batch size mismatch"),
        (_Q, _K, dict(q_mask=np.ones((2, 23), bool)), r"q_mask must have shape \[2, 24\]"),
        (_Q, _K, dict(kv_mask=np.ones((24,), bool)), r"kv_mask must have shape \[2, 24\]"),
        (_Q, _K, dict(segment_ids=np.zeros((2, 20), np.int32)), r"segment_ids must have shape \[2, 24\]"),
        (_Q, (2, 16, 2, 8), dict(segment_ids=np.zeros((2, 24), np.int32)), "needs Tq == Tk"),
        (_Q, _K, dict(impl="cuda"), "impl must be one of"),
        (_Q, _K, dict(window=-1), "window must be an int >= 0"),
        (_Q, _K, dict(block_q=0), "block_q must be a positive int"),
        (_Q, _K, dict(impl="pallas_tpu", interpret=False, block_k=64), "block_k must be a multiple of 128"),
        (_Q, _K, dict(impl="pallas_tpu", interpret=False, block_q=12, block_k=128), "block_q must be a multiple of 8"),
        (_Q, _K, dict(impl="pallas_gpu", interpret=False, block_q=48), "block_q must be a power of two"),
        (_Q, _K, dict(impl="pallas_gpu", interpret=False, block_q=16, block_k=16), "head_dim must be a power of two"),
    ],
)
@pytest.mark.usefixtures("unchecked")  # the kernel's own messages, which the type checker would pre-empt
def test_bad_input_raises(q_shape, k_shape, kw, match):
    q, k = jnp.zeros(q_shape), jnp.zeros(k_shape)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, k, **kw)
