"""GPU grouped-matmul kernels in generic Pallas (lowered through the Triton backend).

`gmm_gpu`: one program per output tile `(m-tile i, n-tile j)`. It loops over the local groups
whose rows intersect m-tile `i` (range from `metadata.tile_group_ranges`, read from a small int32
array), runs the k-loop for each, and keeps the group's rows of the product (a tile straddling two
groups is computed once per group, exactly like the TPU schedule). Every output tile is written
exactly once, so tiles without local rows come out as zeros and no post-pass is needed.

`tgmm_gpu`: one program per `(local group, k-tile, n-tile)`; it loops over the m-tiles that hold
the group's rows (zero iterations for an empty group, which writes a zero gradient).

Backend notes: `pallas_call` on "cuda" defaults to Mosaic GPU in jax 0.10 (Triton is deprecated
in 0.11), but Mosaic GPU needs `plgpu.kernel`-style warpgroup code (wgmma, TMA) rather than a
generic grid kernel. We pass `pallas.triton.CompilerParams` to select Triton, whose lowering
runs entirely in Python, so `jax.export(..., platforms=("cuda",))` works on a CPU-only machine.
Triton needs power-of-two block sizes (`api` pads the operands; the tiles themselves must be
powers of two, checked here). Inputs must already be padded: `m % tm == k % tk == n % tn == 0`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, Int

from pallas_kernels.grouped_matmul.metadata import group_offsets, tile_group_ranges

_F32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))  # [tm, tk] @ [tk, tn]
_NT = (((1,), (1,)), ((), ()))  # [tm, tk] @ [tn, tk]^T
_TN = (((0,), (0,)), ((), ()))  # [tm, tk]^T @ [tm, tn]


def check_gpu_tiling(tiling: tuple[int, int, int]) -> None:
    """Triton block shapes must be powers of two."""
    if any(t & (t - 1) for t in tiling):
        raise ValueError(f"tiling={tiling}: the GPU (Triton) kernel needs power-of-two tiles")


SHARED_MEMORY_BUDGET = 160 * 1024  # bytes of Triton pipeline buffers (A100: 164 KiB, H100/H200: 227 KiB)


def compiler_params_for(tiling: tuple[int, int, int], itemsize: int) -> tuple[int, int]:
    """(num_warps, num_stages) for a tiling: 8 warps once a tile holds >= 128 x 128 accumulators
    (4 below), and as many software-pipeline stages of the k loop (up to 4, at least 1) as fit
    ``SHARED_MEMORY_BUDGET``, a stage holding one input tile of each operand (gmm: lhs [tm, tk] and
    rhs [tk, tn]; tgmm: lhs [tm, tk] and grad [tm, tn]). Not yet timed on a GPU (the GPU check
    sweeps tilings: experiments/gpu_check.sh); before this rule every tiling ran with (4, 2)."""
    tm, tk, tn = tiling
    warps = 8 if max(tm * tn, tk * tn) >= 128 * 128 else 4
    stage = (tm * tk + max(tk * tn, tm * tn)) * itemsize
    stages = max(1, min(4, SHARED_MEMORY_BUDGET // max(stage, 1)))
    return warps, stages


def _compiler_params(tiling: tuple[int, int, int], dtype):
    warps, stages = compiler_params_for(tiling, jnp.dtype(dtype).itemsize)
    return pltriton.CompilerParams(num_warps=warps, num_stages=stages)


def gmm_gpu(
    lhs: Float[Array, "m k"],
    rhs: Float[Array, "gl k n"] | Float[Array, "gl n k"],
    group_sizes: Int[Array, " g"],
    *,
    tiling: tuple[int, int, int],
    transpose_rhs: bool,
    out_dtype,
    group_offset: Int[Array, ""],
    interpret,
) -> Float[Array, "m n"]:
    """Grouped matmul; rows outside the local groups are zero."""
    check_gpu_tiling(tiling)
    m, k = lhs.shape
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling
    tiles_k = k // tk
    compute = jnp.result_type(lhs.dtype, rhs.dtype)
    group_offset = jnp.asarray(group_offset, jnp.int32).reshape(1)
    lo, hi = tile_group_ranges(
        group_sizes, m=m, tm=tm, group_offset=group_offset[0], num_local_groups=num_local
    )
    offsets = group_offsets(group_sizes)

    def kernel(lo_ref, hi_ref, off_ref, goff_ref, lhs_ref, rhs_ref, out_ref):
        i, j = pl.program_id(0), pl.program_id(1)
        row0 = i * tm
        rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
        goff = goff_ref[0]

        def group_body(g, res):
            start, end = off_ref[g], off_ref[g + 1]

            def k_body(kk, acc):
                a = lhs_ref[pl.ds(row0, tm), pl.ds(kk * tk, tk)].astype(compute)
                if transpose_rhs:
                    b = rhs_ref[g - goff, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)].astype(compute)
                else:
                    b = rhs_ref[g - goff, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)].astype(compute)
                dims = _NT if transpose_rhs else _NN
                return acc + jax.lax.dot_general(a, b, dims, preferred_element_type=_F32)

            zeros = jnp.zeros((tm, tn), _F32)
            # Skip empty groups inside the range. A branch, not a data-dependent trip count: jax
            # 0.11's Triton lowering turned `where(end > start, tiles_k, 0)` into an i1 loop bound.
            acc = jax.lax.cond(end > start, lambda: jax.lax.fori_loop(0, tiles_k, k_body, zeros), lambda: zeros)
            return jnp.where((rows >= start) & (rows < end), acc, res)

        res = jax.lax.fori_loop(lo_ref[i], hi_ref[i], group_body, jnp.zeros((tm, tn), _F32))
        out_ref[...] = res.astype(out_ref.dtype)

    whole = pl.BlockSpec()  # whole array; the kernel slices it itself
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(m // tm, n // tn),
        in_specs=[whole] * 6,
        out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
        compiler_params=_compiler_params(tiling, compute),
        interpret=interpret,
        name="gmm_gpu",
    )(lo, hi, offsets, group_offset, lhs, rhs)


def tgmm_gpu(
    lhs: Float[Array, "m k"],
    grad: Float[Array, "m n"],
    group_sizes: Int[Array, " g"],
    *,
    tiling: tuple[int, int, int],
    out_dtype,
    group_offset: Int[Array, ""],
    num_local_groups: int,
    interpret,
) -> Float[Array, "gl k n"]:
    """`out[j] = lhs_g^T @ grad_g` for local groups `g = group_offset + j` (zeros if empty)."""
    check_gpu_tiling(tiling)
    m, k = lhs.shape
    n = grad.shape[1]
    tm, tk, tn = tiling
    num_groups = group_sizes.shape[0]
    compute = jnp.result_type(lhs.dtype, grad.dtype)
    group_offset = jnp.asarray(group_offset, jnp.int32).reshape(1)
    offsets = group_offsets(group_sizes)

    def kernel(off_ref, goff_ref, lhs_ref, grad_ref, out_ref):
        jg, kk, nn = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        g = goff_ref[0] + jg
        start = off_ref[jnp.clip(g, 0, num_groups)]
        end = jnp.where((g >= 0) & (g < num_groups), off_ref[jnp.clip(g + 1, 0, num_groups)], start)
        t0 = start // tm
        t1 = jnp.where(end > start, (end + tm - 1) // tm, t0)
        iota = jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)

        def m_body(t, acc):
            rows = t * tm + iota
            mask = (rows >= start) & (rows < end)  # [tm, 1]
            a = lhs_ref[pl.ds(t * tm, tm), pl.ds(kk * tk, tk)]
            b = grad_ref[pl.ds(t * tm, tm), pl.ds(nn * tn, tn)]
            a = jnp.where(mask, a.astype(_F32), 0).astype(compute)
            b = jnp.where(mask, b.astype(_F32), 0).astype(compute)
            return acc + jax.lax.dot_general(a, b, _TN, preferred_element_type=_F32)

        acc = jax.lax.fori_loop(t0, t1, m_body, jnp.zeros((tk, tn), _F32))
        out_ref[...] = acc.astype(out_ref.dtype)

    whole = pl.BlockSpec()
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_local_groups, k, n), out_dtype),
        grid=(num_local_groups, k // tk, n // tn),
        in_specs=[whole] * 4,
        out_specs=pl.BlockSpec((None, tk, tn), lambda jg, kk, nn: (jg, kk, nn)),
        compiler_params=_compiler_params(tiling, compute),
        interpret=interpret,
        name="tgmm_gpu",
    )(offsets, group_offset, lhs, grad)


__all__ = ["gmm_gpu", "tgmm_gpu", "check_gpu_tiling"]
