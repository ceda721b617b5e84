"""Group metadata for the grouped-matmul kernels (plain jnp, jit-able, static shapes).

Rows of `lhs` are sorted by group: group `g` owns rows `[offsets[g], offsets[g + 1])` where
`offsets = [0, cumsum(group_sizes)]`. The row dimension is cut into `tiles_m = m // tm` tiles.

*Expert parallelism.* A shard owns the contiguous "local" groups
`[group_offset, group_offset + num_local_groups)`; because rows are sorted by group, the local
rows are the contiguous range `[offsets[group_offset], offsets[group_offset + num_local_groups])`.
Every metadata builder here only schedules work for local groups.

Two layouts are produced:

* `make_group_metadata` (TPU kernels and the CPU XLA loop): a flat list of *grid steps*, each a
  `(group id, m-tile id)` pair. A group visits every m-tile that holds one of its rows, so a tile
  straddling two groups is visited once per group (rows are masked per visit). Visits of one
  m-tile are consecutive (TPU output blocks may only be revisited on consecutive steps). The list
  has the static length `tiles_m + num_local_groups - 1`; only the first `num_tiles` entries are
  real work, the rest repeat the last real step (so a static grid can guard them out cheaply).
* `tile_group_ranges` (GPU kernel): for each m-tile, the half-open range of local groups whose
  rows intersect the tile; the GPU kernel loops over that range inside one program.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Int


class GroupMetadata(NamedTuple):
    """Scalar-prefetch metadata of the TPU kernels (all int32)."""

    group_offsets: Int[Array, " G_plus_1"]  # row where group g starts; [G] == total rows
    group_ids: Int[Array, " T"]  # global group id handled by grid step s
    m_tile_ids: Int[Array, " T"]  # m-tile handled by grid step s
    num_tiles: Int[Array, " 1"]  # number of real steps (<= T); steps >= num_tiles are no-ops


def group_offsets(group_sizes: Int[Array, " G"]) -> Int[Array, " G_plus_1"]:
    """`[0, cumsum(group_sizes)]` as int32."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32), dtype=jnp.int32)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])


def sanitize_group_sizes(group_sizes: Int[Array, " G"], m: int) -> Int[Array, " G"]:
    """Clamp sizes so that they are >= 0 and the groups end at or before row `m`.

    Valid inputs pass through unchanged. Under `jit` the sizes cannot be validated, so invalid
    ones are made memory-safe instead: negative sizes count as 0 and groups are truncated at `m`.
    """
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), m)
    return jnp.diff(ends, prepend=jnp.zeros((1,), ends.dtype)).astype(jnp.int32)


def _local_group_mask(num_groups: int, group_offset, num_local_groups: int):
    gid = jnp.arange(num_groups, dtype=jnp.int32)
    return (gid >= group_offset) & (gid < group_offset + num_local_groups)


def max_grid_steps(tiles_m: int, num_local_groups: int) -> int:
    """Static upper bound on the number of (group, m-tile) visits (see module docstring)."""
    return tiles_m + max(num_local_groups, 1) - 1


def make_group_metadata(
    group_sizes: Int[Array, " G"],
    *,
    m: int,
    tm: int,
    group_offset: Int[Array, ""] | int = 0,
    num_local_groups: int | None = None,
    visit_empty_groups: bool = False,
) -> GroupMetadata:
    """Flat (group, m-tile) schedule over the local groups.

    `m` must be a multiple of `tm`. With `visit_empty_groups` each empty local group gets one step
    (tgmm needs it to write the zero gradient of that group); otherwise empty groups get none.

    Bound on the number of steps: the non-empty local groups span at most `tiles_m` tiles and each
    group boundary inside a tile adds one revisit, so `tiles_m + (#non-empty - 1)` steps, plus one
    per empty group when visited: at most `tiles_m + num_local_groups - 1` (tiles_m >= 1).
    """
    if m % tm:
        raise ValueError(f"m={m} must be a multiple of tm={tm}")
    num_groups = group_sizes.shape[0]
    num_local = num_groups if num_local_groups is None else num_local_groups
    tiles_m = m // tm
    num_steps = max_grid_steps(tiles_m, num_local)
    group_offset = jnp.asarray(group_offset, jnp.int32)

    offsets = group_offsets(group_sizes)  # [G + 1]
    starts, ends = offsets[:-1], offsets[1:]  # [G] each
    nonempty = ends > starts
    first_tile = jnp.minimum(starts // tm, tiles_m - 1)  # empty groups: tile holding `start`
    last_tile = (ends - 1) // tm
    tiles = jnp.where(nonempty, last_tile - first_tile + 1, int(visit_empty_groups))
    tiles = jnp.where(_local_group_mask(num_groups, group_offset, num_local), tiles, 0)
    tiles = tiles.astype(jnp.int32)

    tiles_end = jnp.cumsum(tiles, dtype=jnp.int32)  # exclusive end step of each group
    num_tiles = tiles_end[-1]
    # Padding steps (>= num_tiles) replay the last real step; they are guarded out in kernels.
    step = jnp.minimum(jnp.arange(num_steps, dtype=jnp.int32), jnp.maximum(num_tiles - 1, 0))
    gid = jnp.searchsorted(tiles_end, step, side="right").astype(jnp.int32)  # [T]
    gid = jnp.clip(gid, jnp.maximum(group_offset, 0), jnp.minimum(group_offset + num_local, num_groups) - 1)
    gid = jnp.clip(gid, 0, num_groups - 1)  # if the local range is empty/out of range
    m_tile = first_tile[gid] + step - (tiles_end[gid] - tiles[gid])
    m_tile = jnp.clip(m_tile, 0, tiles_m - 1).astype(jnp.int32)
    return GroupMetadata(offsets, gid, m_tile, num_tiles.reshape(1))  # num_tiles: [] -> [1] (SMEM)


def local_row_range(
    offsets: Int[Array, " G_plus_1"], group_offset, num_local_groups: int
) -> tuple[Int[Array, ""], Int[Array, ""]]:
    """`[row_start, row_end)` covered by the local groups (empty if the range is invalid)."""
    num_groups = offsets.shape[0] - 1
    lo = jnp.clip(group_offset, 0, num_groups)
    hi = jnp.clip(group_offset + num_local_groups, lo, num_groups)
    return offsets[lo], offsets[hi]


def tile_group_ranges(
    group_sizes: Int[Array, " G"],
    *,
    m: int,
    tm: int,
    group_offset: Int[Array, ""] | int = 0,
    num_local_groups: int | None = None,
) -> tuple[Int[Array, " tiles_m"], Int[Array, " tiles_m"]]:
    """Per m-tile, the half-open range `[lo, hi)` of local global-group ids intersecting it.

    Group `g` intersects tile `[r0, r1)` iff `end_g > r0` and `start_g < r1`; both bounds are
    monotone in `g`, so the intersecting groups form a contiguous range (possibly containing empty
    groups, which the kernel skips).
    """
    if m % tm:
        raise ValueError(f"m={m} must be a multiple of tm={tm}")
    num_groups = group_sizes.shape[0]
    num_local = num_groups if num_local_groups is None else num_local_groups
    group_offset = jnp.asarray(group_offset, jnp.int32)
    offsets = group_offsets(group_sizes)
    row0 = jnp.arange(m // tm, dtype=jnp.int32) * tm  # [tiles_m]
    lo = jnp.searchsorted(offsets[1:], row0, side="right")  # first group with end > row0
    hi = jnp.searchsorted(offsets[:-1], row0 + tm, side="left")  # groups with start < row1
    local_lo = jnp.clip(group_offset, 0, num_groups)
    local_hi = jnp.clip(group_offset + num_local, local_lo, num_groups)
    lo = jnp.clip(lo, local_lo, local_hi).astype(jnp.int32)
    hi = jnp.clip(hi, lo, local_hi).astype(jnp.int32)
    return lo, hi


__all__ = [
    "GroupMetadata",
    "group_offsets",
    "sanitize_group_sizes",
    "make_group_metadata",
    "max_grid_steps",
    "local_row_range",
    "tile_group_ranges",
]
