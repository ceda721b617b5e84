"""MoE routers: scores, aux-loss-free bias, group-limited top-k, combine weights, losses, diagnostics.

All router math runs in float32 on flattened tokens ``[N, E]``. A router chooses among
``C = num_experts + num_zero_experts`` *choices*; ids ``>= num_experts`` are zero-compute experts.

* ``softmax`` (Mixtral): ``p = softmax(logits)``; top-k of ``p (+ bias)``; weights ``p[ids]``,
  renormalised to sum to one when ``normalize_weights``.
* ``sigmoid`` (DeepSeek-V3 / Ling 2.0): ``s = sigmoid(logits)``; top-k of ``s + bias``; weights
  ``s[ids]`` (never the bias), normalised to sum to one when ``normalize_weights``.
* Both: weights are then multiplied by ``route_scale``. The aux-loss-free ``bias`` only changes
  *which* experts are chosen, never the weights, and gets no gradient.
* Group-limited routing (``num_groups > 1``): the C choices form ``num_groups`` equal groups; a
  group's score is the sum of its two best (biased) scores (its best score if it has one choice);
  only the ``top_groups`` best groups stay eligible, then top-k picks experts inside them.

Losses (weights applied by the caller):

* switch load balance ``C * sum_i f_i * P_i`` with ``f_i`` the fraction of the valid tokens' k
  choices that picked choice ``i`` and ``P_i`` its mean normalised router probability (softmax
  probabilities, or sigmoid scores divided by their sum). Uniform routing gives 1.
* router z-loss ``mean_valid(logsumexp(logits) ** 2)``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ling_jax.routing import top_k_indices, top_k_values

ROUTERS = ("softmax", "sigmoid")


class Routing(NamedTuple):
    """A router decision for N tokens."""

    ids: Int[Array, "N K"]  # chosen choices; >= num_experts: zero-compute expert
    weights: Float[Array, "N K"]  # combine weights (float32)
    probs: Float[Array, "N C"]  # normalised router distribution (balance loss, entropy)
    logits: Float[Array, "N C"]  # raw router logits (z-loss)


def router_scores(logits: Float[Array, "N C"], kind: str) -> Float[Array, "N C"]:
    """Softmax probabilities or sigmoid affinities, in float32."""
    logits = logits.astype(jnp.float32)
    if kind == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if kind == "sigmoid":
        return jax.nn.sigmoid(logits)
    raise ValueError(f"router kind must be one of {list(ROUTERS)}, got {kind!r}")


def limit_groups(selection: Float[Array, "N C"], num_groups: int, top_groups: int) -> Float[Array, "N C"]:
    """Masks (to -inf) every choice outside the `top_groups` best of `num_groups` equal groups."""
    n, c = selection.shape
    if num_groups <= 1 or top_groups >= num_groups:
        return selection
    if c % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of router choices ({c})")
    grouped = selection.reshape(n, num_groups, c // num_groups)  # [N, G, C/G]
    best = top_k_values(grouped, min(2, c // num_groups))  # [N, G, <=2]
    group_score = jnp.sum(best, axis=-1)  # [N, G]
    keep_idx = top_k_indices(group_score, top_groups)  # [N, top_groups]
    keep = jnp.sum(jax.nn.one_hot(keep_idx, num_groups, dtype=jnp.int32), axis=1) > 0  # [N, G]
    masked = jnp.where(keep[:, :, None], grouped, -jnp.inf)  # [N, G, C/G]
    return masked.reshape(n, c)


def route(
    logits: Float[Array, "N C"],
    *,
    kind: str,
    top_k: int,
    bias: Optional[Float[Array, " C"]] = None,
    num_groups: int = 1,
    top_groups: int = 1,
    normalize_weights: bool = True,
    route_scale: float = 1.0,
) -> Routing:
    """Chooses `top_k` of C choices per token and their combine weights."""
    logits = logits.astype(jnp.float32)
    scores = router_scores(logits, kind)  # [N, C]
    selection = scores if bias is None else scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
    selection = limit_groups(selection, num_groups, top_groups)
    ids = top_k_indices(jax.lax.stop_gradient(selection), top_k)  # [N, K]
    weights = jnp.take_along_axis(scores, ids, axis=-1)  # [N, K] unbiased scores
    if normalize_weights:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    weights = weights * route_scale
    probs = scores if kind == "softmax" else scores / (jnp.sum(scores, axis=-1, keepdims=True) + 1e-20)
    return Routing(ids=ids.astype(jnp.int32), weights=weights, probs=probs, logits=logits)


# ----------------------------------------------------------------------------- losses


def _valid_f32(valid: Optional[Bool[Array, " N"]], n: int) -> Float[Array, " N"]:
    return jnp.ones((n,), jnp.float32) if valid is None else valid.astype(jnp.float32)


def choice_load(ids: Int[Array, "N K"], valid: Optional[Bool[Array, " N"]], num_choices: int) -> Float[Array, " C"]:
    """How many of the valid tokens' k choices picked each of the C choices (before any drop)."""
    v = jnp.broadcast_to(_valid_f32(valid, ids.shape[0])[:, None], ids.shape)  # [N, K]
    return jnp.zeros((num_choices,), jnp.float32).at[ids.reshape(-1)].add(v.reshape(-1))


def load_balance_loss(
    probs: Float[Array, "N C"], ids: Int[Array, "N K"], valid: Optional[Bool[Array, " N"]] = None
) -> Float[Array, ""]:
    """Switch-style balance loss ``C * sum_i f_i * P_i`` over valid tokens (1 when uniform)."""
    n, c = probs.shape
    v = _valid_f32(valid, n)
    count = jnp.maximum(jnp.sum(v), 1.0)
    f = jax.lax.stop_gradient(choice_load(ids, valid, c)) / (count * ids.shape[1])  # [C], sums to 1
    p = jnp.einsum("nc,n->c", probs, v) / count  # [C]
    return c * jnp.sum(f * p)


def z_loss(logits: Float[Array, "N C"], valid: Optional[Bool[Array, " N"]] = None) -> Float[Array, ""]:
    """Router z-loss: mean over valid tokens of ``logsumexp(logits) ** 2``."""
    v = _valid_f32(valid, logits.shape[0])
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [N]
    return jnp.sum(lse * lse * v) / jnp.maximum(jnp.sum(v), 1.0)


def router_entropy(probs: Float[Array, "N C"], valid: Optional[Bool[Array, " N"]] = None) -> Float[Array, ""]:
    """Mean entropy (nats) of the normalised router distribution over valid tokens."""
    v = _valid_f32(valid, probs.shape[0])
    ent = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.maximum(probs, 1e-30)), 0.0), axis=-1)  # [N]
    return jnp.sum(ent * v) / jnp.maximum(jnp.sum(v), 1.0)


def max_mean_load(load: Float[Array, " X"]) -> Float[Array, ""]:
    """max / mean of a load vector (1 = perfectly balanced; 0 when nothing was routed)."""
    mean = jnp.mean(load)
    return jnp.where(mean > 0, jnp.max(load) / jnp.maximum(mean, 1e-30), 0.0)


def bias_step(bias: Float[Array, " C"], load: Float[Array, " C"], rate: float) -> Float[Array, " C"]:
    """Aux-loss-free update: every choice moves by `rate` toward the mean load (sign rule).

    Over-loaded choices get a lower bias (chosen less), under-loaded ones a higher bias; a
    choice exactly at the mean, or a step where nothing was routed, leaves the bias unchanged.
    """
    load = load.astype(jnp.float32)
    return bias + rate * jnp.sign(jnp.mean(load) - load)
