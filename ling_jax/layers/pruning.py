"""Learned dynamic token pruning: scores, soft (training) and hard (inference) key masks.

A :class:`TokenPruner` runs before attention on each pruning layer (``ModelConfig.pruning_layers``).
It scores every token (higher = keep) and tightens the block's :class:`AttentionMask`; layers above
inherit the mask until the next pruning layer. Sinks (the first ``num_sinks`` positions) and each
query's ``window`` most recent tokens are never hidden.

* **soft** (training): ``log_keep = log sigmoid(score / temperature)`` is added to the attention
  logits of the other keys; the temperature anneals toward a hard decision and
  ``loss_pruning_keep = weight * (mean keep probability - target)^2`` drives the keep ratio.
* **hard / threshold**: key j is kept iff ``sigmoid(score_j) >= threshold`` (the soft mask with
  binarised keep probabilities).
* **hard / budget**: each query sees at most ``budget`` keys: the sinks, its window and the
  ``budget - sinks - window`` highest-priority older keys. Because a key that falls out of this set
  never returns, the rule is a per-key *expiry position* (:func:`budget_expiry`), and it selects
  exactly what a ``budget``-slot KV cache that evicts its lowest-priority entry holds
  (:mod:`ling_jax.layers.kv_cache`). The priority is the cascaded keep log-probability at
  temperature 1 (ranking, not a threshold: binarising at 0.5 loses keys that the soft-trained
  model still reads through a negative bias).
* **cascade**: keep flags AND and log keep-probabilities add across pruning layers.
* **compaction** (hard): the pruner marks the tokens that stay in the sequence
  (``TokenState.prune_select``); the Transformer drops the others for all later layers
  (:mod:`ling_jax.layers.pruning_compaction`). Threshold rule: kept tokens and sinks (causal, at
  most ``budget`` of them, the earliest first). Budget rule: the keys the last query sees.

Every decision about token j depends only on tokens at positions <= j, except compaction under the
budget rule, which keeps what the end of the sequence needs (like any prompt-compression cache).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ling_jax.config import ModelConfig, PruningConfig
from ling_jax.layers import kv_cache
from ling_jax.layers.attention import AttentionMask
from ling_jax.layers.pruning_baselines import (
    ATTENTION_POLICIES, oracle_priority, random_priority, window_priority,
)
from ling_jax.layers.pruning_scorers import LinearScorer, LowRankScorer
from ling_jax.policy import policy_of
from ling_jax.token_state import TokenState

# Carry keys (per-token arrays follow the tokens through compaction).

NEVER = np.iinfo(np.int32).min  # expiry of a key no query beyond its window may see
FOREVER = np.iinfo(np.int32).max


def temperature(pc: PruningConfig, step: Optional[int | Array]) -> Array:
    """Soft-mask temperature: geometric from ``temperature`` to ``final_temperature`` over
    ``anneal_steps`` (without a step, e.g. in evaluation: the final one)."""
    if pc.anneal_steps == 0:
        return jnp.float32(pc.temperature)
    if step is None:
        return jnp.float32(pc.final_temperature)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / pc.anneal_steps, 0.0, 1.0)
    return jnp.float32(pc.temperature) * (pc.final_temperature / pc.temperature) ** frac


def soft_log_keep(score: Float[Array, "*shape"], temp: float | Float[Array, ""]) -> Float[Array, "*shape"]:
    """Log keep-probability of the soft mask."""
    return jax.nn.log_sigmoid(score / temp)


def hard_keep(score: Float[Array, "B T"], threshold: float | Array) -> Bool[Array, "B T"]:
    """Keep flags of the threshold rule: the soft keep-probability binarised at ``threshold``."""
    return jax.nn.sigmoid(score) >= threshold


def budget_expiry(
    priority: Float[Array, "B T"],
    candidate: Bool[Array, "B T"],
    positions: Int[Array, "B T"],
    keep_others: int,
    window: int,
    block: int = 32,
) -> Int[Array, "B T"]:
    """Per-key expiry of the budget rule (tokens in position order along T).

    A query at position p sees candidate j outside its window iff fewer than ``keep_others``
    candidates that beat j (higher priority; ties: the more recent) have left the window, i.e.
    iff ``p < expiry[j]`` = (position of the ``keep_others``-th candidate beating j) + window.
    That is the greedy cache: once ``keep_others`` better keys are held, j is evicted for good.
    Causal: whether p sees j depends only on tokens at positions <= p.

    The ``keep_others``-th beater is found in two steps, without a running count over all
    ``T x T`` pairs (a ``[T, T]`` cumsum was most of what prefill compaction added to the first
    layer on CPU): beaters are counted per ``block`` of tokens in one pass over the pairs, which
    finds the block holding the ``keep_others``-th; a running count inside that block finds it.
    Cost O(B T^2) comparisons plus O(B T block).
    """
    if keep_others <= 0:
        return jnp.full(priority.shape, NEVER, jnp.int32)
    b, t = priority.shape
    block = max(1, min(t, block))
    blocks = -(-t // block)
    pad = ((0, 0), (0, blocks * block - t))  # padded tokens are no candidates
    beater = (jnp.pad(priority, pad), jnp.pad(positions, pad), jnp.pad(candidate, pad))  # [B, blocks * block] each
    pj, posj = priority[:, :, None], positions[:, :, None]  # [B, T(key), 1]

    def beats(pi, posi, ci):  # beaters [B, 1 or T, N] each -> [B, T(key), N]
        return ci & ((pi > pj) | ((pi == pj) & (posi > posj)))

    per_block = jnp.sum(beats(*(v[:, None, :] for v in beater)).reshape(b, t, blocks, block), axis=3,
                        dtype=jnp.int32)  # [B, T, blocks]
    short = jnp.cumsum(per_block, axis=2) < keep_others  # [B, T, blocks]: not reached by the end of the block
    found = jnp.sum(short, axis=2, dtype=jnp.int32)  # [B, T]: block of the keep_others-th beater (blocks: none)
    before = jnp.sum(jnp.where(short, per_block, 0), axis=2)  # [B, T]: beaters in the blocks before it
    rows = jnp.minimum(found, blocks - 1)[:, :, None] * block + jnp.arange(block, dtype=jnp.int32)  # [B, T, block]
    inside = beats(*(jnp.take_along_axis(v, rows.reshape(b, t * block), axis=1).reshape(b, t, block) for v in beater))
    count = before[:, :, None] + jnp.cumsum(inside, axis=2, dtype=jnp.int32)  # [B, T, block]
    kth = found * block + jnp.sum(count < keep_others, axis=2, dtype=jnp.int32)  # [B, T]: index of the beater
    expiry = jnp.take_along_axis(positions, jnp.minimum(kth, t - 1), axis=1) + window
    return jnp.where(found < blocks, expiry, FOREVER).astype(jnp.int32)


class TokenPruner(nn.Module):
    """Scores tokens and tightens the attention mask: ``(h, mask, state) -> (mask, state)``.

    Its per-token state (:class:`~ling_jax.token_state.TokenState`): ``prune_keep`` (cascaded
    hard keep flags), ``prune_priority`` (ranking / KV-cache eviction priority of the last pruning
    layer), ``prune_log_keep`` (cascaded soft log keep-probability), ``prune_select`` (compaction:
    tokens that stay in the sequence after this block); inputs ``oracle`` and ``step``."""

    config: ModelConfig
    layer_index: int

    @nn.compact
    def __call__(self, h: Float[Array, "B T E"], mask: AttentionMask, state: TokenState,
                 received: Optional[Float[Array, "B T"]] = None) -> tuple[AttentionMask, TokenState]:
        """``received``: the attention each token receives in this layer (attention-driven baselines
        in a cache prefill, :func:`ling_jax.layers.pruning_baselines.received_attention`)."""
        cfg, pc = self.config, self.config.pruning
        cache_op = state.cache_op
        valid, positions = mask.kv_valid, mask.kv_positions
        b, t = valid.shape
        cascade = pc.cascade and state.prune_keep is not None
        mask = mask.replace(num_sinks=pc.num_sinks, window=pc.window, kv_keep=None, kv_log_keep=None, kv_expire=None)

        if pc.baseline == "learned":
            scorer = LowRankScorer(pc.scorer_rank, name="scorer") if pc.scorer == "lowrank" else LinearScorer(name="scorer")
            score = scorer(h, valid, cache_op)  # [B, T] keep logits
            per_token = scorer.flops_per_token(cfg.d_model, pc.scorer_rank)
            self.sow("intermediates", "flops_pruning_scorer", jnp.float32(b * t * per_token))
            if pc.mode == "soft":
                return self._soft(score, mask, state)
            threshold = policy_of(cfg, state).prune_threshold  # traced: a threshold sweep compiles once
            own_keep = hard_keep(score, threshold) if pc.inference_rule == "threshold" else jnp.ones((b, t), bool)
            priority = jax.nn.log_sigmoid(score)  # cascaded keep log-probability at temperature 1
            if pc.cascade and state.prune_priority is not None:
                priority = priority + state.prune_priority
        elif pc.baseline == "oracle":
            if state.oracle is None:
                raise ValueError("baseline='oracle' needs the task's oracle mask: pass state=TokenState(oracle=mask [B, T])")
            oracle = state.oracle.astype(bool)
            own_keep = oracle if pc.inference_rule == "threshold" else jnp.ones((b, t), bool)
            priority = oracle_priority(oracle)
        elif pc.baseline == "random":
            own_keep, priority = jnp.ones((b, t), bool), random_priority(positions, self.layer_index, pc.seed)
        elif pc.baseline == "window":
            own_keep, priority = jnp.ones((b, t), bool), window_priority(positions)
        else:  # h2o / tova / snapkv: keys are scored by the attention they receive
            own_keep = jnp.ones((b, t), bool)
            if cache_op == kv_cache.DECODE:  # the KV cache updates the scores (new tokens start at 0)
                priority = jnp.zeros((b, t), jnp.float32)
            elif cache_op == kv_cache.PREFILL and received is not None:  # the prompt's attention, one pass
                priority = received
            else:
                raise ValueError(
                    f"baseline={pc.baseline!r} scores keys by the attention they receive: run it through a KV-cache "
                    "prefill or decoding (ling_jax.generate, ling_jax.request_eval), not a plain forward pass")
        keep = own_keep & state.prune_keep if cascade else own_keep
        state = state.replace(prune_keep=keep, prune_priority=priority)
        mask = mask.replace(kv_keep=keep)
        if pc.inference_rule == "budget" and cache_op != kv_cache.DECODE:
            candidate = keep & valid & (positions >= pc.num_sinks)
            expiry = budget_expiry(priority, candidate, positions, pc.budget - pc.num_sinks - pc.window, pc.window)
            mask = mask.replace(kv_expire=expiry)

        if pc.inference_rule == "budget":
            kept = kv_cache.held_by_last_query(mask)
        else:
            kept = (keep | (positions < pc.num_sinks)) & valid
        self.sow("intermediates", "tokens_kept", jnp.sum(kept, dtype=jnp.float32))
        if pc.compaction and cache_op != kv_cache.DECODE:
            state = state.replace(prune_select=kept)
        return mask, state

    def _soft(self, score: Float[Array, "B T"], mask: AttentionMask, state: TokenState) -> tuple[AttentionMask, TokenState]:
        """Training: log keep-probabilities on the logits, and the keep-ratio regulariser."""
        cfg, pc = self.config, self.config.pruning
        log_keep = soft_log_keep(score, temperature(pc, state.step))
        if pc.cascade and state.prune_log_keep is not None:
            log_keep = log_keep + state.prune_log_keep
        state = state.replace(prune_log_keep=log_keep, prune_priority=log_keep)
        prunable = (mask.kv_valid & (mask.kv_positions >= pc.num_sinks)).astype(jnp.float32)
        keep_prob = jnp.exp(log_keep)
        mean_keep = jnp.sum(keep_prob * prunable) / jnp.maximum(jnp.sum(prunable), 1.0)
        weight = pc.regularizer_weight / max(len(cfg.pruning_layers), 1)
        self.sow("intermediates", "loss_pruning_keep", weight * (mean_keep - pc.target_keep_ratio) ** 2)
        self.sow("intermediates", "pruning_keep_ratio", mean_keep)
        self.sow("intermediates", "tokens_kept", jnp.sum(keep_prob * mask.kv_valid, dtype=jnp.float32))
        return mask.replace(kv_log_keep=log_keep), state
