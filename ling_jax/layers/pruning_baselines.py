"""Training-free pruning policies, behind the same interface as the learned scorer.

Each gives every token a *priority* (higher = keep) that the budget rule ranks exactly like the
learned score (see :func:`ling_jax.layers.pruning.budget_expiry` and
:mod:`ling_jax.layers.kv_cache`), so every policy runs at the same budget:

``random``  a fixed pseudo-random number per (position, layer, seed): random eviction
``window``  the position: the most recent keys win, i.e. sinks + a recent window (StreamingLLM)
``oracle``  the task's oracle mask (1 for tokens that carry the answer, ties to recency)
``h2o``     heavy hitters: the attention a key has accumulated from all queries so far
``tova``    the attention the current query gives the key
``snapkv``  prompt-end voting (SnapKV): the attention a key receives from the prompt's last
            ``SNAPKV_OBSERVE`` queries, max-pooled over ``SNAPKV_POOL`` neighbouring keys

These three read the attention of the layer itself. While decoding they live in the KV cache
(:func:`ling_jax.layers.kv_cache.update_scores`: H2O accumulates, TOVA replaces, SnapKV keeps its
prompt scores and gives generated tokens none, so they leave once out of the window). A cache
prefill (``TokenState.cache_op == "prefill"``) scores the whole prompt in one pass with
:func:`received_attention` (H2O: every prompt query; TOVA: the last one; SnapKV: the last
window), which is what the layer would know after reading the prompt. A plain parallel forward
pass refuses them: H2O's score of a key would then use later queries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

TOKEN_POLICIES = ("random", "window", "oracle")  # a priority per token, known when it is written
ATTENTION_POLICIES = ("h2o", "tova")  # priorities updated by the attention each decoded query gives
PREFILL_ATTENTION_POLICIES = ("h2o", "tova", "snapkv")  # priorities from the prompt's attention
SNAPKV_OBSERVE = 16  # SnapKV's observation window: the prompt's last queries vote
SNAPKV_POOL = 7  # SnapKV's pooling kernel over neighbouring keys


def observing_queries(kind: str, length: int) -> int:
    """How many of the prompt's last queries score the keys under ``kind``."""
    return {"h2o": length, "tova": 1, "snapkv": min(SNAPKV_OBSERVE, length)}[kind]


def received_attention(q: Float[Array, "B Q H D"], k: Float[Array, "B T Hkv D"], q_positions: Int[Array, "B Q"],
                       q_valid: Bool[Array, "B Q"], kv_positions: Int[Array, "B T"], kv_valid: Bool[Array, "B T"],
                       kind: str) -> Float[Array, "B T"]:
    """Causal softmax attention of the queries ``q`` over the keys ``k``, summed over heads and
    queries: the attention each key receives (``kind="snapkv"`` max-pools it over neighbours)."""
    b, nq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, nq, hkv, h // hkv, d).astype(jnp.float32)  # [B, Q, Hkv, G, D]
    logits = jnp.einsum("bqkgd,btkd->bkgqt", qg, k.astype(jnp.float32)) * d ** -0.5  # [B, Hkv, G, Q, T]
    vis = (q_positions[:, :, None] >= kv_positions[:, None, :]) & q_valid[:, :, None] & kv_valid[:, None, :]  # [B, Q, T]
    vis = vis[:, None, None]
    logits = jnp.where(vis, logits, -1e30)
    probs = jnp.where(vis, jax.nn.softmax(logits, axis=-1), 0.0)
    received = jnp.sum(probs, axis=(1, 2, 3))  # [B, T]
    if kind == "snapkv":
        received = jax.lax.reduce_window(received, -jnp.inf, jax.lax.max, (1, SNAPKV_POOL), (1, 1), "SAME")
    return jnp.where(kv_valid, received, 0.0)


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
