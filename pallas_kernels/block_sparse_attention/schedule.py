"""Block schedule: which key blocks each query block must visit (and vice versa for dk/dv).

A (query block, key block) tile is *empty* when no (query, key) pair in it is visible, *full*
when every pair is visible (the kernel can skip masking), *partial* otherwise. For each query
block the schedule lists the non-empty key blocks in ascending order, padded to the static
length ``nk`` by repeating the last listed block (so a TPU pipeline does not re-fetch while it
idles through the padding), plus a count. The transposed schedule (for each key block, the query
blocks touching it) drives the dk/dv kernels. Kernel work is O(visited tiles), not O(T^2).

Building the schedule evaluates the visibility rule once per (query, key) pair as a fused
boolean reduction (`any`/`all` over each tile): no float work and no [Tq, Tk] array is kept, so
it is negligible next to attention's O(Tq * Tk * D) FLOPs and is exact for any mask.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from pallas_kernels.block_sparse_attention.common import encode_tokens, pair_visible
from pallas_kernels.block_sparse_attention.reference import split_segment_ids


# A pytree container: JAX rebuilds it through __init__ with placeholder leaves (object() sentinels
# inside pallas_call and custom_vjp, ShapeDtypeStructs under eval_shape), so its field annotations
# describe the concrete schedule and cannot be checked at construction.
@typing.no_type_check
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["kv_index", "kv_full", "kv_count", "q_index", "q_full", "q_count"],
    meta_fields=["block_q", "block_k"],
)
@dataclasses.dataclass(frozen=True)
class BlockSchedule:
    """Per-batch-element block lists (static shapes; masks are data, so it is jit-able)."""

    kv_index: Int[Array, "B nq nk"]  # key blocks to visit per query block, padded
    kv_full: Bool[Array, "B nq nk"]  # listed tile needs no masking (False on padding)
    kv_count: Int[Array, "B nq"]  # number of valid entries in kv_index
    q_index: Int[Array, "B nk nq"]  # transposed: query blocks touching each key block
    q_full: Bool[Array, "B nk nq"]
    q_count: Int[Array, "B nk"]
    block_q: int
    block_k: int

    def visited_blocks(self) -> Int[Array, " B"]:
        """Number of (query block, key block) tiles the kernels compute, per batch element."""
        return jnp.sum(self.kv_count, axis=-1)

    def full_blocks(self) -> Int[Array, " B"]:
        """How many of the visited tiles are full (computed without masking)."""
        return jnp.sum(self.kv_full, axis=(-2, -1))

    def total_blocks(self) -> int:
        """Tiles a dense kernel would compute per batch element (nq * nk)."""
        return self.kv_index.shape[1] * self.kv_index.shape[2]


def _compact(nonempty: Bool[Array, "B r c"], full: Bool[Array, "B r c"]):
    """Lists the True columns of each row first (ascending), padding with the last one."""
    n = nonempty.shape[-1]
    order = jnp.argsort(jnp.logical_not(nonempty).astype(jnp.int8), axis=-1, stable=True)
    order = order.astype(jnp.int32)  # [B, r, c]: non-empty columns first, ascending
    count = jnp.sum(nonempty, axis=-1, dtype=jnp.int32)  # [B, r]
    live = jnp.arange(n, dtype=jnp.int32) < count[..., None]  # [B, r, c]
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)  # [B, r, 1]
    index = jnp.where(live, order, last)
    full_list = jnp.logical_and(jnp.take_along_axis(full, order, axis=-1), live)
    return index, full_list, count


def schedule_from_codes(
    q_code: Int[Array, "B Tqp"],
    kv_seg: Int[Array, "B Tkp"],
    kv_keep: Int[Array, "B Tkp"],
    *,
    block_q: int,
    block_k: int,
    causal: bool,
    window: int,
    offset: int,
) -> BlockSchedule:
    """Schedule from padded token codes (see `common.encode_tokens`); offset = Tk - Tq."""
    b, tq_p = q_code.shape
    tk_p = kv_seg.shape[1]
    nq, nk = tq_p // block_q, tk_p // block_k
    qc = q_code.reshape(b, nq, block_q)[:, :, :, None, None]  # [B, nq, bq, 1, 1]
    qpos = (jnp.arange(tq_p, dtype=jnp.int32) + offset).reshape(1, nq, block_q, 1, 1)
    ks = kv_seg.reshape(b, 1, 1, nk, block_k)  # [B, 1, 1, nk, bk]
    kk = kv_keep.reshape(b, 1, 1, nk, block_k)
    kpos = jnp.arange(tk_p, dtype=jnp.int32).reshape(1, 1, 1, nk, block_k)
    vis = pair_visible(qc, ks, kk, qpos, kpos, causal=causal, window=window)  # [B, nq, bq, nk, bk]
    nonempty = jnp.any(vis, axis=(2, 4))  # [B, nq, nk]
    full = jnp.all(vis, axis=(2, 4))  # [B, nq, nk]
    kv_index, kv_full, kv_count = _compact(nonempty, full)
    q_index, q_full, q_count = _compact(nonempty.transpose(0, 2, 1), full.transpose(0, 2, 1))
    return BlockSchedule(kv_index, kv_full, kv_count, q_index, q_full, q_count, block_q, block_k)


@functools.partial(jax.jit, static_argnames=("causal", "window", "block_q", "block_k"))
def build_block_schedule(
    q_mask: Bool[Array, "B Tq"],
    kv_mask: Bool[Array, "B Tk"],
    *,
    causal: bool = True,
    segment_ids=None,
    window: int = 0,
    block_q: int = 128,
    block_k: int = 128,
) -> BlockSchedule:
    """The schedule `block_sparse_attention` uses for these masks (lengths padded to blocks).

    Jitted (block sizes, causal and window are static); segment_ids as in the API.
    """
    tq, tk = q_mask.shape[1], kv_mask.shape[1]
    q_seg, kv_seg = split_segment_ids(segment_ids, tq, tk)
    codes = encode_tokens(q_mask, kv_mask, q_seg, kv_seg, block_q=block_q, block_k=block_k)
    return schedule_from_codes(
        *codes, block_q=block_q, block_k=block_k, causal=causal, window=window, offset=tk - tq
    )


def count_visited_blocks(
    q_mask: Bool[Array, "B Tq"],
    kv_mask: Bool[Array, "B Tk"],
    *,
    causal: bool = True,
    segment_ids=None,
    window: int = 0,
    block_q: int = 128,
    block_k: int = 128,
) -> Int[Array, " B"]:
    """Tiles the kernels compute per batch element (multiply by heads for the whole call)."""
    return build_block_schedule(
        q_mask, kv_mask, causal=causal, segment_ids=segment_ids, window=window,
        block_q=block_q, block_k=block_k,
    ).visited_blocks()
