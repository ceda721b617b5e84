"""Grouped matmul (`pallas_kernels.grouped_matmul`): every impl vs the references, fwd + grads.

Pallas kernels run in interpret mode on CPU. Shapes are fixed per dtype and group sizes are
array data, so one compile serves all hypothesis examples of a configuration.
"""

from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from jax.sharding import Mesh, PartitionSpec as P

from ling_jax.testing import assert_close
from pallas_kernels.grouped_matmul import gmm, tgmm
from pallas_kernels.grouped_matmul import reference as ref
from pallas_kernels.grouped_matmul import tpu
from pallas_kernels.grouped_matmul.metadata import make_group_metadata, max_grid_steps

pytestmark = pytest.mark.fast_xla  # tiny programs compared with each other: see tests/conftest.py

SETTINGS = settings(
    max_examples=10, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# (impl, kernel_backend): every implementation behind the public `gmm`.
IMPLS = [("reference", None), ("xla", None), ("pallas", "tpu"), ("pallas", "gpu")]
IMPL_IDS = ["reference", "xla", "pallas-tpu", "pallas-gpu"]
# Per dtype one shape: (m, k, n, G, tiling). f32: m=90 is not a multiple of tm=16.
SHAPES = {
    jnp.float32: (90, 32, 16, 6, (16, 16, 8)),
    jnp.bfloat16: (64, 16, 32, 4, (8, 8, 16)),
}


# --------------------------------------------------------------------------- helpers


@st.composite
def group_sizes_st(draw, m: int, num_groups: int):
    """Sizes with zeros, a single non-empty group, and sums equal to or below m."""
    kind = draw(st.sampled_from(["full", "short", "single"]))
    if kind == "single":
        sizes = np.zeros(num_groups, np.int32)
        sizes[draw(st.integers(0, num_groups - 1))] = draw(st.integers(1, m))
        return sizes
    total = m if kind == "full" else draw(st.integers(0, m - 1))
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=num_groups - 1, max_size=num_groups - 1)))
    return np.diff(np.array([0, *cuts, total])).astype(np.int32)


def _inputs(seed, m, k, n, num_groups, dtype, transpose_rhs=False):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    rhs_shape = (num_groups, n, k) if transpose_rhs else (num_groups, k, n)
    lhs = jax.random.normal(k1, (m, k), jnp.float32).astype(dtype)
    rhs = jax.random.normal(k2, rhs_shape, jnp.float32).astype(dtype)
    cot = jax.random.normal(k3, (m, n), jnp.float32).astype(dtype)
    return lhs, rhs, cot


def _fwd_and_grads(fn, lhs, rhs, cot):
    out, vjp = jax.vjp(fn, lhs, rhs)
    return (out, *vjp(cot))


def _impl_fn(impl, kernel_backend, tiling, transpose_rhs=False):
    """jit(out, d lhs, d rhs) of the public gmm; group sizes / offset are traced data."""
    return _impl_fn_cached(impl, kernel_backend, tiling, transpose_rhs)  # one cache key per config


@functools.cache
def _impl_fn_cached(impl, kernel_backend, tiling, transpose_rhs):

    def f(lhs, rhs, sizes, cot, offset):
        fn = lambda a, b: gmm(a, b, sizes, impl=impl, kernel_backend=kernel_backend, tiling=tiling,
                              transpose_rhs=transpose_rhs, group_offset=offset)
        return _fwd_and_grads(fn, lhs, rhs, cot)

    return jax.jit(f)


def _ref_fn(transpose_rhs=False):
    """Ground truth: autodiff through the per-group loop (independent of tgmm)."""
    return _ref_fn_cached(transpose_rhs)


@functools.cache
def _ref_fn_cached(transpose_rhs):

    def f(lhs, rhs, sizes, cot, offset):
        fn = lambda a, b: ref.gmm_loop(a, b, sizes, transpose_rhs=transpose_rhs, group_offset=offset)
        return _fwd_and_grads(fn, lhs, rhs, cot)

    return jax.jit(f)


def _check_against_reference(impl, kb, dtype, sizes, seed, *, shape=None, transpose_rhs=False):
    m, k, n, num_groups, tiling = shape or SHAPES[dtype]
    lhs, rhs, cot = _inputs(seed, m, k, n, num_groups, dtype, transpose_rhs)
    sizes = jnp.asarray(sizes, jnp.int32)
    got = _impl_fn(impl, kb, tiling, transpose_rhs)(lhs, rhs, sizes, cot, 0)
    want = _ref_fn(transpose_rhs)(lhs, rhs, sizes, cot, 0)
    assert got[0].shape == (m, n) and got[0].dtype == jnp.dtype(dtype)
    assert got[2].shape == rhs.shape and got[2].dtype == rhs.dtype
    assert_close(got[0], want[0], dtype=dtype, kind="forward")
    assert_close(got[1:], want[1:], dtype=dtype, kind="grad")
    rows = jnp.arange(m) >= int(np.sum(sizes))  # rows past sum(group_sizes): exactly zero
    assert not np.any(np.asarray(got[0])[np.asarray(rows)])


# --------------------------------------------------------------------------- correctness


@settings(SETTINGS, max_examples=8)
@given(data=st.data())
def test_references_agree(data):
    """Per-group loop == ragged_dot (fwd and tgmm), and tgmm_loop == autodiff d rhs."""
    m, k, n, num_groups, _ = SHAPES[jnp.float32]
    sizes = jnp.asarray(data.draw(group_sizes_st(m, num_groups)))
    lhs, rhs, cot = _inputs(data.draw(st.integers(0, 3)), m, k, n, num_groups, jnp.float32)
    out, d_lhs, d_rhs = _ref_fn()(lhs, rhs, sizes, cot, 0)
    assert_close(jax.jit(ref.gmm_ragged_dot)(lhs, rhs, sizes), out, dtype=jnp.float32)
    t_loop = jax.jit(ref.tgmm_loop)(lhs, cot, sizes)
    assert_close(t_loop, d_rhs, dtype=jnp.float32, kind="grad")
    assert_close(jax.jit(ref.tgmm_ragged_dot)(lhs, cot, sizes), t_loop, dtype=jnp.float32, kind="grad")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("impl,kb", IMPLS, ids=IMPL_IDS)
@SETTINGS
@given(data=st.data())
def test_gmm_matches_reference(impl, kb, dtype, data):
    """Forward, d lhs and d rhs of every impl vs autodiff of the per-group loop."""
    m, _, _, num_groups, _ = SHAPES[dtype]
    sizes = data.draw(group_sizes_st(m, num_groups), label="group_sizes")
    _check_against_reference(impl, kb, dtype, sizes, data.draw(st.integers(0, 3), label="seed"))


EDGE_SIZES = {
    "all_empty": [0, 0, 0, 0, 0, 0],
    "one_group_all_rows": [0, 0, 90, 0, 0, 0],
    "first_group_only": [7, 0, 0, 0, 0, 0],
    "last_group_only": [0, 0, 0, 0, 0, 90],
    "odd_sizes": [1, 15, 17, 0, 33, 23],
    "short": [3, 0, 0, 5, 0, 1],
}


@pytest.mark.parametrize("case", list(EDGE_SIZES))
@pytest.mark.parametrize("impl,kb", IMPLS, ids=IMPL_IDS)
def test_gmm_edge_cases(impl, kb, case):
    _check_against_reference(impl, kb, jnp.float32, EDGE_SIZES[case], seed=0)


@pytest.mark.parametrize("impl,kb", IMPLS, ids=IMPL_IDS)
def test_transpose_rhs(impl, kb):
    """rhs given as [G, n, k]; d rhs comes back in the same layout."""
    for sizes in ([10, 0, 20, 30, 0, 25], [0, 0, 0, 41, 0, 0]):
        _check_against_reference(impl, kb, jnp.float32, sizes, seed=1, transpose_rhs=True)


@pytest.mark.parametrize("impl,kb", [("pallas", "tpu"), ("pallas", "gpu")], ids=["tpu", "gpu"])
def test_k_n_not_tile_multiples(impl, kb):
    """k=24, n=20 with 16-wide tiles: operands are zero-padded to tile multiples."""
    shape = (40, 24, 20, 3, (16, 16, 16))
    _check_against_reference(impl, kb, jnp.float32, [13, 0, 20], seed=2, shape=shape)


@pytest.mark.parametrize("tiling", [(128, 128, 64), (128, 64, 128)], ids=["128x128x64", "128x64x128"])
def test_gpu_kernel_wide_tiles_interpret(tiling):
    """The wider Triton tilings the GPU check sweeps (8 warps / 2-3 stages by the rule): forward,
    d lhs and d rhs in interpret mode vs the reference, groups straddling the 128-row tiles."""
    shape = (300, 160, 144, 4, tiling)
    _check_against_reference("pallas", "gpu", jnp.float32, [130, 0, 101, 60], seed=3, shape=shape)


def test_gpu_compiler_params_rule():
    from pallas_kernels.grouped_matmul.gpu import SHARED_MEMORY_BUDGET, compiler_params_for

    for tiling in [(16, 16, 16), (64, 64, 64), (128, 128, 64), (128, 64, 128), (128, 128, 128), (256, 128, 128)]:
        for itemsize in (2, 4):
            warps, stages = compiler_params_for(tiling, itemsize)
            tm, tk, tn = tiling
            assert warps in (4, 8) and 1 <= stages <= 4
            assert stages == 1 or stages * (tm * tk + max(tk * tn, tm * tn)) * itemsize <= SHARED_MEMORY_BUDGET
    assert compiler_params_for((128, 64, 128), 2) == (8, 3)
    assert compiler_params_for((64, 64, 64), 2) == (4, 4)


@pytest.mark.parametrize("impl,kb", IMPLS, ids=IMPL_IDS)
def test_tgmm_public(impl, kb):
    """Public tgmm on two shards of 3 groups vs the loop reference; empty groups give zeros.
    (tgmm over all groups is exercised as the d rhs of every gmm gradient test.)"""
    m, k, n, num_groups, tiling = SHAPES[jnp.float32]
    lhs, _, grad = _inputs(3, m, k, n, num_groups, jnp.float32)
    sizes = jnp.array([11, 0, 30, 17, 0, 20], jnp.int32)
    f = jax.jit(lambda a, b, s, off: tgmm(a, b, s, impl=impl, kernel_backend=kb, tiling=tiling,
                                          group_offset=off, num_local_groups=3))
    for off in (0, 3):
        got = f(lhs, grad, sizes, off)
        want = ref.tgmm_loop(lhs, grad, sizes, group_offset=off, num_local_groups=3)
        assert got.shape == (3, k, n)
        assert_close(got, want, dtype=jnp.float32, kind="grad")
        assert not np.any(np.asarray(got[1]))  # groups 1 and 4 are empty


def test_tpu_static_grid_fallback():
    """The TPU kernels with the static grid bound (surplus steps guarded out) match too."""
    m, k, n, num_groups, tiling = SHAPES[jnp.float32]
    lhs, rhs, grad = _inputs(8, m, k, n, num_groups, jnp.float32)
    kw = dict(tiling=tiling, out_dtype=jnp.float32, interpret=True, static_grid=True)
    fwd = jax.jit(lambda a, b, s: tpu.gmm_tpu(a, b, s, transpose_rhs=False, group_offset=0, **kw))
    bwd = jax.jit(lambda a, g, s: tpu.tgmm_tpu(a, g, s, group_offset=2, num_local_groups=3, **kw))
    m_pad = 96  # the kernels expect padded rows
    lhs_p, grad_p = jnp.pad(lhs, ((0, m_pad - m), (0, 0))), jnp.pad(grad, ((0, m_pad - m), (0, 0)))
    for sizes in ([0, 0, 0, 0, 0, 0], [11, 0, 30, 17, 0, 20], [0, 0, 0, 90, 0, 0]):
        sizes = jnp.array(sizes, jnp.int32)
        assert_close(fwd(lhs_p, rhs, sizes)[:m], ref.gmm_loop(lhs, rhs, sizes), dtype=jnp.float32)
        want = ref.tgmm_loop(lhs, grad, sizes, group_offset=2, num_local_groups=3)
        assert_close(bwd(lhs_p, grad_p, sizes), want, dtype=jnp.float32, kind="grad")


# --------------------------------------------------------------------------- expert parallelism


@pytest.mark.parametrize("impl,kb", IMPLS, ids=IMPL_IDS)
def test_group_offset_shards_sum_to_full(impl, kb):
    """Two shards with 3 local groups each: outputs and d lhs sum to the full result, the d rhs
    concatenate to the full d rhs, and each shard's rows of foreign groups are zero."""
    m, k, n, num_groups, tiling = SHAPES[jnp.float32]
    lhs, rhs, cot = _inputs(4, m, k, n, num_groups, jnp.float32)
    sizes = jnp.array([11, 9, 0, 30, 17, 20], jnp.int32)  # sum 87 < m
    shard = _impl_fn(impl, kb, tiling)
    outs = [shard(lhs, rhs[o:o + 3], sizes, cot, o) for o in (0, 3)]
    full = _ref_fn()(lhs, rhs, sizes, cot, 0)
    assert_close(outs[0][0] + outs[1][0], full[0], dtype=jnp.float32)
    assert_close(outs[0][1] + outs[1][1], full[1], dtype=jnp.float32, kind="grad")
    assert_close(jnp.concatenate([outs[0][2], outs[1][2]]), full[2], dtype=jnp.float32, kind="grad")
    assert not np.any(np.asarray(outs[0][0][20:])) and not np.any(np.asarray(outs[1][0][:20]))


def test_ragged_dot_reference_with_group_offset():
    """The ragged_dot ground truth (impl="xla" on accelerators) honours group_offset too."""
    m, k, n, num_groups, _ = SHAPES[jnp.float32]
    lhs, rhs, grad = _inputs(9, m, k, n, num_groups, jnp.float32)
    sizes = jnp.array([11, 9, 0, 30, 17, 20], jnp.int32)
    for off in (0, 2, 3):
        kw = dict(group_offset=jnp.int32(off))
        assert_close(ref.gmm_ragged_dot(lhs, rhs[off:off + 3], sizes, **kw),
                     ref.gmm_loop(lhs, rhs[off:off + 3], sizes, **kw), dtype=jnp.float32)
        assert_close(ref.tgmm_ragged_dot(lhs, grad, sizes, num_local_groups=3, **kw),
                     ref.tgmm_loop(lhs, grad, sizes, num_local_groups=3, **kw),
                     dtype=jnp.float32, kind="grad")


def test_group_offset_traced_in_shard_map():
    """Offset computed from `axis_index` inside shard_map (the expert-parallel use); psum == full."""
    m, k, n, num_groups, tiling = SHAPES[jnp.float32]
    lhs, rhs, _ = _inputs(5, m, k, n, num_groups, jnp.float32)
    sizes = jnp.array([11, 9, 0, 30, 17, 20], jnp.int32)
    mesh = Mesh(np.array(jax.devices()[:2]), ("ep",))

    def per_shard(x, w_local, s):
        off = jax.lax.axis_index("ep") * w_local.shape[0]
        out = gmm(x, w_local, s, impl="pallas", kernel_backend="tpu", tiling=tiling, group_offset=off)
        return jax.lax.psum(out, "ep")

    # Pallas outputs carry no varying-axes type in jax 0.10, hence check_vma=False.
    f = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P("ep"), P()), out_specs=P(),
                              check_vma=False))
    assert_close(f(lhs, rhs, sizes), ref.gmm_loop(lhs, rhs, sizes), dtype=jnp.float32)


# --------------------------------------------------------------------------- lowering


LOWER_SHAPE = (512, 256, 256, 4)  # m, k, n, G: TPU-legal tiles of 128


def _export_fwd_bwd(platform, dtype, transpose_rhs, kernel_backend, tiling, **export_kw):
    m, k, n, num_groups = LOWER_SHAPE

    def loss(lhs, rhs, sizes):
        out = gmm(lhs, rhs, sizes, impl="pallas", kernel_backend=kernel_backend, interpret=False,
                  tiling=tiling, transpose_rhs=transpose_rhs)
        return jnp.sum(out.astype(jnp.float32))

    rhs_shape = (num_groups, n, k) if transpose_rhs else (num_groups, k, n)
    args = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct(rhs_shape, dtype),
            jax.ShapeDtypeStruct((num_groups,), jnp.int32))
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return jax.export.export(f, platforms=(platform,), **export_kw)(*args).mlir_module()


@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_tpu_kernels_lower(dtype, transpose_rhs):
    """gmm (fwd), gmm (d lhs) and tgmm (d rhs) all lower through Mosaic for "tpu" on CPU."""
    text = _export_fwd_bwd("tpu", dtype, transpose_rhs, "tpu", (128, 128, 128))
    assert text.count("@tpu_custom_call") == 3
    assert "gmm_tpu" in text and "tgmm_tpu" in text


def test_tgmm_tpu_lowers_with_group_offset():
    m, k, n, num_groups = LOWER_SHAPE
    f = jax.jit(lambda a, b, s, o: tgmm(a, b, s, impl="pallas", kernel_backend="tpu", interpret=False,
                                        tiling=(128, 128, 128), group_offset=o, num_local_groups=2))
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((num_groups,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    assert "@tpu_custom_call" in jax.export.export(f, platforms=("tpu",))(*args).mlir_module()


@pytest.mark.parametrize("tiling", [(64, 64, 64), (128, 64, 128)], ids=["64", "128x64x128"])
def test_gpu_kernels_lower(tiling):
    """The GPU kernels lower for "cuda" through Triton (fwd, d lhs, d rhs). Triton custom calls
    carry no serialization-compatibility guarantee, so `jax.export` refuses them unless that
    safety check is disabled explicitly (the only obstacle; lowering itself works on CPU)."""
    kw = dict(dtype=jnp.bfloat16, transpose_rhs=False, kernel_backend="gpu", tiling=tiling)
    with pytest.raises(ValueError, match="no compatibility guarantees"):
        _export_fwd_bwd("cuda", **kw)
    check = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    text = _export_fwd_bwd("cuda", **kw, disabled_checks=[check])
    assert text.count("xla.gpu.triton") >= 3


# --------------------------------------------------------------------------- validation


def _bad_cases():
    x, w, s = jnp.ones((8, 4)), jnp.ones((2, 4, 3)), jnp.array([3, 5], jnp.int32)
    return {
        "sum_gt_m": (lambda: gmm(x, w, jnp.array([5, 5], jnp.int32)), "group_sizes"),
        "negative": (lambda: gmm(x, w, jnp.array([-1, 5], jnp.int32)), "group_sizes"),
        "float_sizes": (lambda: gmm(x, w, jnp.array([3.0, 5.0])), "group_sizes"),
        "sizes_rank": (lambda: gmm(x, w, s[None]), "group_sizes"),
        "k_mismatch": (lambda: gmm(x, jnp.ones((2, 5, 3)), s), "k mismatch"),
        "k_mismatch_transposed": (lambda: gmm(x, w, s, transpose_rhs=True), "k mismatch"),
        "lhs_rank": (lambda: gmm(x[None], w, s), "lhs"),
        "rhs_rank": (lambda: gmm(x, w[0], s), "rhs"),
        "int_lhs": (lambda: gmm(x.astype(jnp.int32), w, s), "lhs"),
        "unknown_impl": (lambda: gmm(x, w, s, impl="ragged"), "impl"),
        "tiling_len": (lambda: gmm(x, w, s, tiling=(8, 8)), "tiling"),
        "tiling_zero": (lambda: gmm(x, w, s, tiling=(8, 0, 8)), "tiling"),
        "tiling_not_pow2_gpu": (lambda: gmm(x, w, s, impl="pallas", kernel_backend="gpu", tiling=(8, 12, 8)), "tiling"),
        "kernel_backend": (lambda: gmm(x, w, s, kernel_backend="metal"), "kernel_backend"),
        "local_without_offset": (lambda: gmm(x, w[:1], s), "group_offset"),
        "offset_out_of_range": (lambda: gmm(x, w[:1], s, group_offset=2), "group_offset"),
        "offset_not_scalar": (lambda: gmm(x, w[:1], s, group_offset=jnp.array([0, 1])), "group_offset"),
        "tgmm_m_mismatch": (lambda: tgmm(x, jnp.ones((7, 3)), s), "m mismatch"),
        "tgmm_needs_num_local": (lambda: tgmm(x, jnp.ones((8, 3)), s, group_offset=1), "num_local_groups"),
        "tgmm_sum_gt_m": (lambda: tgmm(x, jnp.ones((8, 3)), jnp.array([5, 5], jnp.int32)), "group_sizes"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
@pytest.mark.usefixtures("unchecked")  # the kernel's own messages, which the type checker would pre-empt
def test_bad_input_raises(case):
    fn, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        fn()


def test_group_sizes_unchecked_under_jit_are_sanitised():
    """Under jit sizes can't be validated: negatives count as 0, groups are cut at row m."""
    m, k, n, num_groups, tiling = SHAPES[jnp.float32]
    lhs, rhs, cot = _inputs(6, m, k, n, num_groups, jnp.float32)
    bad = jnp.array([40, -5, 30, 50, 0, 7], jnp.int32)
    clean = jnp.array([40, 0, 30, 20, 0, 0], jnp.int32)
    want = _ref_fn()(lhs, rhs, clean, cot, 0)
    for impl, kb in IMPLS:  # the compiled functions of test_gmm_matches_reference
        got = _impl_fn(impl, kb, tiling)(lhs, rhs, bad, cot, 0)
        assert_close(got[0], want[0], dtype=jnp.float32)
        assert_close(got[1:], want[1:], dtype=jnp.float32, kind="grad")


def test_auto_impl_on_cpu_uses_xla():
    m, k, n, num_groups, _ = SHAPES[jnp.float32]
    lhs, rhs, _ = _inputs(7, m, k, n, num_groups, jnp.float32)
    sizes = jnp.array([11, 0, 30, 17, 0, 20], jnp.int32)
    assert jax.default_backend() == "cpu"
    assert_close(gmm(lhs, rhs, sizes), ref.gmm_loop(lhs, rhs, sizes), dtype=jnp.float32)


# --------------------------------------------------------------------------- metadata


@settings(SETTINGS, max_examples=8)
@given(data=st.data())
def test_metadata_schedule(data):
    """The TPU schedule visits exactly the (group, m-tile) pairs that share rows (once each,
    plus one step per empty local group when requested), with consecutive m-tile revisits."""
    m, tm, num_groups = 48, 8, 5
    sizes = data.draw(group_sizes_st(m, num_groups))
    offset = data.draw(st.integers(0, 3))
    num_local = data.draw(st.integers(1, num_groups - offset))
    visit_empty = data.draw(st.booleans())
    meta = make_group_metadata(jnp.asarray(sizes), m=m, tm=tm, group_offset=offset,
                               num_local_groups=num_local, visit_empty_groups=visit_empty)
    num = int(meta.num_tiles[0])
    assert meta.group_ids.shape[0] == max_grid_steps(m // tm, num_local) >= num
    steps = list(zip(np.asarray(meta.group_ids[:num]).tolist(), np.asarray(meta.m_tile_ids[:num]).tolist()))
    ends = np.cumsum(sizes)
    starts = ends - sizes
    expected = []
    for g in range(offset, offset + num_local):
        if sizes[g]:
            expected += [(g, t) for t in range(starts[g] // tm, (ends[g] - 1) // tm + 1)]
        elif visit_empty:
            expected.append((g, min(starts[g] // tm, m // tm - 1)))
    assert steps == expected
    tiles = [t for _, t in steps]
    assert tiles == sorted(tiles)
