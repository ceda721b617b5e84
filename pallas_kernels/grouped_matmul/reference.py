"""Ground truths for the grouped matmul: a per-group masked loop and `jax.lax.ragged_dot`.

Semantics shared by every implementation (see `api.gmm` for the full contract):

* group `g` owns rows `[offsets[g], offsets[g + 1])`, `offsets = [0, cumsum(group_sizes)]`;
* `rhs` holds the *local* groups `[group_offset, group_offset + rhs.shape[0])`;
* output row `r` is `lhs[r] @ rhs[g - group_offset]` when `r` belongs to a local group `g`, and
  zero otherwise (rows of other shards' groups and rows `>= sum(group_sizes)`);
* products accumulate in float32 and are cast to `preferred_element_type` (default: the
  promoted input dtype).

These functions do no validation; they expect valid inputs (`api` validates).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.grouped_matmul.metadata import group_offsets


def _out_dtype(a, b, preferred_element_type):
    return jnp.dtype(preferred_element_type or jnp.result_type(a.dtype, b.dtype))


def _group_bounds(offsets, g):
    """Rows `[start, end)` of global group `g` (empty when `g` is out of range)."""
    num_groups = offsets.shape[0] - 1
    g = jnp.asarray(g, jnp.int32)
    valid = (g >= 0) & (g < num_groups)
    start = offsets[jnp.clip(g, 0, num_groups)]
    end = jnp.where(valid, offsets[jnp.clip(g + 1, 0, num_groups)], start)
    return start, end


def gmm_loop(
    lhs: Float[Array, "m k"],
    rhs: Float[Array, "gl k n"] | Float[Array, "gl n k"],
    group_sizes: Int[Array, " g"],
    *,
    transpose_rhs: bool = False,
    preferred_element_type=None,
    group_offset: Int[Array, ""] | int = 0,
) -> Float[Array, "m n"]:
    """Per-group loop: one dense matmul per local group, rows masked to that group."""
    out_dtype = _out_dtype(lhs, rhs, preferred_element_type)
    compute = jnp.result_type(lhs.dtype, rhs.dtype)
    m = lhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    offsets = group_offsets(group_sizes)
    rows = jnp.arange(m, dtype=jnp.int32)
    out = jnp.zeros((m, n), jnp.float32)
    for j in range(rhs.shape[0]):
        start, end = _group_bounds(offsets, group_offset + j)
        w = rhs[j].T if transpose_rhs else rhs[j]  # [k, n]
        prod = jnp.dot(lhs.astype(compute), w.astype(compute), preferred_element_type=jnp.float32)
        out = jnp.where(((rows >= start) & (rows < end))[:, None], prod, out)
    return out.astype(out_dtype)


def tgmm_loop(
    lhs: Float[Array, "m k"],
    grad: Float[Array, "m n"],
    group_sizes: Int[Array, " g"],
    *,
    group_offset: Int[Array, ""] | int = 0,
    num_local_groups: int | None = None,
    preferred_element_type=None,
) -> Float[Array, "gl k n"]:
    """Per-group loop for the weight gradient: `out[j] = lhs_g^T @ grad_g`, g = offset + j."""
    out_dtype = _out_dtype(lhs, grad, preferred_element_type)
    compute = jnp.result_type(lhs.dtype, grad.dtype)
    num_local = group_sizes.shape[0] if num_local_groups is None else num_local_groups
    offsets = group_offsets(group_sizes)
    rows = jnp.arange(lhs.shape[0], dtype=jnp.int32)
    outs = []
    for j in range(num_local):
        start, end = _group_bounds(offsets, group_offset + j)
        mask = ((rows >= start) & (rows < end))[:, None]  # [m, 1]
        x = jnp.where(mask, lhs, 0).astype(compute)
        y = jnp.where(mask, grad, 0).astype(compute)
        outs.append(jnp.dot(x.T, y, preferred_element_type=jnp.float32))
    if not outs:
        return jnp.zeros((0, lhs.shape[1], grad.shape[1]), out_dtype)
    return jnp.stack(outs).astype(out_dtype)


def _ragged_sizes(group_sizes, group_offset, num_local):
    """Sizes for ragged_dot with a leading pseudo-group covering rows before the local range.

    Returns `None` when the whole group list is local (no pseudo-group needed).
    """
    if num_local == group_sizes.shape[0] and isinstance(group_offset, int) and group_offset == 0:
        return None
    offsets = group_offsets(group_sizes)
    lead, _ = _group_bounds(offsets, group_offset)
    padded = jnp.concatenate([group_sizes, jnp.zeros((num_local,), group_sizes.dtype)])
    local = jax.lax.dynamic_slice_in_dim(padded, jnp.maximum(group_offset, 0), num_local)
    return jnp.concatenate([lead[None], local]).astype(jnp.int32)  # [1 + GL]


def gmm_ragged_dot(
    lhs: Float[Array, "m k"],
    rhs: Float[Array, "gl k n"] | Float[Array, "gl n k"],
    group_sizes: Int[Array, " g"],
    *,
    transpose_rhs: bool = False,
    preferred_element_type=None,
    group_offset: Int[Array, ""] | int = 0,
) -> Float[Array, "m n"]:
    """`jax.lax.ragged_dot`. With a group offset, rows before the local range form a
    pseudo-group multiplied by zeros (extra work; fine for a reference)."""
    out_dtype = _out_dtype(lhs, rhs, preferred_element_type)
    compute = jnp.result_type(lhs.dtype, rhs.dtype)
    w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs  # [GL, k, n]
    sizes = _ragged_sizes(group_sizes, group_offset, rhs.shape[0])
    if sizes is None:
        sizes = group_sizes
    else:
        w = jnp.concatenate([jnp.zeros_like(w[:1]), w])  # [1 + GL, k, n]
    out = jax.lax.ragged_dot(
        lhs.astype(compute), w.astype(compute), sizes, preferred_element_type=jnp.float32
    )
    return out.astype(out_dtype)


def tgmm_ragged_dot(
    lhs: Float[Array, "m k"],
    grad: Float[Array, "m n"],
    group_sizes: Int[Array, " g"],
    *,
    group_offset: Int[Array, ""] | int = 0,
    num_local_groups: int | None = None,
    preferred_element_type=None,
) -> Float[Array, "gl k n"]:
    """`jax.lax.ragged_dot_general` with the contracting (row) dimension ragged."""
    out_dtype = _out_dtype(lhs, grad, preferred_element_type)
    compute = jnp.result_type(lhs.dtype, grad.dtype)
    num_local = group_sizes.shape[0] if num_local_groups is None else num_local_groups
    sizes = _ragged_sizes(group_sizes, group_offset, num_local)
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([0], [0]), ([], [])),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[],
    )
    out = jax.lax.ragged_dot_general(
        lhs.astype(compute),
        grad.astype(compute),
        group_sizes if sizes is None else sizes,
        dims,
        preferred_element_type=jnp.float32,
    )  # [G or 1 + GL, k, n]
    if sizes is not None:
        out = out[1:]  # drop the pseudo-group of rows before the local range
    return out.astype(out_dtype)


__all__ = ["gmm_loop", "tgmm_loop", "gmm_ragged_dot", "tgmm_ragged_dot"]
