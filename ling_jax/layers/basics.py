"""Basic layers: RMSNorm, rotary embeddings, token embedding, SwiGLU MLP.

Every parameter is created with ``nn.with_logical_partitioning`` so its logical axis names
travel with it; ``ling_jax/sharding.py`` maps them to mesh axes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ling_jax.config import ModelConfig

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

    @nn.compact
    def __call__(self, x: Float[Array, "... E"]) -> Float[Array, "... E"]:
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale).astype(x.dtype)


def apply_rope(x: Float[Array, "B T H D"], positions: Int[Array, "B T"], base: float) -> Float[Array, "B T H D"]:
    """Rotary position embedding (rotate-half convention), computed in float32."""
    d = x.shape[-1]
    freqs = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, D/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]  # [B, T, 1, D/2]
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
