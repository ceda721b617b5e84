"""Early-exit pieces: exit heads, confidence measures, and the (decaying) exit threshold.

An exit head shares the model's output head and adds its own RMSNorm. A token exits after layer
``l`` when its confidence there is strictly above the threshold, so a threshold at the top of the
confidence's range never exits. Confidences:

``margin``      softmax top-1 minus top-2 probability of the exit head, in [0, 1]
``saturation``  cosine similarity of the hidden state before and after the layer, in [-1, 1]
``classifier``  sigmoid of a small MLP on the stop-gradient hidden state and the exit head's
                softmax features, trained (BCE) to predict whether the exit head's greedy token
                agrees with the final head's, in [0, 1]
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

from ling_jax.config import DepthConfig, ModelConfig
from ling_jax.routing import top_k_values


def exit_points(cfg: ModelConfig) -> tuple[int, ...]:
    """Layers with an exit head: the configured exit layers except the last (the final head)."""
    return tuple(i for i in cfg.exit_layers if i < cfg.num_layers - 1)


def margin_confidence(logits: Float[Array, "B T V"]) -> Float[Array, "B T"]:
    """Top-1 minus top-2 softmax probability, in [0, 1]."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top2 = top_k_values(probs, 2)  # [B, T, 2]
    return top2[..., 0] - top2[..., 1]


def softmax_features(logits: Float[Array, "B T V"]) -> Float[Array, "B T 3"]:
    """Exit-classifier features of an exit head's distribution: top-1 probability, top-1 minus
    top-2 margin, and entropy / log V."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    probs = jnp.exp(logp)
    top2 = top_k_values(probs, 2)  # [B, T, 2]
    entropy = -jnp.sum(probs * logp, axis=-1) / jnp.log(logits.shape[-1])
    return jnp.stack([top2[..., 0], top2[..., 0] - top2[..., 1], entropy], axis=-1)


def saturation_confidence(after: Float[Array, "B T E"], before: Float[Array, "B T E"]) -> Float[Array, "B T"]:
    """Cosine similarity of consecutive layers' hidden states, clipped to [-1, 1]."""
    a, b = after.astype(jnp.float32), before.astype(jnp.float32)
    dot = jnp.sum(a * b, axis=-1)
    norms = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
    return jnp.clip(dot / jnp.maximum(norms, 1e-12), -1.0, 1.0)


def threshold_at(depth: DepthConfig, positions: Int[Array, "B T"], max_seq_len: int,
                 threshold: Optional[float | Float[Array, ""]] = None) -> Float[Array, "B T"]:
    """Exit threshold per token, decaying from ``exit_threshold`` toward the bottom of the range.

    ``lo + (threshold - lo) * exp(-exit_decay * position / max_seq_len)``: later tokens exit more
    easily; with ``exit_decay=0`` the threshold is constant. It depends only on the position.
    ``threshold`` (a traced value) replaces ``depth.exit_threshold``, for sweeps.
    """
    lo, _ = depth.confidence_range
    thr = jnp.asarray(depth.exit_threshold if threshold is None else threshold, jnp.float32)
    if depth.exit_decay == 0:
        return jnp.broadcast_to(thr, positions.shape)
    decay = jnp.exp(-depth.exit_decay * positions.astype(jnp.float32) / max_seq_len)
    return lo + (thr - lo) * decay


def exit_cross_entropy(logits: Float[Array, "B T V"], targets: Int[Array, "B T"], loss_mask: Float[Array, "B T"]) -> Float[Array, ""]:
    """Mean next-token cross-entropy (nats) of an exit head over ``loss_mask``."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)  # [B, T]
    return jnp.sum(nll * loss_mask) / jnp.maximum(jnp.sum(loss_mask), 1.0)


def classifier_bce(logit: Float[Array, "B T"], agree: Bool[Array, "B T"], valid: Bool[Array, "B T"]) -> Float[Array, ""]:
    """Mean BCE of the exit classifier against "the exit head's greedy token is the final one"."""
    bce = optax.sigmoid_binary_cross_entropy(logit.astype(jnp.float32), agree.astype(jnp.float32))  # [B, T]
    return jnp.sum(bce * valid) / jnp.maximum(jnp.sum(valid), 1.0)
