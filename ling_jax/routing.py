"""Token-selection primitives shared by pruning, Mixture-of-Depths and MoE.

Shapes stay static under ``jit``: a variable number of selected tokens becomes a static
capacity ``C`` plus a validity mask. ``compact`` gathers selected tokens (in their original
order) into ``[B, C, ...]``; ``expand`` scatters results back to ``[B, T, ...]``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def capacity_for(seq_len: int, fraction: float) -> int:
    """Static capacity for keeping `fraction` of `seq_len` tokens (at least one)."""
    return max(1, min(seq_len, int(round(seq_len * fraction))))


def bucket_sizes(seq_len: int, fractions: tuple[float, ...]) -> tuple[int, ...]:
    """Static capacities for a variable number of selected tokens: ``capacity_for`` of each
    fraction (a fraction of 0 is the empty bucket: nothing selected), sorted and deduplicated.

    A forward pass picks the smallest bucket that holds the batch's real count
    (:func:`choose_bucket`), so a sequence where few tokens are selected computes few.
    """
    return tuple(sorted({0 if f == 0 else capacity_for(seq_len, f) for f in fractions}))


def choose_bucket(selected: Bool[Array, "B T"], sizes: tuple[int, ...]) -> Int[Array, ""]:
    """Index into ``sizes`` of the smallest capacity that holds every row's selected tokens.

    Overflow rule: if the largest bucket is smaller than a row's count, the largest is chosen and
    :func:`selection_indices` keeps the row's first (earliest) selected tokens; the later ones are
    not selected (a causal rule: whether a token fits depends only on earlier tokens).
    """
    count = jnp.max(jnp.sum(selected, axis=1, dtype=jnp.int32))  # the fullest row decides
    fits = jnp.asarray(sizes, jnp.int32) >= count  # [K]
    return jnp.where(jnp.any(fits), jnp.argmax(fits), len(sizes) - 1).astype(jnp.int32)


def within_capacity(selected: Bool[Array, "B T"], capacity: int | Array) -> Bool[Array, "B T"]:
    """The selected tokens that :func:`selection_indices` keeps at ``capacity``: each row's first ones."""
    return selected & (jnp.cumsum(selected, axis=1, dtype=jnp.int32) <= capacity)


def top_k_mask(scores: Float[Array, "B T"], k: int, valid: Optional[Bool[Array, "B T"]] = None) -> Bool[Array, "B T"]:
    """Marks the k highest-scoring valid tokens of each row (ties broken by lower index)."""
    if valid is not None:
        scores = jnp.where(valid, scores, -jnp.inf)
    _, idx = jax.lax.top_k(scores, k)  # [B, k]
    mask = jnp.zeros(scores.shape, bool).at[jnp.arange(scores.shape[0])[:, None], idx].set(True)
    if valid is not None:
        mask &= valid
    return mask


def threshold_mask(scores: Float[Array, "B T"], threshold: float | Array) -> Bool[Array, "B T"]:
    """Keep tokens whose score is at least `threshold`."""
    return scores >= threshold


def selection_indices(selected: Bool[Array, "B T"], capacity: int) -> tuple[Int[Array, "B C"], Bool[Array, "B C"]]:
    """Indices of the first `capacity` selected tokens of each row, in order, and their validity.

    Unused slots point at index 0 and are marked invalid. Selected tokens beyond the capacity
    are dropped (callers size the capacity so that this cannot happen, or accept the drop).
    """
    t = selected.shape[1]
    # Sort key: selected tokens first, by position; unselected after them.
    key = jnp.where(selected, 0, t) + jnp.arange(t)[None, :]  # [B, T]
    order = jnp.argsort(key, axis=1)[:, :capacity]  # [B, C]
    valid = jnp.take_along_axis(selected, order, axis=1)
    return jnp.where(valid, order, 0), valid


def compact(x: Array, indices: Int[Array, "B C"]) -> Array:
    """Gathers rows: x [B, T, ...] -> [B, C, ...]."""
    idx = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def expand(values: Array, indices: Int[Array, "B C"], valid: Bool[Array, "B C"], base: Array) -> Array:
    """Scatters values [B, C, ...] into a copy of base [B, T, ...] at valid slots; other rows keep base."""
    b = jnp.arange(values.shape[0])[:, None]
    # Invalid slots point out of bounds and are dropped, so they never collide with a valid slot.
    target = jnp.where(valid, indices, base.shape[1])
    return base.at[b, target].set(values.astype(base.dtype), mode="drop")


def sort_by_group(group_ids: Int[Array, "N"], num_groups: int) -> tuple[Int[Array, "N"], Int[Array, "N"], Int[Array, "G"]]:
    """Stable sort of items by group: (order, inverse permutation, group sizes).

    ``x[order]`` lists items grouped by id; ``y[inverse]`` undoes it. Empty groups have size 0.
    Ids must lie in ``[0, num_groups)``.
    """
    n = group_ids.shape[0]
    iota = jnp.arange(n, dtype=jnp.int32)
    if num_groups * max(n, 1) < 2**31:
        # One unstable sort of the unique key (id, index) is a stable sort by id, and on CPU it
        # is ~3x faster than argsort(stable=True), which sorts (key, index) pairs.
        key = group_ids.astype(jnp.int32) * n + iota  # [N]
        order = jax.lax.sort(key) % max(n, 1)
    else:
        order = jnp.argsort(group_ids, stable=True).astype(jnp.int32)
    inverse = jnp.zeros((n,), jnp.int32).at[order].set(iota, unique_indices=True)
    sizes = jnp.bincount(group_ids, length=num_groups).astype(jnp.int32)
    return order, inverse, sizes
