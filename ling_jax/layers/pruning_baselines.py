"""Training-free pruning policies, behind the same interface as the learned scorer.

Each gives every token a *priority* (higher = keep) that the budget rule ranks exactly like the
learned score (see :func:`ling_jax.layers.pruning.budget_expiry` and
:mod:`ling_jax.layers.kv_cache`), so every policy runs at the same budget:

``random``  a fixed pseudo-random number per (position, layer, seed): random eviction
``window``  the position: the most recent keys win, i.e. sinks + a recent window (StreamingLLM)
``oracle``  the task's oracle mask (1 for tokens that carry the answer, ties to recency)
``h2o``     heavy hitters: the attention a key has accumulated from all queries so far
``tova``    the attention the current query gives the key

``h2o`` and ``tova`` read the attention of the layer itself, so they live in the KV-cache decode
path (:func:`ling_jax.layers.kv_cache.update_scores`); a parallel forward pass cannot apply them.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

TOKEN_POLICIES = ("random", "window", "oracle")  # a priority per token, known when it is written
ATTENTION_POLICIES = ("h2o", "tova")  # priorities from the attention the key receives


def random_priority(positions: Int[Array, "B T"], layer: int, seed: int) -> Float[Array, "B T"]:
    """Uniform [0, 1) per (position, layer, seed): a stateless integer hash (murmur3 finaliser)."""
    x = positions.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)
    x = x ^ jnp.uint32((layer * 0x85EBCA77 + seed * 0xC2B2AE3D + 0x27D4EB2F) & 0xFFFFFFFF)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    x = x ^ (x >> 16)
    return (x >> 8).astype(jnp.float32) / float(1 << 24)


def window_priority(positions: Int[Array, "B T"]) -> Float[Array, "B T"]:
    """More recent = higher: a budget then keeps the sinks and the most recent keys."""
    return positions.astype(jnp.float32)


def oracle_priority(oracle: Bool[Array, "B T"]) -> Float[Array, "B T"]:
    """Oracle tokens first; among equals the budget rule prefers the most recent."""
    return oracle.astype(jnp.float32)
