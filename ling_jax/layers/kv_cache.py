"""Per-layer KV cache for decoding: a fixed number of slots with eviction by score.

A cache is a dict of arrays (one per attention layer, in the flax ``"cache"`` collection):

``k``, ``v``  [B, S, Hkv, D]  keys (after RoPE) and values of the held tokens (MLA: values
                              [B, S, Hkv, Dv], their own head size)
``pos``       [B, S] int32    position of the token in each slot, ``-1`` for an empty slot
``score``     [B, S] float32  eviction priority (higher = keep): the pruner's score, or the
                              attention the key received (H2O: accumulated, TOVA: last query)
``keep``      [B, S] bool     hard pruning flag: a key with ``keep=False`` is visible only
                              while it is a sink or inside the query's window

Writing a token takes an empty slot if there is one; otherwise it evicts the slot with the lowest
``(keep ? score : -inf, pos)`` among the keys that are neither sinks nor inside the writing token's
window. So a cache of ``S = budget`` slots holds, for the query at position p, the sinks, the
``window`` most recent tokens and the ``budget - sinks - window`` highest-scoring older tokens: the
same keys :func:`ling_jax.layers.pruning.budget_expiry` makes visible in a parallel forward pass.
Memory is O(S), whatever the context length.

Call order in one decoding step (:meth:`ling_jax.layers.attention.Attention.decode`):
:func:`choose_slot` -> :func:`write` -> :func:`visible` / :func:`attend` -> :func:`update_scores`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ling_jax.routing import top_k_indices
from ling_jax.token_state import DECODE, PREFILL  # noqa: F401  (the token state's cache operations)

EMPTY = -1
_NEG_INF = -1e30
_INT_MAX = np.iinfo(np.int32).max

Cache = dict  # {"k", "v", "pos", "score", "keep"}


def empty(batch: int, slots: int, kv_heads: int, head_dim: int, dtype: Any) -> Cache:
    """A cache with every slot empty."""
    return {
        "k": jnp.zeros((batch, slots, kv_heads, head_dim), dtype),
        "v": jnp.zeros((batch, slots, kv_heads, head_dim), dtype),
        "pos": jnp.full((batch, slots), EMPTY, jnp.int32),
        "score": jnp.zeros((batch, slots), jnp.float32),
        "keep": jnp.ones((batch, slots), bool),
    }


def nbytes(tree: Any) -> int:
    """Bytes held by every array of a cache (or of a whole ``"cache"`` collection)."""
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def protected(pos: Int[Array, "B S"], q_pos: Int[Array, "B"], num_sinks: int, window: int) -> Bool[Array, "B S"]:
    """Sinks and the window of the query at ``q_pos``: keys pruning never hides."""
    return (pos < num_sinks) | ((q_pos[:, None] - pos) < window)


def choose_slot(cache: Cache, q_pos: Int[Array, "B"], num_sinks: int, window: int) -> Int[Array, "B"]:
    """Slot the token at ``q_pos`` goes to: the first empty one, else the eviction victim."""
    pos = cache["pos"]
    empty_slot = pos < 0
    evictable = ~empty_slot & ~protected(pos, q_pos, num_sinks, window)
    prio = jnp.where(cache["keep"], cache["score"], -jnp.inf)
    prio = jnp.where(evictable, prio, jnp.inf)
    lowest = evictable & (prio == jnp.min(prio, axis=1, keepdims=True))  # ties: the oldest goes
    victim = jnp.argmin(jnp.where(lowest, pos, _INT_MAX), axis=1)
    # Unreachable while slots >= sinks + window; keeps a too-small cache sliding instead of stuck.
    oldest = jnp.argmin(jnp.where(pos >= num_sinks, pos, _INT_MAX), axis=1)
    slot = jnp.where(jnp.any(evictable, axis=1), victim, oldest)
    return jnp.where(jnp.any(empty_slot, axis=1), jnp.argmax(empty_slot, axis=1), slot).astype(jnp.int32)


def write(
    cache: Cache,
    slot: Int[Array, "B"],
    k: Float[Array, "B Hkv D"],
    v: Float[Array, "B Hkv Dv"],
    pos: Int[Array, "B"],
    score: Float[Array, "B"],
    keep: Bool[Array, "B"],
    valid: Bool[Array, "B"],
) -> Cache:
    """Writes one token per row into ``slot``; rows with ``valid=False`` are left unchanged."""
    slots = cache["pos"].shape[1]
    rows = jnp.arange(slot.shape[0])
    target = jnp.where(valid, slot, slots)  # out of range: dropped
    put = lambda a, value: a.at[rows, target].set(value.astype(a.dtype), mode="drop")
    return {"k": put(cache["k"], k), "v": put(cache["v"], v), "pos": put(cache["pos"], pos),
            "score": put(cache["score"], score), "keep": put(cache["keep"], keep)}


def visible(cache: Cache, q_pos: Int[Array, "B"], q_valid: Bool[Array, "B"], num_sinks: int, window: int) -> Bool[Array, "B S"]:
    """Slots the query at ``q_pos`` may attend to."""
    pos = cache["pos"]
    seen = (pos >= 0) & (pos <= q_pos[:, None]) & q_valid[:, None]
    return seen & (cache["keep"] | protected(pos, q_pos, num_sinks, window))


def attend(q: Float[Array, "B H D"], cache: Cache, vis: Bool[Array, "B S"]) -> tuple[Float[Array, "B H Dv"], Float[Array, "B H S"]]:
    """One query per row against the cache: (output, attention probabilities), float32 softmax."""
    b, h, d = q.shape
    hkv = cache["k"].shape[2]
    qg = q.reshape(b, hkv, h // hkv, d)  # [B, Hkv, G, D]
    logits = jnp.einsum("bngd,bsnd->bngs", qg, cache["k"], preferred_element_type=jnp.float32) * (d**-0.5)
    logits = jnp.where(vis[:, None, None], logits, _NEG_INF)  # [B, Hkv, G, S]
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    p = jnp.where(jnp.any(vis, axis=-1)[:, None, None, None], p, 0.0)
    out = jnp.einsum("bngs,bsnd->bngd", p.astype(cache["v"].dtype), cache["v"])  # [B, Hkv, G, D]
    return out.reshape(b, h, -1), p.reshape(b, h, -1)  # value dim may differ from D (MLA)


def update_scores(cache: Cache, probs: Float[Array, "B H S"], policy: str, valid: Bool[Array, "B"]) -> Cache:
    """Attention-driven priorities: H2O adds the attention each key received (summed over heads),
    TOVA replaces it by the current query's attention."""
    received = jnp.sum(probs, axis=1)  # [B, S]
    if policy == "h2o":
        new = cache["score"] + received
    elif policy == "tova":
        new = received
    else:
        raise ValueError(f"attention-driven cache policy must be 'h2o' or 'tova', got {policy!r}")
    return {**cache, "score": jnp.where(valid[:, None], new, cache["score"])}


def held_by_last_query(mask) -> Bool[Array, "B T"]:
    """Keys of an ``AttentionMask`` visible to each row's last valid query: what a cache holds
    after a prefill of the sequence (and the sequence compaction keeps under a budget)."""
    q_valid = mask.q_valid
    t = q_valid.shape[1]
    if t == 0:  # no query at all: no key is seen
        return jnp.zeros(mask.kv_valid.shape, bool)
    last = t - 1 - jnp.argmax(q_valid[:, ::-1], axis=1)  # [B]
    last_pos = jnp.take_along_axis(mask.q_positions, last[:, None], axis=1)  # [B, 1]
    row = mask.replace(q_positions=last_pos, q_valid=jnp.any(q_valid, axis=1, keepdims=True))
    return row.dense()[0][:, 0]


def from_sequence(
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv Dv"],
    positions: Int[Array, "B T"],
    held: Bool[Array, "B T"],
    rank: Float[Array, "B T"],
    score: Float[Array, "B T"],
    keep: Bool[Array, "B T"],
    slots: int,
) -> Cache:
    """A cache of ``slots`` slots holding the ``held`` tokens of a prefilled sequence.

    If more than ``slots`` tokens are held, the highest ``rank`` ones stay (callers rank sinks and
    the window first).
    """
    b, t = held.shape
    if t < slots:  # pad the sequence with unheld tokens
        pad = lambda a, value: jnp.concatenate([a, jnp.full((b, slots - t) + a.shape[2:], value, a.dtype)], axis=1)
        k, v, positions, held = pad(k, 0), pad(v, 0), pad(positions, EMPTY), pad(held, False)
        rank, score, keep = pad(rank, 0.0), pad(score, 0.0), pad(keep, True)
    key = jnp.where(held, rank, -jnp.inf)
    idx = top_k_indices(key, slots)  # [B, S]
    take = lambda a: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
    is_held = take(held)
    return {"k": take(k), "v": take(v), "pos": jnp.where(is_held, take(positions), EMPTY),
            "score": jnp.where(is_held, take(score), 0.0).astype(jnp.float32), "keep": take(keep) | ~is_held}
