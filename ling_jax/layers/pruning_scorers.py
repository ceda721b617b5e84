"""Learned token-importance scorers for pruning. Both are causal: token j's score depends only on
tokens at positions <= j.

* :class:`LinearScorer`: ``s_j = w . h_j + b`` on the normalised hidden state ``h``.
* :class:`LowRankScorer`: adds a low-rank query-key interaction in the spirit of Dynamic Context
  Pruning, ``(h_j W_k) . mean_{i <= j} (h_i W_q) / sqrt(r)``: how strongly the context so far
  "asks for" token j. The running mean over earlier tokens keeps it causal; decoding carries the
  running sum and count in the ``"cache"`` collection (O(r) state per row).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from ling_jax.layers.basics import dense_init, param_with_axes
from ling_jax.layers.kv_cache import DECODE, PREFILL

INIT_BIAS = 2.0  # sigmoid(2) = 0.88: a fresh scorer keeps most tokens


def _linear_part(module: nn.Module, h: Float[Array, "B T E"]) -> Float[Array, "B T"]:
    e = h.shape[-1]
    w = param_with_axes(module, "w", nn.initializers.normal(0.1 * e**-0.5), (e,), ("embed",))
    b = param_with_axes(module, "b", nn.initializers.constant(INIT_BIAS), (), ())
    return jnp.einsum("bte,e->bt", h, w) + b


class LinearScorer(nn.Module):
    """Keep logit per token from a linear map of the normalised hidden state."""

    @nn.compact
    def __call__(self, h: Float[Array, "B T E"], valid: Bool[Array, "B T"], cache_op: Optional[str] = None) -> Float[Array, "B T"]:
        return _linear_part(self, h.astype(jnp.float32))

    @staticmethod
    def flops_per_token(e: int, rank: int) -> float:
        return 2.0 * e


class LowRankScorer(nn.Module):
    """Linear score plus a causal low-rank query-key interaction (rank ``rank``)."""

    rank: int

    @nn.compact
    def __call__(self, h: Float[Array, "B T E"], valid: Bool[Array, "B T"], cache_op: Optional[str] = None) -> Float[Array, "B T"]:
        h = h.astype(jnp.float32)
        e, r = h.shape[-1], self.rank
        # The rank axis is a small head dimension (replicated like head_dim).
        wq = param_with_axes(self, "wq", dense_init(e), (e, r), ("embed", "head_dim"))
        wk = param_with_axes(self, "wk", dense_init(e), (e, r), ("embed", "head_dim"))
        q = jnp.einsum("bte,er->btr", h, wq) * valid[..., None]  # [B, T, R], invalid tokens ask nothing
        k = jnp.einsum("bte,er->btr", h, wk)  # [B, T, R]
        q_sum = jnp.cumsum(q, axis=1)  # [B, T, R]: sum over tokens <= j
        count = jnp.cumsum(valid, axis=1).astype(jnp.float32)  # [B, T]
        if cache_op == DECODE:  # continue the running mean of the prefilled / decoded tokens
            q_sum = q_sum + self.get_variable("cache", "q_sum")[:, None]
            count = count + self.get_variable("cache", "count")[:, None]
        if cache_op in (PREFILL, DECODE):
            self.put_variable("cache", "q_sum", q_sum[:, -1])
            self.put_variable("cache", "count", count[:, -1])
        q_mean = q_sum / jnp.maximum(count, 1.0)[..., None]
        interaction = jnp.einsum("btr,btr->bt", k, q_mean) * r**-0.5
        return _linear_part(self, h) + interaction

    @staticmethod
    def flops_per_token(e: int, rank: int) -> float:
        return 2.0 * e + 4.0 * e * rank + 4.0 * rank
