"""Multi-head latent attention (MLA; DeepSeek-V2/V3) on the shared attention core.

Per token, with ``x [E]``, ``H`` heads and the dims of :class:`~ling_jax.config.MLAConfig`::

    q      = wq_b . RMSNorm(wq_a . x)              [H, nope + rope]   (wq . x when q_lora_rank == 0)
    c, kr  = split(wkv_a . x)                      c [kv_lora_rank], kr [rope] (one rotary key for all heads)
    kn, v  = split(wkv_b . RMSNorm(c))             kn [H, nope], v [H, v_head_dim]
    k      = concat(kn, RoPE(kr) broadcast to H)   [H, nope + rope]
    q      = concat(q_nope, RoPE(q_rope)) * mscale
    out    = wo . attention(q, k, v)               softmax scale (nope + rope) ** -0.5 * mscale

``mscale`` is 1 unless DeepSeek's YaRN correction is on (:func:`softmax_mscale`).

RoPE uses the rotate-half convention; checkpoints laid out for interleaved RoPE (DeepSeek's
``rope_interleave``) are permuted at import (:mod:`ling_jax.interop.hf`), which leaves every
query-key product unchanged.

:class:`MLA` subclasses :class:`~ling_jax.layers.attention.Attention` and replaces only the
projections (``_query``, ``_key_value``, ``_output``): masking, token pruning, the ``impl`` switch,
the ledger records and the KV cache are the attention core's. **KV cache:** decoding caches the
up-projected per-head keys and values (``[B, S, H, nope + rope]`` and ``[B, S, H, v_head_dim]``);
the compressed-latent cache of DeepSeek's inference (``kv_lora_rank + rope`` per token, with the
up-projection absorbed into the query and output) is not implemented.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ling_jax.config import ModelConfig
from ling_jax.layers.attention import Attention
from ling_jax.layers.basics import RMSNorm, compute_dtype, dense_init, param_with_axes

# The two latent norms' epsilon: fixed, as in DeepSeek's reference implementation (Hugging Face
# transformers' DeepseekV3Attention), whatever the model's ``norm_eps`` (its ``rms_norm_eps``).
LATENT_NORM_EPS = 1e-6


class MLA(Attention):
    """Multi-head latent attention; same call as :class:`Attention` (``(x, mask, state, kv_x=None)``)."""

    def setup(self):
        cfg, m = self.config, self.config.mla
        e, h, dqk, dv = cfg.d_model, cfg.num_heads, m.qk_head_dim, m.v_head_dim
        if m.q_lora_rank:
            r = m.q_lora_rank
            self.wq_a = param_with_axes(self, "wq_a", dense_init(e), (e, r), ("embed", "latent"))
            self.q_a_norm = RMSNorm(LATENT_NORM_EPS, axis_name="latent", name="q_a_norm")
            self.wq_b = param_with_axes(self, "wq_b", dense_init(r), (r, h, dqk), ("latent", "heads", "head_dim"))
        else:
            self.wq = param_with_axes(self, "wq", dense_init(e), (e, h, dqk), ("embed", "heads", "head_dim"))
        r = m.kv_lora_rank
        self.wkv_a = param_with_axes(self, "wkv_a", dense_init(e), (e, r + m.qk_rope_head_dim), ("embed", "latent"))
        self.kv_a_norm = RMSNorm(LATENT_NORM_EPS, axis_name="latent", name="kv_a_norm")
        self.wkv_b = param_with_axes(self, "wkv_b", dense_init(r), (r, h, m.qk_nope_head_dim + dv),
                                     ("latent", "heads", "head_dim"))
        self.wo = param_with_axes(self, "wo", dense_init(h * dv), (h, dv, e), ("heads", "head_dim", "embed"))

    def _query(self, x: Float[Array, "B T E"], positions: Int[Array, "B T"]) -> Float[Array, "B T H Dqk"]:
        m, dtype = self.config.mla, compute_dtype(self.config)
        x = x.astype(dtype)
        if m.q_lora_rank:
            latent = self.q_a_norm(x @ self.wq_a.astype(dtype))  # [B, T, Rq]
            q = jnp.einsum("btr,rhd->bthd", latent, self.wq_b.astype(dtype))  # [B, T, H, Dqk]
        else:
            q = jnp.einsum("bte,ehd->bthd", x, self.wq.astype(dtype))
        q_nope, q_rope = q[..., : m.qk_nope_head_dim], q[..., m.qk_nope_head_dim:]
        q = jnp.concatenate([q_nope, self._rope(q_rope, positions)], axis=-1)  # [B, T, H, Dqk]
        mscale = softmax_mscale(self.config)
        if mscale != 1.0:  # the core scales the logits by Dqk ** -0.5; DeepSeek's YaRN by mscale^2 more
            q = q * jnp.asarray(mscale, q.dtype)
        return nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))

    def _key_value(self, x: Float[Array, "B T E"], positions: Int[Array, "B T"]) -> tuple[Array, Array]:
        cfg, m, dtype = self.config, self.config.mla, compute_dtype(self.config)
        ckv = x.astype(dtype) @ self.wkv_a.astype(dtype)  # [B, T, Rkv + rope]
        latent, k_rope = ckv[..., : m.kv_lora_rank], ckv[..., m.kv_lora_rank:]
        kv = jnp.einsum("btr,rhd->bthd", self.kv_a_norm(latent), self.wkv_b.astype(dtype))  # [B, T, H, nope + Dv]
        k_nope, v = kv[..., : m.qk_nope_head_dim], kv[..., m.qk_nope_head_dim:]
        k_rope = self._rope(k_rope[:, :, None, :], positions)  # [B, T, 1, rope]: one rotary key for all heads
        k_rope = jnp.broadcast_to(k_rope, k_nope.shape[:3] + (m.qk_rope_head_dim,))  # [B, T, H, rope]
        k = jnp.concatenate([k_nope, k_rope], axis=-1)  # [B, T, H, Dqk]
        return nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim")), v

    def _output(self, out: Float[Array, "B T H Dv"]) -> Float[Array, "B T E"]:
        return jnp.einsum("bthd,hde->bte", out, self.wo.astype(compute_dtype(self.config)))


def softmax_mscale(config: ModelConfig) -> float:
    """Extra softmax scale of MLA: ``(0.1 * mscale_all_dim * ln(factor) + 1) ** 2`` with the RoPE scaling
    ``factor`` (Hugging Face ``yarn_apply_mscale``), 1 without scaling, ``factor <= 1`` or ``mscale_all_dim == 0``."""
    factor, m = config.rope_scaling.factor, config.mla.mscale_all_dim
    if config.rope_scaling.kind == "none" or not m or factor <= 1:
        return 1.0
    return (0.1 * m * math.log(factor) + 1.0) ** 2


def attention_class(config: ModelConfig) -> type[Attention]:
    """The attention module of ``config.attention``: :class:`Attention` (``"mha"``) or :class:`MLA`."""
    return MLA if config.attention == "mla" else Attention
