"""Basic layers: RMSNorm, rotary embeddings, token embedding, SwiGLU MLP.

Every parameter is created with ``nn.with_logical_partitioning`` so its logical axis names
travel with it; ``ling_jax/sharding.py`` maps them to mesh axes.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ling_jax.config import ModelConfig, RopeScalingConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(config: ModelConfig):
    return DTYPES[config.dtype]


def param_with_axes(module: nn.Module, name: str, init, shape, axes: tuple[str, ...]):
    """A float32 parameter annotated with logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def dense_init(fan_in: int):
    return nn.initializers.normal(stddev=fan_in**-0.5)


class RMSNorm(nn.Module):
    eps: float = 1e-6
    axis_name: str = "embed"  # logical name of the normalised axis

    @nn.compact
    def __call__(self, x: Float[Array, "... E"]) -> Float[Array, "... E"]:
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale).astype(x.dtype)


def rope_frequencies(head_dim: int, base: float, scaling: Optional[RopeScalingConfig] = None) -> tuple[np.ndarray, float]:
    """Rotary inverse frequencies ``[D/2]`` (float32) and the cos/sin scale, computed once on the host.

    Without scaling: ``base ** (-2i / D)`` and scale 1. ``scaling`` applies the ``linear``,
    ``llama3`` or ``yarn`` rule of :class:`~ling_jax.config.RopeScalingConfig` (the formulas of
    Hugging Face transformers' ``modeling_rope_utils``), in float64 before the cast.
    """
    d = head_dim
    inv_freq = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))  # [D/2]
    kind = "none" if scaling is None else scaling.kind
    scale = 1.0
    if kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif kind == "llama3":
        old_len, factor = scaling.original_max_len, scaling.factor
        low_wavelen, high_wavelen = old_len / scaling.low_freq_factor, old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    elif kind == "yarn":
        factor, old_len = scaling.factor, scaling.original_max_len

        def correction_dim(rotations: float) -> float:
            return d * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)  # [D/2]
        extrapolate = 1.0 - ramp  # 1: keep the original frequency, 0: interpolate
        inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
        scale = scaling.attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    elif kind != "none":
        raise ValueError(f"rope scaling kind must be one of none, linear, llama3, yarn; got {kind!r}")
    return inv_freq.astype(np.float32), float(scale)


def apply_rope(
    x: Float[Array, "B T H D"], positions: Int[Array, "B T"], base: float,
    scaling: Optional[RopeScalingConfig] = None,
) -> Float[Array, "B T H D"]:
    """Rotary position embedding (rotate-half convention), computed in float32.

    ``scaling`` (optional) rescales the frequencies for long context: see :func:`rope_frequencies`.
    """
    d = x.shape[-1]
    if scaling is None or scaling.kind == "none":
        inv_freq, scale = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d), 1.0  # [D/2]
    else:
        inv_freq, scale = rope_frequencies(d, base, scaling)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]  # [B, T, 1, D/2]
    if scale != 1.0:
        sin, cos = sin * scale, cos * scale
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Embed(nn.Module):
    vocab_size: int
    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = param_with_axes(
            self, "embedding", nn.initializers.normal(stddev=1.0), (self.vocab_size, self.features), ("vocab", "embed")
        )

    def __call__(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T E"]:
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def attend(self, x: Float[Array, "B T E"]) -> Float[Array, "B T V"]:
        """Tied output head: logits = x @ embedding^T."""
        return jnp.einsum("bte,ve->btv", x, self.embedding.astype(self.dtype))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(x W_gate) * (x W_up))."""

    config: ModelConfig
    hidden_dim: int = 0  # 0: config.mlp_dim

    @nn.compact
    def __call__(self, x: Float[Array, "B T E"]) -> Float[Array, "B T E"]:
        cfg, dtype = self.config, compute_dtype(self.config)
        hidden = self.hidden_dim or cfg.mlp_dim
        e = x.shape[-1]
        w_gate = param_with_axes(self, "w_gate", dense_init(e), (e, hidden), ("embed", "mlp"))
        w_up = param_with_axes(self, "w_up", dense_init(e), (e, hidden), ("embed", "mlp"))
        w_down = param_with_axes(self, "w_down", dense_init(hidden), (hidden, e), ("mlp", "embed"))
        x = x.astype(dtype)
        h = nn.silu(x @ w_gate.astype(dtype)) * (x @ w_up.astype(dtype))  # [B, T, F]
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return h @ w_down.astype(dtype)
