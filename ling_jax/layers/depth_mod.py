"""Mixture-of-Depths pieces: the router with its causal predictor, and sequence compaction.

A routed block runs only on the tokens its router selects. In training the selection is the top
``capacity`` of each sequence by router score (static capacity ``C``); the selected tokens are
gathered into ``[B, C, E]`` with :func:`ling_jax.routing.compact`, together with their positions,
their attention mask and the per-token state (:meth:`TokenState.gather`), so attention, the MLP (or MoE) and any pruner run
on ``C`` tokens only; results are scattered back with :func:`ling_jax.routing.expand` and the
other tokens pass on the residual unchanged.

Top-k over a sequence reads future tokens, so inference uses a causal rule: an auxiliary
predictor (small MLP on the stop-gradient hidden state, trained with BCE on top-k membership)
or a threshold on ``sigmoid(router score)``.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from ling_jax.config import ModelConfig
from ling_jax.layers.attention import AttentionMask
from ling_jax.layers.basics import dense_init, param_with_axes
from ling_jax.policy import InferencePolicy
from ling_jax.routing import token_capacity, compact, expand, top_k_mask
from ling_jax.token_state import TokenState


def rms_normalize(x: Float[Array, "... E"]) -> Float[Array, "... E"]:
    """Parameter-free RMS normalisation in float32 (a scale-free input for routers/predictors)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)


class SmallMLP(nn.Module):
    """``E (+ F scalar features) -> hidden -> 1`` head (``hidden=0``: linear) for predictors and
    classifiers. Each extra feature gets its own ``[hidden]`` input vector."""

    hidden: int

    @nn.compact
    def __call__(self, x: Float[Array, "B T E"], features: Optional[Float[Array, "B T F"]] = None) -> Float[Array, "B T"]:
        e = x.shape[-1]
        n_feat = 0 if features is None else features.shape[-1]
        width, axes = (self.hidden, ("mlp",)) if self.hidden else ((), ())
        if self.hidden:
            w1 = param_with_axes(self, "w_in", dense_init(e), (e, self.hidden), ("embed", "mlp"))
            b1 = param_with_axes(self, "b_in", nn.initializers.zeros, (self.hidden,), ("mlp",))
            h = jnp.einsum("bte,eh->bth", x, w1) + b1  # [B, T, hidden]
        else:
            w2 = param_with_axes(self, "w_out", dense_init(e), (e,), ("embed",))
            h = jnp.einsum("bte,e->bt", x, w2)  # [B, T]
        for f in range(n_feat):
            w_f = param_with_axes(self, f"w_feat{f}", nn.initializers.normal(1.0), width, axes)
            h = h + features[..., f : f + 1] * w_f if self.hidden else h + features[..., f] * w_f
        b2 = param_with_axes(self, "b_out", nn.initializers.zeros, (), ())
        if not self.hidden:
            return h + b2
        w2 = param_with_axes(self, "w_out", dense_init(self.hidden), (self.hidden,), ("mlp",))
        return jnp.einsum("bth,h->bt", nn.silu(h), w2) + b2  # [B, T]


def small_mlp_flops(e: int, hidden: int) -> float:
    """FLOPs per token of :class:`SmallMLP`."""
    return 2.0 * (e * hidden + hidden) if hidden else 2.0 * e


class MoDRouter(nn.Module):
    """Router score (trained through the block output) and causal predictor logit per token."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Float[Array, "B T E"]) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
        e = x.shape[-1]
        w = param_with_axes(self, "router", dense_init(e), (e,), ("embed",))
        xn = rms_normalize(x)  # [B, T, E] float32
        scores = jnp.einsum("bte,e->bt", xn, w)  # [B, T]
        predictor = SmallMLP(self.config.depth.predictor_dim, name="predictor")(jax.lax.stop_gradient(xn))
        return scores, predictor


def router_flops_per_token(cfg: ModelConfig) -> float:
    return 2.0 * cfg.d_model + small_mlp_flops(cfg.d_model, cfg.depth.predictor_dim)


def topk_selection(scores: Float[Array, "B T"], capacity: float, valid: Bool[Array, "B T"]) -> tuple[Bool[Array, "B T"], int]:
    """Top ``capacity`` fraction of each row's valid tokens by score, and the static capacity C."""
    c = token_capacity(scores.shape[1], capacity)
    return top_k_mask(scores, c, valid), c


def predictor_routes(predictor: Float[Array, "B T"], threshold: float | Array) -> Bool[Array, "B T"]:
    """The causal predictor's decision: ``sigmoid(predictor) > threshold`` (``threshold`` in (0, 1))."""
    thr = jnp.asarray(threshold, jnp.float32)
    return predictor > jnp.log(thr) - jnp.log1p(-thr)  # the same comparison on the logit


def causal_selection(cfg: ModelConfig, scores: Float[Array, "B T"], predictor: Float[Array, "B T"],
                     policy: "InferencePolicy") -> Bool[Array, "B T"]:
    """Per-token routing decision that reads only the token's own state (no future tokens);
    thresholds from the call-time ``policy`` (:mod:`ling_jax.policy`)."""
    if cfg.depth.mod_inference == "predictor":
        return predictor_routes(predictor, policy.mod_predictor_threshold)
    if cfg.depth.mod_inference == "threshold":
        return jax.nn.sigmoid(scores) >= policy.mod_threshold
    raise ValueError(f"causal_selection: mod_inference must be 'predictor' or 'threshold', got {cfg.depth.mod_inference!r}")


def predictor_bce(predictor: Float[Array, "B T"], target: Bool[Array, "B T"], valid: Bool[Array, "B T"]) -> Float[Array, ""]:
    """Mean binary cross-entropy of the predictor logit against top-k membership over valid tokens."""
    bce = optax.sigmoid_binary_cross_entropy(predictor.astype(jnp.float32), target.astype(jnp.float32))  # [B, T]
    return jnp.sum(bce * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def weighted_update(
    cfg: ModelConfig, x: Float[Array, "B T E"], out: Float[Array, "B T E"], prob: Float[Array, "B T"]
) -> Float[Array, "B T E"]:
    """Routed-block output scaled by the router weight so the router gets a gradient.

    ``straight_through``: the forward value is exactly ``out`` (scale 1) and the gradient to the
    router is that of ``x + sigmoid(score) * (out - x)``; ``sigmoid``: the value is that.
    """
    p = prob[..., None].astype(out.dtype)  # [B, T, 1]
    if cfg.depth.mod_weight == "sigmoid":
        return x + p * (out - x)
    return out + (p - jax.lax.stop_gradient(p)) * (out - x)  # value: out exactly


# ----------------------------------------------------------------------------- compaction


def compact_mask(mask: AttentionMask, indices: Int[Array, "B C"], valid: Bool[Array, "B C"]) -> AttentionMask:
    """The self-attention mask of the compacted sequence: the selected tokens, in order."""
    return mask.gather(indices, valid)


def expand_mask(compacted: AttentionMask, indices: Int[Array, "B C"], valid: Bool[Array, "B C"], base: AttentionMask) -> AttentionMask:
    """Scatters what a block changed in the compacted mask (pruning keep flags, soft scores,
    expiry) back into ``base``. Validity and positions stay those of ``base``; tokens that skipped
    the block keep their entries (a new ``kv_keep`` starts all-kept, ``kv_log_keep`` at log 1 = 0,
    ``kv_expire`` at never).
    """
    def back(new, old, default):
        if new is None:
            return old
        old = jnp.full(new.shape[:1] + base.q_valid.shape[1:], default, new.dtype) if old is None else old
        return expand(new, indices, valid, old)

    never = jnp.iinfo(jnp.int32).max
    return base.replace(kv_keep=back(compacted.kv_keep, base.kv_keep, True),
                        kv_log_keep=back(compacted.kv_log_keep, base.kv_log_keep, 0.0),
                        kv_expire=back(compacted.kv_expire, base.kv_expire, never))


def run_compacted(block, x: Float[Array, "B T E"], mask: AttentionMask, state: TokenState,
                  indices: Int[Array, "B C"], valid: Bool[Array, "B C"],
                  query_off: Optional[Bool[Array, "B T"]] = None):
    """Runs ``block`` on the selected tokens only. Returns (x_c, out_c, mask, state) with x_c/out_c [B, C, E].

    ``query_off`` marks tokens that provide keys and values but are not updated (exited tokens).
    """
    b, t = x.shape[:2]
    x_c = compact(x, indices)  # [B, C, E]
    mask_c = compact_mask(mask, indices, valid)
    if query_off is not None:
        mask_c = mask_c.replace(q_valid=mask_c.q_valid & ~compact(query_off, indices))
    out_c, mask_c, state_c = block(x_c, mask_c, state.gather(indices))
    if out_c.shape != x_c.shape:
        raise ValueError(f"a Mixture-of-Depths block must keep its input shape {x_c.shape}, got {out_c.shape}")
    return x_c, out_c, expand_mask(mask_c, indices, valid, mask), state.scatter(state_c, indices, valid, t)
