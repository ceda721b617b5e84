"""Adaptive depth: Mixture-of-Depths routing and confidence-based early exit around each block.

When ``config.depth`` enables either mechanism, the Transformer runs every block ``i`` through
:func:`run_layer`, with the depth parameters of layer ``i`` in a :class:`DepthLayer`
(``block_{i}_depth``: the MoD router, the exit head's norm and the exit classifier).

**Inference** (``depth.mode="infer"``) skips work in the compiled program, not only in the count.
A variable number of tokens is gathered into a static capacity: the smallest of a few buckets
(``depth.infer_buckets``, fractions of the sequence) that holds the batch's real count, chosen
per layer with ``nn.switch`` (:func:`ling_jax.routing.choose_bucket`). Then

* a token that exited earlier is *frozen*: its hidden state is carried up unchanged; the block
  still computes its keys and values (later tokens attend to it) but not its query, attention
  output or feed-forward (``Block(queries=...)``), and no exit head or final head runs on it;
* on a Mixture-of-Depths layer the tokens the causal rule routes (predictor or router threshold,
  thresholds from the call-time :class:`~ling_jax.policy.InferencePolicy`) run the block among
  themselves; the others pass on the residual and give no keys or values there;
* on an exit layer the exit head and the confidence run on the live tokens only.

In decoding (one token per row) the buckets are 0 and 1 rows: once every row has exited, the
remaining layers only write the rows' keys and values into the cache (CALM-style).

**Training** (``depth.mode="train"``): MoD routes the top ``mod_capacity`` of each sequence
(compacted, non-causal); every exit head is evaluated on every token for its loss; with
``exit_train_freeze`` (and a ``"depth"`` rng) a random fraction of tokens exits and is carried up
(masked: computed, and counted as computed).

Per-token state lives in the :class:`~ling_jax.token_state.TokenState` (``layers_used``,
``exited``, ``exit_logits``, ``exit_layer``; in training ``exit_pred`` / ``exit_cls``), so it
follows any sequence compaction (pruning compaction included); the blocks themselves never see it. Statistics go to ``intermediates`` (ledger counts, ``depth_layer_tokens`` /
``depth_tokens`` for layers used per token, MoD predictor accuracy counts) and per-token decisions
to the ``depth`` collection (``mod_routed``, ``exit_confidence``, ``exit_layer``, ``layers_used``;
never at init).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ling_jax.config import ModelConfig
from ling_jax.layers import kv_cache
from ling_jax.layers.attention import AttentionMask
from ling_jax.layers.basics import RMSNorm
from ling_jax.layers.depth_exit import (
    classifier_bce, exit_cross_entropy, exit_points, saturation_confidence, softmax_features, threshold_at,
)
from ling_jax.layers.depth_mod import (
    MoDRouter, SmallMLP, causal_selection, predictor_bce, predictor_routes, rms_normalize, router_flops_per_token,
    run_compacted, small_mlp_flops, topk_selection, weighted_update,
)
from ling_jax.ledger import sown_total
from ling_jax.policy import InferencePolicy, policy_of
from ling_jax.routing import (
    bucket_sizes, token_capacity, choose_bucket, compact, expand, selection_indices, within_capacity,
)
from ling_jax.token_state import TokenState

_DEPTH_FIELDS = ("layers_used", "exited", "exit_logits", "exit_layer", "exit_pred", "exit_cls", "forced_exit")


def enabled(cfg: ModelConfig) -> bool:
    return cfg.depth.mod_enabled or cfg.depth.exit_enabled


def _exiting(cfg: ModelConfig) -> bool:
    """Tokens can exit in this forward pass: inference, or training with ``exit_train_freeze``."""
    depth = cfg.depth
    return depth.exit_enabled and bool(exit_points(cfg)) and (depth.mode == "infer" or depth.exit_train_freeze > 0)


def start_state(cfg: ModelConfig, state: TokenState, b: int, t: int) -> TokenState:
    """``state`` with the initial per-token depth fields of a forward pass."""
    if not enabled(cfg):
        return state
    state = state.replace(layers_used=jnp.zeros((b, t), jnp.int32))
    if not _exiting(cfg):
        return state
    return state.replace(exited=jnp.zeros((b, t), bool), exit_logits=jnp.zeros((b, t, cfg.vocab_size), jnp.float32),
                         exit_layer=jnp.full((b, t), cfg.num_layers - 1, jnp.int32))


def _split(state: TokenState) -> tuple[TokenState, dict]:
    """(the state a block sees: no depth fields, the depth fields)."""
    own = {name: getattr(state, name) for name in _DEPTH_FIELDS}
    return state.replace(layers_used=None, exited=None, exit_logits=None, exit_layer=None, exit_pred=(),
                         exit_cls=(), forced_exit=None), own


def sow_decision(module: nn.Module, name: str, value: Array) -> None:
    """Records a per-token decision in the ``depth`` collection (not at init: it is no state)."""
    if not module.is_initializing():
        module.sow("depth", name, value)


class DepthLayer(nn.Module):
    """Depth parameters of block ``layer_index``; ``__call__`` is the training path."""

    config: ModelConfig
    layer_index: int

    def setup(self):
        cfg, i = self.config, self.layer_index
        if i in cfg.mod_layers:
            self.mod = MoDRouter(cfg)
        if cfg.depth.exit_enabled and i in exit_points(cfg):
            self.exit_norm = RMSNorm(cfg.norm_eps)
            self.exit_classifier = SmallMLP(cfg.depth.predictor_dim)

    def route(self, x: Float[Array, "B T E"], valid: Bool[Array, "B T"],
              policy: Optional[InferencePolicy] = None) -> tuple[Array, Array, Array]:
        """MoD router on every token: (scores, predictor logits, top-k membership) [B, T] each."""
        cfg = self.config
        b, t = x.shape[:2]
        policy = policy or policy_of(cfg, None)
        scores, predictor = self.mod(x)  # [B, T] each
        topk, _ = topk_selection(scores, cfg.depth.mod_capacity, valid)
        routes = predictor_routes(predictor, policy.mod_predictor_threshold)
        self.sow("intermediates", "mod_predictor_correct", jnp.sum((routes == topk) & valid, dtype=jnp.float32))
        self.sow("intermediates", "mod_predictor_total", jnp.sum(valid, dtype=jnp.float32))
        self.sow("intermediates", "flops_mod_router", jnp.float32(b * t * router_flops_per_token(cfg)))
        return scores, predictor, topk

    def exit_head(self, head: Callable, x: Float[Array, "B C E"]) -> tuple[Array, Array, Array]:
        """Exit head on ``x``: (logits [B, C, V], softmax features [B, C, 3], classifier logit [B, C])."""
        b, c = x.shape[:2]
        logits = head(x, norm=self.exit_norm)  # [B, C, V] float32 (the head sows its tokens)
        features = jax.lax.stop_gradient(softmax_features(logits))  # [B, C, 3]
        cls_logit = self.exit_classifier(jax.lax.stop_gradient(rms_normalize(x)), features)  # [B, C]
        self.sow("intermediates", "flops_exit_classifier",
                 jnp.float32(b * c * small_mlp_flops(self.config.d_model, self.config.depth.predictor_dim)))
        return logits, features, cls_logit

    def __call__(self, block: Callable, head: Callable, x: Float[Array, "B T E"], mask: AttentionMask,
                 state: TokenState, targets: Optional[Int[Array, "B T"]] = None,
                 loss_mask: Optional[Float[Array, "B T"]] = None) -> tuple[Array, AttentionMask, TokenState]:
        """Training: compacted top-k MoD, exit heads on every token (losses), random freezing."""
        cfg, i = self.config, self.layer_index
        b, t = x.shape[:2]
        valid = mask.q_valid
        exiting = _exiting(cfg)
        exited = state.exited if exiting else jnp.zeros((b, t), bool)
        blk, own = _split(state)
        if i in cfg.mod_layers:
            x, mask, blk, updated = self._routed(block, x, mask, blk, exited, exiting)
        else:
            inner = mask.replace(q_valid=mask.q_valid & ~exited) if exiting else mask  # frozen: masked, computed
            out, mask, blk = block(x, inner, blk)
            mask = mask.replace(q_valid=valid)
            updated = valid & ~exited
            x = jnp.where(updated[..., None], out, x) if exiting else out
        self.sow("intermediates", "depth_layer_tokens", jnp.sum(updated & valid, dtype=jnp.float32))
        own["layers_used"] = own["layers_used"] + updated
        if i in exit_points(cfg) and cfg.depth.exit_enabled:
            own = self._exit_train(head, x, mask, own, exited, targets, loss_mask)
        return x, mask, blk.replace(**own)

    def _routed(self, block, x, mask, state, exited, exiting):
        """Training MoD: the top ``mod_capacity`` tokens run the block, compacted."""
        cfg, depth = self.config, self.config.depth
        valid = mask.q_valid
        scores, predictor, topk = self.route(x, valid)
        self.sow("intermediates", "mod_routed_tokens", jnp.sum(topk, dtype=jnp.float32))
        sow_decision(self, "mod_routed", topk)
        weight = depth.aux_loss_weight / len(cfg.mod_layers)
        self.sow("intermediates", "loss_mod_predictor",
                 weight * predictor_bce(predictor, jax.lax.stop_gradient(topk), valid))
        x, mask, state = _run_routed(cfg, block, x, mask, state, topk, jax.nn.sigmoid(scores),
                                     token_capacity(x.shape[1], depth.mod_capacity), exited if exiting else None)
        return x, mask, state, topk & ~exited

    def _exit_train(self, head, x, mask, own, exited, targets, loss_mask):
        """Training exit head: its cross-entropy, the classifier's inputs, and random exits."""
        cfg, depth, i = self.config, self.config.depth, self.layer_index
        valid = mask.q_valid
        logits, _, cls_logit = self.exit_head(head, x)
        points = exit_points(cfg)
        if targets is not None:
            lm = (valid & ~exited).astype(jnp.float32) * (1.0 if loss_mask is None else loss_mask)
            weight = depth.exit_loss_weight / len(points)
            self.sow("intermediates", "loss_exit", weight * exit_cross_entropy(logits, targets, lm))
        own = {**own, "exit_pred": own["exit_pred"] + (jnp.argmax(logits, axis=-1),),
               "exit_cls": own["exit_cls"] + (cls_logit,)}
        if not (_exiting(cfg) and self.has_rng("depth")):
            return own
        # Random exits, so later layers learn to use carried-up states: each exit point takes
        # an equal share of the `exit_train_freeze` fraction of tokens.
        share = depth.exit_train_freeze / len(points)
        k = points.index(i)
        u = jax.random.uniform(self.make_rng("depth"), valid.shape)
        new = valid & ~exited & (u < share / (1.0 - k * share))
        return {**own, "exited": exited | new, "exit_logits": jnp.where(new[..., None], logits, own["exit_logits"]),
                "exit_layer": jnp.where(new, i, own["exit_layer"])}


def _run_routed(cfg: ModelConfig, block: Callable, x, mask: AttentionMask, state: TokenState, routed, prob,
                capacity: int, exited: Optional[Array]):
    """MoD block on the routed tokens gathered into ``capacity`` slots: (x, mask, state).

    Routed tokens that exited earlier give keys and values but are not updated (masked queries).
    """
    indices, slot_valid = selection_indices(routed, capacity)  # [B, C] each
    x_c, out_c, mask, state = run_compacted(block, x, mask, state, indices, slot_valid, exited)
    y_c = weighted_update(cfg, x_c, out_c, compact(prob, indices))  # [B, C, E]
    if exited is not None:
        y_c = jnp.where(compact(exited, indices)[..., None], x_c, y_c)  # exited: carried up
    return expand(y_c, indices, slot_valid, x), mask, state


# ----------------------------------------------------------------------------- inference


def _bucketed(model: nn.Module, selected: Bool[Array, "B T"], sizes: tuple[int, ...], make_branch: Callable,
              state: TokenState):
    """Runs ``make_branch(capacity)(model)`` for the smallest bucket holding ``selected``.

    Branches return ``(outputs, state)``; only the per-token part of the state passes through the
    switch, the call context (policy, step) is put back after. Returns (outputs, state, the
    selected tokens that fit the chosen capacity [B, T]).
    """
    if len(sizes) == 1:
        out, new = make_branch(sizes[0])(model)
        return out, new, within_capacity(selected, sizes[0])

    def branch(capacity):
        def run(mdl):
            out, new = make_branch(capacity)(mdl)
            return out, new.without_context()
        return run

    index = choose_bucket(selected, sizes)
    out, new = nn.switch(index, [branch(c) for c in sizes], model)
    return out, new.with_context_of(state), within_capacity(selected, jnp.asarray(sizes, jnp.int32)[index])


def _infer_buckets(cfg: ModelConfig, t: int, *, with_empty: bool = True) -> tuple[int, ...]:
    """``depth.infer_buckets`` as capacities for ``t`` tokens (without the empty one: at least 1)."""
    sizes = bucket_sizes(t, cfg.depth.bucket_fractions)
    return sizes if with_empty else tuple(sorted({max(1, c) for c in sizes}))


def run_layer(model: nn.Module, i: int, x: Float[Array, "B T E"], mask: AttentionMask, state: TokenState,
              targets: Optional[Int[Array, "B T"]] = None, loss_mask: Optional[Float[Array, "B T"]] = None,
              ) -> tuple[Array, AttentionMask, TokenState]:
    """Block ``i`` of ``model`` (the Transformer) with adaptive depth: training or inference path."""
    cfg = model.config
    if cfg.depth.mode == "train":
        return model.depth_layers[i](model.blocks[i], model.logits, x, mask, state, targets, loss_mask)
    b, t = x.shape[:2]
    layer = model.depth_layers[i]
    valid = mask.q_valid
    exiting = _exiting(cfg)
    exited = state.exited if exiting else jnp.zeros((b, t), bool)
    blk, own = _split(state)
    policy = policy_of(cfg, state)
    x_in = x
    if i in cfg.mod_layers:
        x, mask, blk, updated = _routed_infer(model, i, x, mask, blk, exited if exiting else None, policy)
    elif exiting:
        live = valid & ~exited

        def make_branch(capacity):
            def run(mdl):
                if capacity == t:  # every slot: the plain block, frozen tokens' queries masked
                    out, m, c = mdl.blocks[i](x, mask.replace(q_valid=live), blk)
                    return (jnp.where(live[..., None], out, x), m.replace(q_valid=valid)), c
                queries = selection_indices(live, capacity)  # [B, C] each
                out, m, c = mdl.blocks[i](x, mask, blk, queries=queries)
                return (out, m), c
            return run

        # A cache prefill stores what the last query sees: it runs every slot (prompts of depth
        # models are decoded token by token, ling_jax/generate_exit.py; this builds the empty cache).
        prefill = blk.cache_op == kv_cache.PREFILL
        sizes = (t,) if prefill else _infer_buckets(cfg, t)
        (x, mask), blk, updated = _bucketed(model, live, sizes, make_branch, blk)
    else:
        x, mask, blk = model.blocks[i](x, mask, blk)
        updated = valid
    layer.sow("intermediates", "depth_layer_tokens", jnp.sum(updated & valid, dtype=jnp.float32))
    own["layers_used"] = own["layers_used"] + updated
    if exiting and i in exit_points(cfg):
        own = _exit_infer(model, i, x, x_in, updated, mask, own, exited, own["forced_exit"], policy)
    return x, mask, blk.replace(**own)


def _routed_infer(model, i, x, mask: AttentionMask, state: TokenState, exited: Optional[Array], policy: InferencePolicy):
    """Inference MoD: the causal rule (or top-k) picks the tokens that run block ``i``, bucketed."""
    cfg, depth = model.config, model.config.depth
    layer = model.depth_layers[i]
    b, t = x.shape[:2]
    valid = mask.q_valid
    scores, predictor, topk = layer.route(x, valid, policy)
    if depth.mod_inference == "topk":
        routed, sizes = topk, (token_capacity(t, depth.mod_capacity),)
    else:
        routed = causal_selection(cfg, scores, predictor, policy) & valid
        sizes = _infer_buckets(cfg, t, with_empty=False)
    layer.sow("intermediates", "mod_routed_tokens", jnp.sum(routed, dtype=jnp.float32))
    sow_decision(layer, "mod_routed", routed)
    prob = jax.nn.sigmoid(scores)

    def make_branch(capacity):
        def run(mdl):
            x_new, m, s = _run_routed(cfg, mdl.blocks[i], x, mask, state, routed, prob, capacity, exited)
            return (x_new, m), s
        return run

    (x, mask), state, routed = _bucketed(model, routed, sizes, make_branch, state)
    updated = routed if exited is None else routed & ~exited
    return x, mask, state, updated


def _exit_infer(model, i, x, x_in, updated, mask: AttentionMask, own: dict, exited, forced_exit, policy):
    """Which live tokens exit after layer ``i``: the exit head runs on the live tokens only."""
    cfg, depth = model.config, model.config.depth
    b, t = x.shape[:2]
    valid = mask.q_valid
    live = valid & ~exited

    def make_branch(capacity):
        def run(mdl):
            indices, slot_valid = selection_indices(live, capacity)  # [B, C] each
            take = lambda a: compact(a, indices)  # noqa: E731
            logits, features, cls_logit = mdl.depth_layers[i].exit_head(mdl.logits, take(x))  # [B, C, ...]
            if depth.exit_confidence == "margin":
                conf = features[..., 1]
            elif depth.exit_confidence == "saturation":
                # A token that skipped this block (MoD) did not change: no evidence of saturation.
                conf = jnp.where(take(updated), saturation_confidence(take(x), take(x_in)), -1.0)
            else:
                conf = jax.nn.sigmoid(cls_logit)
            if forced_exit is not None:
                new = take(forced_exit) == i
            else:
                thr = threshold_at(depth, take(mask.q_positions), cfg.max_seq_len, policy.exit_threshold)
                new = conf > thr
            new = new & slot_valid
            out = (expand(new, indices, slot_valid, jnp.zeros((b, t), bool)),
                   expand(conf, indices, slot_valid, jnp.full((b, t), -jnp.inf, jnp.float32)),
                   expand(logits, indices, new, own["exit_logits"]))
            return out, TokenState()
        return run

    (new, conf, exit_logits), _, _ = _bucketed(model, live, _infer_buckets(cfg, t), make_branch, TokenState())
    if forced_exit is None:
        sow_decision(model.depth_layers[i], "exit_confidence", conf)
    return {**own, "exited": exited | new, "exit_logits": exit_logits, "exit_layer": jnp.where(new, i, own["exit_layer"])}


def finish(model: nn.Module, x: Float[Array, "B T E"], mask: AttentionMask, state: TokenState) -> Float[Array, "B T V"]:
    """Final logits with adaptive depth: exited tokens take their exit head's logits.

    ``model`` is the Transformer (for its ``logits`` head and ``sow``). In inference the final head
    runs on the tokens that did not exit (bucketed). In training with exit heads this also sows
    the exit classifier's BCE (``loss_exit_classifier``), whose target is whether the exit head's
    greedy token agrees with the final head's (tokens that went the whole depth only).
    """
    cfg = model.config
    b, t = x.shape[:2]
    valid = mask.q_valid
    model.sow("intermediates", "depth_tokens", jnp.sum(valid, dtype=jnp.float32))
    sow_decision(model, "layers_used", state.layers_used)
    exited = state.exited if _exiting(cfg) else None
    if exited is not None and cfg.depth.mode == "infer":
        sow_decision(model, "exit_layer", state.exit_layer)
        live = valid & ~exited

        def make_branch(capacity):
            def run(mdl):
                if capacity == t:
                    return jnp.where(exited[..., None], state.exit_logits, mdl.logits(x)), TokenState()
                indices, slot_valid = selection_indices(live, capacity)  # [B, C] each
                return expand(mdl.logits(compact(x, indices)), indices, slot_valid, state.exit_logits), TokenState()
            return run

        # Every token that did not exit needs its logits: the final head never overflows.
        sizes = tuple(sorted(set(_infer_buckets(cfg, t)) | {t}))
        logits, _, _ = _bucketed(model, live, sizes, make_branch, TokenState())
        return logits
    logits = model.logits(x)
    points = exit_points(cfg)
    if cfg.depth.exit_enabled and cfg.depth.mode == "train" and points:
        final = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1))
        scored = valid if exited is None else valid & ~exited
        bce = sum(classifier_bce(cls, pred == final, scored) for cls, pred in zip(state.exit_cls, state.exit_pred))
        model.sow("intermediates", "loss_exit_classifier", cfg.depth.aux_loss_weight * bce / len(points))
    if exited is None:
        return logits
    sow_decision(model, "exit_layer", state.exit_layer)
    return jnp.where(exited[..., None], state.exit_logits, logits)


# ----------------------------------------------------------------------------- diagnostics


def layers_per_token(cfg: ModelConfig, intermediates: Mapping[str, Any]) -> float:
    """Average number of blocks that updated each valid token (``num_layers`` without adaptive depth)."""
    tokens = sown_total(intermediates, "depth_tokens")
    return sown_total(intermediates, "depth_layer_tokens") / tokens if tokens else float(cfg.num_layers)


def mod_predictor_accuracy(intermediates: Mapping[str, Any]) -> float:
    """Fraction of (token, routed layer) decisions where the causal predictor matches top-k membership."""
    total = sown_total(intermediates, "mod_predictor_total")
    return sown_total(intermediates, "mod_predictor_correct") / total if total else float("nan")
