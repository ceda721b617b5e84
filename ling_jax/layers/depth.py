"""Adaptive depth: Mixture-of-Depths routing and confidence-based early exit around each block.

When ``config.depth`` enables either mechanism, the Transformer wraps every block ``i`` in a
:class:`DepthLayer` (parameters under ``block_{i}_depth``) that

* on Mixture-of-Depths layers scores tokens with a router and runs the block on the selected ones
  only: compacted to a static capacity (training, or ``mod_inference="topk"``), or masked with a
  causal per-token decision (inference). Unselected tokens pass on the residual and, in the
  masked path, give no keys or values to the block's attention (as in the compacted path);
* freezes tokens that exited earlier (inference; in training a random ``exit_train_freeze``
  fraction, given a ``"depth"`` rng): their hidden state is carried up unchanged, the block still
  computes their keys and values from it (so later tokens can attend to them) but not their
  queries, attention output or MLP, and their output logits are those of their exit head;
* on exit layers evaluates the exit head (own RMSNorm + the shared output head) and the exit
  classifier; in training sows the weighted exit cross-entropy (``loss_exit``), in inference
  decides which tokens exit now.

Per-token state lives in the block ``carry`` under ``depth_*`` keys, so it follows any sequence
compaction; seeding the carry with ``{EXIT_THRESHOLD: value}`` (``Transformer(carry=...)``) sweeps
the exit threshold without recompiling (the value is not range-checked). Statistics go to
``intermediates`` (ledger counts, ``depth_layer_tokens`` / ``depth_tokens`` for layers used per
token, MoD predictor accuracy counts) and per-token decisions to the ``depth`` collection
(``mod_routed``, ``exit_confidence``, ``exit_layer``, ``layers_used``; never at init).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ling_jax.config import ModelConfig
from ling_jax.layers.attention import AttentionMask
from ling_jax.layers.basics import RMSNorm
from ling_jax.ledger import sown_total
from ling_jax.layers.depth_exit import (
    classifier_bce, exit_cross_entropy, exit_points, saturation_confidence, softmax_features, threshold_at,
)
from ling_jax.layers.depth_mod import (
    MoDRouter, SmallMLP, causal_selection, predictor_bce, predictor_routes, rms_normalize, router_flops_per_token,
    run_compacted, small_mlp_flops, topk_selection, weighted_update,
)
from ling_jax.routing import compact, expand, selection_indices

EXITED = "depth_exited"  # [B, T] bool: the token exited at an earlier layer (inference)
EXIT_LOGITS = "depth_exit_logits"  # [B, T, V] float32: logits of the exit head it left at
EXIT_LAYER = "depth_exit_layer"  # [B, T] int32: layer it exited after (num_layers - 1: never)
LAYERS_USED = "depth_layers_used"  # [B, T] int32: blocks that updated the token so far
EXIT_THRESHOLD = "depth_exit_threshold"  # optional seed: a traced threshold replacing config.exit_threshold
COUNT_QUERIES = "depth_count_queries"  # flag: the block counts only tokens with a valid query
_PRED, _CLS = "depth_exit_pred_", "depth_exit_cls_"  # training: per exit layer greedy token / classifier logit


def enabled(cfg: ModelConfig) -> bool:
    return cfg.depth.mod_enabled or cfg.depth.exit_enabled


def _exiting(cfg: ModelConfig) -> bool:
    """Tokens can exit in this forward pass: inference, or training with ``exit_train_freeze``."""
    depth = cfg.depth
    return depth.exit_enabled and bool(exit_points(cfg)) and (depth.mode == "infer" or depth.exit_train_freeze > 0)


def computed_tokens(x: Float[Array, "B T E"], mask: AttentionMask, carry: Mapping[str, Any]) -> Float[Array, ""]:
    """Tokens a block really computes: all of them, or (adaptive-depth inference) the live queries."""
    if COUNT_QUERIES in carry:
        return jnp.sum(mask.q_valid, dtype=jnp.float32)
    return jnp.float32(x.shape[0] * x.shape[1])


def start_carry(cfg: ModelConfig, b: int, t: int) -> dict:
    """Initial per-token depth state for a forward pass."""
    if not enabled(cfg):
        return {}
    used = {LAYERS_USED: jnp.zeros((b, t), jnp.int32)}
    if not _exiting(cfg):
        return used
    return {**used, EXITED: jnp.zeros((b, t), bool), EXIT_LOGITS: jnp.zeros((b, t, cfg.vocab_size), jnp.float32),
            EXIT_LAYER: jnp.full((b, t), cfg.num_layers - 1, jnp.int32)}


def sow_decision(module: nn.Module, name: str, value: Array) -> None:
    """Records a per-token decision in the ``depth`` collection (not at init: it is no state)."""
    if not module.is_initializing():
        module.sow("depth", name, value)


def _kv_flops_per_token(cfg: ModelConfig) -> float:
    return 2.0 * cfg.d_model * 2 * cfg.num_kv_heads * cfg.resolved_head_dim


def _masked_block(block, x, mask: AttentionMask, carry: dict, q_on, kv_on):
    """Runs the block on all tokens with queries only for ``q_on`` and keys only for ``kv_on``."""
    inner = mask.replace(q_valid=mask.q_valid & q_on, kv_valid=mask.kv_valid if kv_on is None else mask.kv_valid & kv_on)
    out, new_mask, carry = block(x, inner, {**carry, COUNT_QUERIES: jnp.bool_(True)})
    carry = {k: v for k, v in carry.items() if k != COUNT_QUERIES}
    if out.shape != x.shape:
        raise ValueError(f"adaptive depth needs blocks that keep their input shape {x.shape}, got {out.shape}")
    kv_only = jnp.sum(inner.kv_valid & ~inner.q_valid, dtype=jnp.float32)
    return out, new_mask.replace(q_valid=mask.q_valid, kv_valid=mask.kv_valid), carry, kv_only


class DepthLayer(nn.Module):
    """Wraps block ``layer_index`` with Mixture-of-Depths routing, exit freezing and an exit head."""

    config: ModelConfig
    layer_index: int

    @nn.compact
    def __call__(self, block: Callable, head: Callable, x: Float[Array, "B T E"], mask: AttentionMask, carry: dict,
                 targets: Optional[Int[Array, "B T"]] = None, loss_mask: Optional[Float[Array, "B T"]] = None,
                 forced_exit: Optional[Int[Array, "B T"]] = None) -> tuple[Array, AttentionMask, dict]:
        cfg, i = self.config, self.layer_index
        b, t = x.shape[:2]
        valid = mask.q_valid
        exiting = _exiting(cfg)
        exited = carry[EXITED] if exiting else jnp.zeros((b, t), bool)
        own = {k: v for k, v in carry.items() if k.startswith("depth_")}
        blk = {k: v for k, v in carry.items() if not k.startswith("depth_")}
        x_in = x
        kv_only = jnp.float32(0.0)
        if i in cfg.mod_layers:
            x, mask, blk, updated, kv_only = self._routed(block, x, mask, blk, exited, exiting)
        elif exiting:
            out, mask, blk, kv_only = _masked_block(block, x, mask, blk, ~exited, None)
            updated = ~exited
            x = jnp.where(updated[..., None], out, x)
        else:
            x, mask, blk = block(x, mask, blk)
            updated = jnp.ones((b, t), bool)
        self.sow("intermediates", "depth_layer_tokens", jnp.sum(updated & valid, dtype=jnp.float32))
        own[LAYERS_USED] = own[LAYERS_USED] + updated
        if exiting:
            self.sow("intermediates", "flops_exit_kv", kv_only * _kv_flops_per_token(cfg))
        if i in exit_points(cfg):
            own = self._exit(head, x, x_in, updated, mask, own, exited, targets, loss_mask, forced_exit)
        return x, mask, {**blk, **own}

    def _routed(self, block, x, mask, carry, exited, exiting):
        """Mixture-of-Depths: returns (x, mask, carry, updated tokens, key/value-only token count)."""
        cfg, depth = self.config, self.config.depth
        b, t = x.shape[:2]
        valid = mask.q_valid
        scores, predictor = MoDRouter(cfg, name="mod")(x)  # [B, T] each
        topk, capacity = topk_selection(scores, depth.mod_capacity, valid)
        prob = jax.nn.sigmoid(scores)
        infer = depth.mode == "infer"
        compacted = not infer or depth.mod_inference == "topk"
        routed = topk if compacted else causal_selection(cfg, scores, predictor) & valid

        n_valid = jnp.sum(valid, dtype=jnp.float32)
        self.sow("intermediates", "mod_predictor_correct", jnp.sum((predictor_routes(cfg, predictor) == topk) & valid, dtype=jnp.float32))
        self.sow("intermediates", "mod_predictor_total", n_valid)
        self.sow("intermediates", "mod_routed_tokens", jnp.sum(routed, dtype=jnp.float32))
        self.sow("intermediates", "flops_mod_router", jnp.float32(b * t * router_flops_per_token(cfg)))
        sow_decision(self, "mod_routed", routed)
        if not infer:
            weight = depth.aux_loss_weight / len(cfg.mod_layers)
            self.sow("intermediates", "loss_mod_predictor",
                     weight * predictor_bce(predictor, jax.lax.stop_gradient(topk), valid))

        if compacted:
            indices, slot_valid = selection_indices(topk, capacity)  # [B, C] each
            query_off = exited if exiting else None
            if exiting:
                carry = {**carry, COUNT_QUERIES: jnp.bool_(True)}
            x_c, out_c, mask, carry = run_compacted(block, x, mask, carry, indices, slot_valid, query_off)
            carry = {k: v for k, v in carry.items() if k != COUNT_QUERIES}
            y_c = weighted_update(cfg, x_c, out_c, compact(prob, indices))  # [B, C, E]
            if exiting:
                y_c = jnp.where(compact(exited, indices)[..., None], x_c, y_c)  # exited: carried up
            x = expand(y_c, indices, slot_valid, x)
            kv_only = jnp.sum(routed & exited, dtype=jnp.float32)
            return x, mask, carry, routed & ~exited, kv_only
        updated = routed & ~exited
        out, mask, carry, kv_only = _masked_block(block, x, mask, carry, updated, routed)
        x = jnp.where(updated[..., None], weighted_update(cfg, x, out, prob), x)
        return x, mask, carry, updated, kv_only

    def _exit(self, head, x, x_in, updated, mask, own, exited, targets, loss_mask, forced_exit):
        """Exit head: training losses, and which live tokens exit after this layer."""
        cfg, depth, i = self.config, self.config.depth, self.layer_index
        valid = mask.q_valid
        live = jnp.sum(~exited, dtype=jnp.float32)
        logits = head(x, norm=RMSNorm(cfg.norm_eps, name="exit_norm"), tokens=live)  # [B, T, V] float32
        features = jax.lax.stop_gradient(softmax_features(logits))  # [B, T, 3]
        cls_logit = SmallMLP(depth.predictor_dim, name="exit_classifier")(
            jax.lax.stop_gradient(rms_normalize(x)), features)  # [B, T]
        self.sow("intermediates", "flops_exit_classifier", live * small_mlp_flops(cfg.d_model, depth.predictor_dim))
        points = exit_points(cfg)
        if depth.mode == "train":
            if targets is not None:
                lm = (valid & ~exited).astype(jnp.float32) * (1.0 if loss_mask is None else loss_mask)
                weight = depth.exit_loss_weight / len(points)
                self.sow("intermediates", "loss_exit", weight * exit_cross_entropy(logits, targets, lm))
            own = {**own, f"{_PRED}{i}": jnp.argmax(logits, axis=-1), f"{_CLS}{i}": cls_logit}
            if not (_exiting(cfg) and self.has_rng("depth")):
                return own
            # Random exits, so later layers learn to use carried-up states: each exit point takes
            # an equal share of the `exit_train_freeze` fraction of tokens.
            share = depth.exit_train_freeze / len(points)
            k = points.index(i)
            u = jax.random.uniform(self.make_rng("depth"), valid.shape)
            new = valid & ~exited & (u < share / (1.0 - k * share))
        elif forced_exit is not None:
            new = valid & ~exited & (forced_exit == i)
        else:
            if depth.exit_confidence == "margin":
                conf = features[..., 1]
            elif depth.exit_confidence == "saturation":
                # A token that skipped this block (MoD) did not change: no evidence of saturation.
                conf = jnp.where(updated, saturation_confidence(x, x_in), -1.0)
            else:
                conf = jax.nn.sigmoid(cls_logit)
            sow_decision(self, "exit_confidence", conf)
            thr = threshold_at(depth, mask.q_positions, cfg.max_seq_len, own.get(EXIT_THRESHOLD))
            new = valid & ~exited & (conf > thr)
        return {**own, EXITED: exited | new,
                EXIT_LOGITS: jnp.where(new[..., None], logits, own[EXIT_LOGITS]),
                EXIT_LAYER: jnp.where(new, i, own[EXIT_LAYER])}


def finish(model: nn.Module, x: Float[Array, "B T E"], mask: AttentionMask, carry: dict) -> Float[Array, "B T V"]:
    """Final logits with adaptive depth: exited tokens take their exit head's logits.

    ``model`` is the Transformer (for its ``logits`` head and ``sow``). In training with exit
    heads this also sows the exit classifier's BCE (``loss_exit_classifier``), whose target is
    whether the exit head's greedy token agrees with the final head's (tokens that went the
    whole depth only).
    """
    cfg = model.config
    valid = mask.q_valid
    model.sow("intermediates", "depth_tokens", jnp.sum(valid, dtype=jnp.float32))
    sow_decision(model, "layers_used", carry[LAYERS_USED])
    exited = carry[EXITED] if _exiting(cfg) else None
    logits = model.logits(x, tokens=None if exited is None else jnp.sum(~exited, dtype=jnp.float32))
    points = exit_points(cfg)
    if cfg.depth.exit_enabled and cfg.depth.mode == "train" and points:
        final = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1))
        scored = valid if exited is None else valid & ~exited
        bce = sum(classifier_bce(carry[f"{_CLS}{i}"], carry[f"{_PRED}{i}"] == final, scored) for i in points)
        model.sow("intermediates", "loss_exit_classifier", cfg.depth.aux_loss_weight * bce / len(points))
    if exited is None:
        return logits
    sow_decision(model, "exit_layer", carry[EXIT_LAYER])
    return jnp.where(exited[..., None], carry[EXIT_LOGITS], logits)


# ----------------------------------------------------------------------------- diagnostics


def layers_per_token(cfg: ModelConfig, intermediates: Mapping[str, Any]) -> float:
    """Average number of blocks that updated each valid token (``num_layers`` without adaptive depth)."""
    tokens = sown_total(intermediates, "depth_tokens")
    return sown_total(intermediates, "depth_layer_tokens") / tokens if tokens else float(cfg.num_layers)


def mod_predictor_accuracy(intermediates: Mapping[str, Any]) -> float:
    """Fraction of (token, routed layer) decisions where the causal predictor matches top-k membership."""
    total = sown_total(intermediates, "mod_predictor_total")
    return sown_total(intermediates, "mod_predictor_correct") / total if total else float("nan")
