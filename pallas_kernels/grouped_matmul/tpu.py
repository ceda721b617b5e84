"""TPU (Mosaic) grouped-matmul kernels: `gmm_tpu` (forward / lhs grad) and `tgmm_tpu` (rhs grad).

Both take the (group, m-tile) schedule of `metadata.make_group_metadata` as scalar-prefetch
arguments (`pltpu.PrefetchScalarGridSpec`), so the BlockSpec index maps read the group id and the
m-tile of each grid step from SMEM. Only tiles that hold rows of a local group are visited; a tile
straddling two groups is visited once per group and each visit writes only its group's rows.

Inputs must already be padded by the caller (`api`): `m % tm == k % tk == n % tn == 0`.

Grid size. The group-step axis is *dynamic* (`num_tiles`, a traced scalar), so no padding steps
run. jax 0.10.2's interpreters (`interpret=True` and `pltpu.InterpretParams()`) execute dynamic
grids correctly (the tests run exactly this code), although jax's own megablox tests still skip
interpret mode for them. `static_grid=True` uses the static bound `tiles_m + G_local - 1`
instead; the surplus steps are then no-ops thanks to the `step < num_tiles` guards (always true
with the dynamic grid). It is a fallback for interpreters or backends without dynamic grids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from pallas_kernels.grouped_matmul.metadata import local_row_range, make_group_metadata

_F32 = jnp.float32


def _rows_in_group(offsets, g, m_tile, tm, width):
    """[tm, width] mask of the rows of m-tile `m_tile` that belong to group `g`."""
    rows = m_tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, width), 0)
    return (rows >= offsets[g]) & (rows < offsets[g + 1])


def _grid_steps(meta, static_grid):
    return meta.group_ids.shape[0] if static_grid else meta.num_tiles[0]


def gmm_tpu(
    lhs: Float[Array, "m k"],
    rhs: Float[Array, "gl k n"] | Float[Array, "gl n k"],
    group_sizes: Int[Array, " g"],
    *,
    tiling: tuple[int, int, int],
    transpose_rhs: bool,
    out_dtype,
    group_offset: Int[Array, ""] | int,
    interpret,
    static_grid: bool = False,
) -> Float[Array, "m n"]:
    """Grouped matmul on the TPU schedule; rows outside the local groups are zero."""
    m, k = lhs.shape
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling
    tiles_k, tiles_n = k // tk, n // tn
    compute = jnp.result_type(lhs.dtype, rhs.dtype)
    group_offset = jnp.asarray(group_offset, jnp.int32).reshape(1)
    meta = make_group_metadata(
        group_sizes, m=m, tm=tm, group_offset=group_offset[0], num_local_groups=num_local
    )

    def kernel(offsets, gids, mtids, ntiles, goff, lhs_ref, rhs_ref, out_ref, acc_ref):
        del goff
        step, k_i = pl.program_id(1), pl.program_id(2)
        active = step < ntiles[0]

        @pl.when(k_i == 0)
        def _init():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(active)
        def _accumulate():
            dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
            acc_ref[...] += jax.lax.dot_general(
                lhs_ref[...].astype(compute), rhs_ref[...].astype(compute), dims,
                preferred_element_type=_F32,
            )

        @pl.when(active & (k_i == tiles_k - 1))
        def _store():
            # Rows of other groups keep what earlier visits of this tile wrote; rows no local
            # group owns are zeroed after the call (`_zero_outside_local_rows`).
            mask = _rows_in_group(offsets, gids[step], mtids[step], tm, tn)
            out_ref[...] = jnp.where(mask, acc_ref[...], out_ref[...].astype(_F32)).astype(out_dtype)

    def lhs_map(n_i, step, k_i, offsets, gids, mtids, ntiles, goff):
        return mtids[step], k_i

    def rhs_map(n_i, step, k_i, offsets, gids, mtids, ntiles, goff):
        j = gids[step] - goff[0]  # local index of the (global) group id
        return (j, n_i, k_i) if transpose_rhs else (j, k_i, n_i)

    def out_map(n_i, step, k_i, offsets, gids, mtids, ntiles, goff):
        return mtids[step], n_i

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    itemsize = lambda x: jnp.dtype(x.dtype).itemsize
    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        bytes_accessed=lhs.size * itemsize(lhs) * tiles_n
        + rhs.size * itemsize(rhs)
        + m * n * jnp.dtype(out_dtype).itemsize,
        transcendentals=0,
    )
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(tiles_n, _grid_steps(meta, static_grid), tiles_k),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), _F32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=interpret,
        cost_estimate=cost,
        name="gmm_tpu",
    )
    out = call(*meta, group_offset, lhs, rhs)
    return _zero_outside_local_rows(out, meta.group_offsets, group_offset[0], num_local)


def _zero_outside_local_rows(out, offsets, group_offset, num_local):
    """Rows outside the local row range (other shards' groups, rows past sum(group_sizes), and
    tiles never visited) hold unwritten memory: select zeros there (one fused elementwise pass)."""
    lo, hi = local_row_range(offsets, group_offset, num_local)
    rows = jnp.arange(out.shape[0], dtype=jnp.int32)[:, None]  # [m, 1]
    return jnp.where((rows >= lo) & (rows < hi), out, jnp.zeros((), out.dtype))


def tgmm_tpu(
    lhs: Float[Array, "m k"],
    grad: Float[Array, "m n"],
    group_sizes: Int[Array, " g"],
    *,
    tiling: tuple[int, int, int],
    out_dtype,
    group_offset: Int[Array, ""] | int,
    num_local_groups: int,
    interpret,
    static_grid: bool = False,
) -> Float[Array, "gl k n"]:
    """`out[j] = lhs_g^T @ grad_g` for local groups `g = group_offset + j` (zeros if empty)."""
    m, k = lhs.shape
    n = grad.shape[1]
    tm, tk, tn = tiling
    tiles_k, tiles_n = k // tk, n // tn
    compute = jnp.result_type(lhs.dtype, grad.dtype)
    group_offset = jnp.asarray(group_offset, jnp.int32).reshape(1)
    meta = make_group_metadata(
        group_sizes, m=m, tm=tm, group_offset=group_offset[0],
        num_local_groups=num_local_groups, visit_empty_groups=True,
    )
    last_step = meta.group_ids.shape[0] - 1

    def kernel(offsets, gids, mtids, ntiles, goff, lhs_ref, grad_ref, out_ref, acc_ref):
        del goff
        step = pl.program_id(2)
        num = ntiles[0]
        g = gids[step]
        active = step < num
        first = (step == 0) | (gids[jnp.maximum(step - 1, 0)] != g)
        last = (step == num - 1) | (gids[jnp.minimum(step + 1, last_step)] != g)

        @pl.when(first)
        def _init():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(active & (offsets[g + 1] > offsets[g]))
        def _accumulate():
            x = jnp.where(_rows_in_group(offsets, g, mtids[step], tm, tk), lhs_ref[...].astype(_F32), 0)
            y = jnp.where(_rows_in_group(offsets, g, mtids[step], tm, tn), grad_ref[...].astype(_F32), 0)
            acc_ref[...] += jnp.dot(x.T.astype(compute), y.astype(compute), preferred_element_type=_F32)

        @pl.when(active & last)
        def _store():
            out_ref[...] = acc_ref[...].astype(out_dtype)

    def lhs_map(n_i, k_i, step, offsets, gids, mtids, ntiles, goff):
        return mtids[step], k_i

    def grad_map(n_i, k_i, step, offsets, gids, mtids, ntiles, goff):
        return mtids[step], n_i

    def out_map(n_i, k_i, step, offsets, gids, mtids, ntiles, goff):
        return gids[step] - goff[0], k_i, n_i

    itemsize = lambda x: jnp.dtype(x.dtype).itemsize
    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        bytes_accessed=lhs.size * itemsize(lhs) * tiles_n
        + grad.size * itemsize(grad) * tiles_k
        + num_local_groups * k * n * jnp.dtype(out_dtype).itemsize,
        transcendentals=0,
    )
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_local_groups, k, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(tiles_n, tiles_k, _grid_steps(meta, static_grid)),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), _F32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=interpret,
        cost_estimate=cost,
        name="tgmm_tpu",
    )
    return call(*meta, group_offset, lhs, grad)


__all__ = ["gmm_tpu", "tgmm_tpu"]
