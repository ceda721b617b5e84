"""Inference policy: the call-time choices that do not change shapes.

A :class:`ModelConfig` describes what is trained. How one evaluation point is run is the policy:
thresholds are traced values passed to ``Transformer.__call__(..., policy=...)``, so a sweep over
thresholds compiles the forward once. Shape-changing choices (budgets, capacities, buckets) stay
static in the config.

``prune_threshold``          hard pruning, threshold rule: keep key j iff sigmoid(score_j) >= this
``mod_threshold``            MoD ``mod_inference="threshold"``: route iff sigmoid(router score) >= this
``mod_predictor_threshold``  MoD ``mod_inference="predictor"``: route iff sigmoid(predictor) > this
``exit_threshold``           early exit: exit iff confidence > this (decayed by ``exit_decay``)
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Optional, Union

import flax.struct
import jax.numpy as jnp
from jaxtyping import Array, Float

from ling_jax.config import ConfigError, DepthConfig, ModelConfig, PruningConfig

Scalar = Union[float, Float[Array, ""]]


# A pytree container: JAX rebuilds it through __init__ with whatever leaves a transformation
# produces (ShapeDtypeStructs under eval_shape, shardings), so the field annotations describe the
# values a forward pass sees and cannot be checked at construction.
@typing.no_type_check
@flax.struct.dataclass
class InferencePolicy:
    """Traced thresholds for one forward pass (see the module docstring)."""

    prune_threshold: Scalar
    mod_threshold: Scalar
    mod_predictor_threshold: Scalar
    exit_threshold: Scalar


def _check(name: str, value, lo: float, hi: float) -> None:
    """Range-checks Python numbers (traced values are the caller's responsibility)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and lo <= value <= hi):
            raise ConfigError(f"InferencePolicy.{name} must be a finite number in [{lo}, {hi}], got {value!r}")


def inference_policy(cfg: ModelConfig, *, prune_threshold: Optional[Scalar] = None,
                     mod_threshold: Optional[Scalar] = None, mod_predictor_threshold: Optional[Scalar] = None,
                     exit_threshold: Optional[Scalar] = None) -> InferencePolicy:
    """The config's thresholds, with any of them replaced (Python floats are range-checked)."""
    pick = lambda value, default: default if value is None else value  # noqa: E731
    policy = InferencePolicy(
        prune_threshold=pick(prune_threshold, cfg.pruning.threshold),
        mod_threshold=pick(mod_threshold, cfg.depth.mod_threshold),
        mod_predictor_threshold=pick(mod_predictor_threshold, cfg.depth.mod_predictor_threshold),
        exit_threshold=pick(exit_threshold, cfg.depth.exit_threshold),
    )
    _check("prune_threshold", policy.prune_threshold, 0.0, 1.0)
    _check("mod_threshold", policy.mod_threshold, 0.0, 1.0)
    _check("mod_predictor_threshold", policy.mod_predictor_threshold, 0.0, 1.0)
    lo, hi = cfg.depth.confidence_range
    _check("exit_threshold", policy.exit_threshold, lo, hi)
    return policy


def as_traced(policy: InferencePolicy) -> InferencePolicy:
    """Every threshold as a float32 scalar array (one compiled program for all values)."""
    return InferencePolicy(*(jnp.asarray(v, jnp.float32) for v in
                             (policy.prune_threshold, policy.mod_threshold, policy.mod_predictor_threshold,
                              policy.exit_threshold)))


def policy_of(cfg: ModelConfig, state) -> InferencePolicy:
    """The policy a layer runs under: the one in the token state (``ling_jax.token_state``), else
    the config's."""
    if state is not None and state.policy is not None:
        return state.policy
    return inference_policy(cfg)


def static_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with every policy threshold at its default: the part that decides the compiled
    program. Configs that differ only in thresholds share it (and so one compilation)."""
    return dataclasses.replace(
        cfg,
        pruning=dataclasses.replace(cfg.pruning, threshold=PruningConfig.threshold),
        depth=dataclasses.replace(cfg.depth, mod_threshold=DepthConfig.mod_threshold,
                                  mod_predictor_threshold=DepthConfig.mod_predictor_threshold,
                                  exit_threshold=DepthConfig.exit_threshold))
