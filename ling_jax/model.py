"""The ling-jax decoder: Block and Transformer.

A block is pre-norm attention + pre-norm feed-forward on the residual stream. Each block records
what it computed through ``sow`` into the ``intermediates`` collection (tokens processed,
query-key pairs); :mod:`ling_jax.ledger` turns those records into FLOPs.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ling_jax.array_types import HostArray
from ling_jax.config import ConfigError, ModelConfig
from ling_jax.ledger import kv_flops_per_token
from ling_jax.layers.attention import AttentionMask
from ling_jax.layers.mla import attention_class
from ling_jax.layers.basics import MLP, Embed, RMSNorm, compute_dtype, dense_init, param_with_axes
from ling_jax.layers.pruning_compaction import compact_after_block, expand_compacted
from ling_jax.layers import depth as depth_lib
from ling_jax.layers import kv_cache
from ling_jax.policy import InferencePolicy, inference_policy
from ling_jax.routing import compact, expand, selection_indices, token_capacity
from ling_jax.token_state import TokenState


class Block(nn.Module):
    """Pre-norm transformer block: ``(x, mask, state) -> (x, mask, state)``.

    ``state`` is the :class:`~ling_jax.token_state.TokenState` (per-token state such as cascaded
    pruning keep flags, and the call context: policy, KV-cache operation).

    Hook points: a token pruner before attention on pruning layers (it may tighten ``mask``),
    and an MoE layer in place of the MLP on MoE layers.

    ``queries`` (adaptive depth) restricts the work to some tokens: ``(indices [B, C], valid
    [B, C])`` from :func:`ling_jax.routing.selection_indices`. Every token still gives keys and
    values (from its current state); only the ``C`` selected tokens get queries, attention output
    and the feed-forward, and only they are updated. ``C`` may be 0 (keys and values only).
    """

    config: ModelConfig
    layer_index: int

    @nn.compact
    def __call__(self, x: Float[Array, "B T E"], mask: AttentionMask, state: TokenState,
                 queries: Optional[tuple[Int[Array, "B C"], Bool[Array, "B C"]]] = None
                 ) -> tuple[Array, AttentionMask, TokenState]:
        cfg = self.config
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = RMSNorm(cfg.norm_eps, name="attn_norm")(x)
        attn = attention_class(cfg)(cfg, name="attn")
        if self.layer_index in cfg.pruning_layers:
            from ling_jax.layers.pruning import TokenPruner
            from ling_jax.layers.pruning_baselines import PREFILL_ATTENTION_POLICIES

            received = None  # attention-driven baselines score the prompt by this layer's attention
            if cfg.pruning.baseline in PREFILL_ATTENTION_POLICIES and state.cache_op == kv_cache.PREFILL:
                if not hasattr(attn, "received_attention"):
                    raise ConfigError(f"pruning baseline {cfg.pruning.baseline!r} needs attention='mha'")
                received = attn.received_attention(h, mask, cfg.pruning.baseline)
            mask, state = TokenPruner(cfg, self.layer_index, name="pruner")(h, mask, state, received)
            if queries is None and state.prune_select is not None and cfg.pruning.compaction_start == "this_layer":
                # compaction starts here: only the kept tokens get queries and the feed-forward
                # (the Transformer drops the others after this block, from their state before it)
                queries = selection_indices(state.prune_select & mask.q_valid,
                                            token_capacity(x.shape[1], budget=cfg.pruning.budget))
        kv_only = 0.0  # tokens whose keys and values are computed without their query
        if queries is None:
            x_q, h_q, q_mask, kv_x = x, h, mask, None
        else:
            indices, slot_valid = queries
            x_q, h_q = compact(x, indices), compact(h, indices)  # [B, C, E]
            q_mask, kv_x = mask.select_queries(indices, slot_valid), h
            b, t, c = x.shape[0], x.shape[1], indices.shape[1]
            # With no query and no cache to fill, nothing reads the keys: XLA drops them.
            if c > 0 or state.cache_op is not None:
                kv_only = b * (t - c)
        if self.layer_index in cfg.pruning_layers or cfg.depth.exit_enabled:
            self.sow("intermediates", "flops_kv_only", jnp.float32(kv_only * kv_flops_per_token(cfg)))
        n_tokens = jnp.float32(x_q.shape[0] * x_q.shape[1])  # every computed slot counts, valid or not
        x_q = x_q + attn(h_q, q_mask, state, kv_x=kv_x).astype(x.dtype)
        h_q = RMSNorm(cfg.norm_eps, name="mlp_norm")(x_q)
        if self.layer_index in cfg.moe_layers:
            from ling_jax.layers.moe import MoE

            ffn_out = MoE(cfg, name="moe")(h_q, q_mask.q_valid)
        else:
            ffn_out = MLP(cfg, name="mlp")(h_q)
            self.sow("intermediates", "mlp_tokens", n_tokens)
        x_q = x_q + ffn_out.astype(x.dtype)
        self.sow("intermediates", "tokens_computed", n_tokens)
        if queries is not None:
            x_q = expand(x_q, indices, slot_valid, x)  # [B, T, E]: unselected tokens unchanged
        return x_q, mask, state


class Transformer(nn.Module):
    """Decoder-only language model over byte tokens.

    ``__call__(tokens, positions=None, valid=None)`` returns logits ``[B, T, V]`` in float32.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=compute_dtype(cfg), name="embed")
        block_cls = nn.remat(Block) if cfg.remat == "block" else Block
        self.blocks = [block_cls(cfg, i, name=f"block_{i}") for i in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg.norm_eps, name="final_norm")
        # Adaptive depth (MoD routing, early exit) wraps every block when enabled.
        self.depth_layers = ([depth_lib.DepthLayer(cfg, i, name=f"block_{i}_depth") for i in range(cfg.num_layers)]
                             if depth_lib.enabled(cfg) else [])
        if not cfg.tie_embeddings:
            self.head = param_with_axes(
                self, "head", dense_init(cfg.d_model), (cfg.d_model, cfg.vocab_size), ("embed", "vocab")
            )

    def logits(self, x: Float[Array, "B T E"], norm=None, tokens=None) -> Float[Array, "B T V"]:
        """Output head on the final-normed hidden state (shared by early-exit heads).

        ``norm`` replaces the final norm (an exit head's own norm); ``tokens`` is the number of
        tokens the head really serves, for the ledger (default: all of them).
        """
        h = (norm or self.final_norm)(x)
        if self.config.tie_embeddings:
            out = self.embed.attend(h)
        else:
            out = h @ self.head.astype(h.dtype)
        self.sow("intermediates", "head_tokens", jnp.float32(x.shape[0] * x.shape[1]) if tokens is None else tokens)
        return out.astype(jnp.float32)

    def __call__(
        self,
        tokens: Int[HostArray, "B T"],
        positions: Optional[Int[HostArray, "B T"]] = None,
        valid: Optional[Bool[HostArray, "B T"]] = None,
        targets: Optional[Int[HostArray, "B T"]] = None,
        loss_mask: Optional[Float[HostArray, "B T"]] = None,
        forced_exit: Optional[Int[HostArray, "B T"]] = None,
        state: Optional[TokenState] = None,
        policy: Optional[InferencePolicy] = None,
        last_only: bool = False,
    ) -> Float[Array, "B T V"] | Float[Array, "B 1 V"]:
        """``targets``/``loss_mask`` train the early-exit heads (``loss_exit``); ``forced_exit`` [B, T]
        replaces the exit rule in inference (exit after that layer; ``num_layers - 1``: never).
        ``state`` seeds the :class:`~ling_jax.token_state.TokenState`: the training ``step``, the
        task's ``oracle`` mask [B, T], a KV-cache ``cache_op`` with ``cache_slots``
        (:mod:`ling_jax.generate`). ``policy`` (:mod:`ling_jax.policy`) holds the call-time
        thresholds, traced: a sweep over them compiles once (default: the config's values).
        ``last_only``: logits of the last position only ``[B, 1, V]`` (a prefill's next-token
        prediction; with left padding that is every row's last token)."""
        # host (NumPy) batches become device arrays here; the layers take jax.Array
        tokens, positions, valid, targets, loss_mask, forced_exit = (
            None if a is None else jnp.asarray(a) for a in (tokens, positions, valid, targets, loss_mask, forced_exit))
        b, t = tokens.shape
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} is larger than the model supports (max_seq_len={self.config.max_seq_len})")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = AttentionMask.causal_self(positions, valid)
        x = self.embed(tokens)  # [B, T, E]
        state = (state or TokenState()).replace(policy=inference_policy(self.config) if policy is None else policy)
        state = depth_lib.start_state(self.config, state, b, t).replace(forced_exit=forced_exit)
        if targets is not None and self.config.pruning.enabled and self.config.pruning.compaction:
            raise ValueError("early-exit training targets need every token in every layer: train with "
                             "model.pruning.compaction=false (compaction is an inference setting)")
        full_mask = mask
        compaction = None  # pruning: where the compacted sequence lives (ling_jax/layers/pruning_compaction.py)
        for i, block in enumerate(self.blocks):
            if self.depth_layers:
                x, mask, state = depth_lib.run_layer(self, i, x, mask, state, targets, loss_mask)
            else:
                x, mask, state = block(x, mask, state)
            # -- pruning: drop the tokens this block's pruner did not keep from all later layers --
            x, mask, state, compaction = compact_after_block(self.config, x, mask, state, compaction)
        x, state = expand_compacted(x, state, compaction)  # pruning: compacted tokens back to [B, T, ...]
        if self.depth_layers:
            if last_only:
                raise ValueError("last_only=True is not supported with adaptive depth (its exit heads score every token)")
            return depth_lib.finish(self, x, full_mask, state)
        return self.logits(x[:, -1:] if last_only else x)  # [B, 1 or T, V]


def forward_with_stats(
    model: Transformer, variables: dict, tokens: Int[Array, "B T"], **kwargs
) -> tuple[Float[Array, "B T V"], dict]:
    """Runs the model and returns (logits, intermediates) with every recorded statistic.

    ``variables`` is ``{"params": ..., <other collections>}`` as returned by ``model.init``.
    """
    logits, state = model.apply(variables, tokens, mutable=["intermediates"], **kwargs)
    return logits, state["intermediates"]


def init_params(model: Transformer, rng: jax.Array, batch_size: int = 1, seq_len: int = 8):
    """Initialises parameters (boxed with logical axis names)."""
    tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
    return model.init(rng, tokens)["params"]
