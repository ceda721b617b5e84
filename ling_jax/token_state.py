"""The token state: what the blocks hand each other besides the hidden states and the mask.

Two kinds of fields, declared here and nowhere else:

* **per token** (``[B, T, ...]``, ``None`` while the mechanism that owns it is off): pruning's keep
  flags, priorities and compaction choice, the task's oracle mask, and adaptive depth's exit
  decisions. They follow the sequence whenever tokens are gathered into a capacity (pruning
  compaction, Mixture-of-Depths, early exit): :meth:`TokenState.gather` and
  :meth:`TokenState.scatter` are the one compaction abstraction all three use.
* **call context**, the same for every token: the training step, the inference policy
  (:mod:`ling_jax.policy`, traced thresholds) and the KV-cache operation with its slot count.

It is a ``flax.struct`` dataclass, so it passes through ``jit``, ``nn.switch`` and ``remat``;
the cache operation and slot count are static (they choose the program).
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ling_jax.policy import InferencePolicy
from ling_jax.routing import compact, expand

PREFILL, DECODE = "prefill", "decode"  # KV-cache operations (ling_jax/layers/kv_cache.py)

# Value a per-token field takes for tokens that did not pass through the block that created it
# (e.g. tokens a Mixture-of-Depths layer skipped, for the pruning fields its block set).
_FILL = {
    "prune_keep": True, "prune_priority": 0.0, "prune_log_keep": 0.0, "prune_select": True, "oracle": False,
    "layers_used": 0, "exited": False, "exit_logits": 0.0, "exit_layer": 0, "exit_pred": 0, "exit_cls": 0.0,
    "forced_exit": 0,
}


@flax.struct.dataclass
class TokenState:
    """Per-token state and call context threaded through the blocks (see the module docstring)."""

    # -- per token: token pruning (ling_jax/layers/pruning.py)
    prune_keep: Optional[Bool[Array, "B T"]] = None  # hard: kept by every pruner so far (cascade)
    prune_priority: Optional[Float[Array, "B T"]] = None  # ranking of the last pruner (KV-cache eviction order)
    prune_log_keep: Optional[Float[Array, "B T"]] = None  # soft: cascaded log keep-probability
    prune_select: Optional[Bool[Array, "B T"]] = None  # compaction: tokens that stay after this block
    oracle: Optional[Bool[Array, "B T"]] = None  # input: the task's answer-carrying tokens (baseline "oracle")
    # -- per token: adaptive depth (ling_jax/layers/depth.py)
    layers_used: Optional[Int[Array, "B T"]] = None  # blocks that updated the token so far
    exited: Optional[Bool[Array, "B T"]] = None  # exited at an earlier layer
    exit_logits: Optional[Float[Array, "B T V"]] = None  # logits of the exit head it left at
    exit_layer: Optional[Int[Array, "B T"]] = None  # layer it exited after (num_layers - 1: never)
    exit_pred: tuple[Int[Array, "B T"], ...] = ()  # training: per exit point passed, the head's greedy token
    exit_cls: tuple[Float[Array, "B T"], ...] = ()  # training: per exit point passed, the classifier logit
    forced_exit: Optional[Int[Array, "B T"]] = None  # input: exit after this layer instead of the exit rule
    # -- call context
    step: Optional[Int[Array, ""]] = None  # training step (pruning's temperature schedule)
    policy: Optional[InferencePolicy] = None  # call-time thresholds (ling_jax/policy.py)
    cache_op: Optional[str] = flax.struct.field(pytree_node=False, default=None)  # None | "prefill" | "decode"
    cache_slots: int = flax.struct.field(pytree_node=False, default=0)  # slots of an unpruned layer's cache

    def __post_init__(self):
        if self.cache_op not in (None, PREFILL, DECODE):
            raise ValueError(f"TokenState.cache_op must be None, {PREFILL!r} or {DECODE!r}, got {self.cache_op!r}")

    def gather(self, indices: Int[Array, "B C"]) -> "TokenState":
        """Every per-token field at the gathered tokens: ``[B, T, ...] -> [B, C, ...]``."""
        def take(value):
            if isinstance(value, tuple):
                return tuple(compact(v, indices) for v in value)
            return None if value is None else compact(value, indices)

        return self.replace(**{name: take(getattr(self, name)) for name in _FILL})

    def scatter(self, new: "TokenState", indices: Int[Array, "B C"], valid: Bool[Array, "B C"],
                length: int) -> "TokenState":
        """``new`` (a state of the gathered tokens, ``[B, C, ...]``) written back into this one
        (``[B, length, ...]``) at ``indices``; the other tokens keep their values. A field ``new``
        has and this state lacks starts at its fill value (``_FILL``) for the other tokens. The
        call context is ``new``'s."""
        def back(name, value, old):
            if value is None:
                return None
            if old is None:
                shape = value.shape[:1] + (length,) + value.shape[2:]
                old = jnp.full(shape, _FILL[name], value.dtype)
            return expand(value, indices, valid, old)

        fields = {}
        for name in _FILL:
            value, old = getattr(new, name), getattr(self, name)
            if isinstance(value, tuple):
                old = old + (None,) * (len(value) - len(old))
                fields[name] = tuple(back(name, v, o) for v, o in zip(value, old))
            else:
                fields[name] = back(name, value, old)
        return new.replace(**fields)

    def without_context(self) -> "TokenState":
        """The per-token part only (what may leave an ``nn.switch`` branch)."""
        return self.replace(step=None, policy=None)

    def with_context_of(self, other: "TokenState") -> "TokenState":
        return self.replace(step=other.step, policy=other.policy)

