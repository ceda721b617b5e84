"""Grouped-query causal attention with token masks, and one ``impl`` switch.

Masks are described at the token level by :class:`AttentionMask` (validity, pruning keep flags,
soft log-keep scores, sinks and a local window). The ``reference`` and ``xla`` paths build the
dense ``[B, Tq, Tk]`` mask from it; the ``pallas`` path hands the token masks to the block-sparse
kernel, which skips key blocks with nothing visible.

Visibility of key j to query i (positions p), with protected = p_j < num_sinks | p_i - p_j < window:
    valid_q[i] & valid_k[j] & (p_j <= p_i if causal) & (keep[j] | protected) & (p_i < expire[j] | protected)
A soft log-keep score is added to the logits of keys that are neither sinks nor in the window.
``expire`` (budget pruning) is per-query, so it needs the dense paths (``auto`` falls back to xla).

With a token state holding a cache operation (``TokenState.cache_op``), :class:`Attention` also keeps a per-layer KV cache for decoding
(:mod:`ling_jax.layers.kv_cache`).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ling_jax.config import ModelConfig
from ling_jax.layers import kv_cache
from ling_jax.layers.basics import apply_rope, compute_dtype, dense_init, param_with_axes
from ling_jax.token_state import TokenState

IMPLS = ("reference", "xla", "pallas", "auto")
_NEG_INF = -1e30


@flax.struct.dataclass
class AttentionMask:
    """Token-level description of which keys each query may see."""

    q_positions: Int[Array, "B Tq"]
    kv_positions: Int[Array, "B Tk"]
    q_valid: Bool[Array, "B Tq"]
    kv_valid: Bool[Array, "B Tk"]
    kv_keep: Optional[Bool[Array, "B Tk"]] = None  # hard pruning decision (None: keep all)
    kv_log_keep: Optional[Float[Array, "B Tk"]] = None  # soft pruning: log keep-probability
    # budget pruning: key j is hidden (outside sinks/window) from queries at positions >= kv_expire[j]
    kv_expire: Optional[Int[Array, "B Tk"]] = None
    causal: bool = flax.struct.field(pytree_node=False, default=True)
    window: int = flax.struct.field(pytree_node=False, default=0)
    num_sinks: int = flax.struct.field(pytree_node=False, default=0)

    @classmethod
    def causal_self(cls, positions: Int[Array, "B T"], valid: Optional[Bool[Array, "B T"]] = None) -> "AttentionMask":
        valid = jnp.ones(positions.shape, bool) if valid is None else valid
        return cls(q_positions=positions, kv_positions=positions, q_valid=valid, kv_valid=valid)

    def protected(self) -> Bool[Array, "B Tq Tk"]:
        """Keys that pruning may never hide: sinks and the local window of each query."""
        qp, kp = self.q_positions[:, :, None], self.kv_positions[:, None, :]
        return (kp < self.num_sinks) | ((qp - kp) < self.window)

    def dense(self) -> tuple[Bool[Array, "B Tq Tk"], Optional[Float[Array, "B Tq Tk"]]]:
        """Materialises the boolean visibility mask and the additive soft-pruning bias."""
        qp, kp = self.q_positions[:, :, None], self.kv_positions[:, None, :]
        mask = self.q_valid[:, :, None] & self.kv_valid[:, None, :]
        if self.causal:
            mask &= kp <= qp
        if self.kv_keep is not None or self.kv_expire is not None or self.kv_log_keep is not None:
            protected = self.protected()
        if self.kv_keep is not None:
            mask &= self.kv_keep[:, None, :] | protected
        if self.kv_expire is not None:
            mask &= (qp < self.kv_expire[:, None, :]) | protected
        bias = None
        if self.kv_log_keep is not None:
            bias = jnp.where(protected, 0.0, self.kv_log_keep[:, None, :].astype(jnp.float32))
        return mask, bias

    def gather(self, indices: Int[Array, "B C"], valid: Bool[Array, "B C"]) -> "AttentionMask":
        """The self-attention mask of a compacted sequence: tokens ``indices`` (in order), slots
        with ``valid=False`` invalid. Every per-token field travels with its token."""
        if self.q_positions.shape != self.kv_positions.shape:
            raise ValueError("AttentionMask.gather needs a self-attention mask (same query and key tokens), "
                             f"got q {self.q_positions.shape} and kv {self.kv_positions.shape}")
        take = lambda a: None if a is None else jnp.take_along_axis(a, indices, axis=1)
        return self.replace(
            q_positions=take(self.q_positions), kv_positions=take(self.kv_positions),
            q_valid=take(self.q_valid) & valid, kv_valid=take(self.kv_valid) & valid,
            kv_keep=take(self.kv_keep), kv_log_keep=take(self.kv_log_keep), kv_expire=take(self.kv_expire),
        )

    def select_queries(self, indices: Int[Array, "B C"], valid: Bool[Array, "B C"]) -> "AttentionMask":
        """The mask of queries ``indices`` (slots with ``valid=False`` invalid) against every key:
        for blocks that compute keys and values for all tokens but queries for a few."""
        take = lambda a: jnp.take_along_axis(a, indices, axis=1)  # noqa: E731  [B, C]
        return self.replace(q_positions=take(self.q_positions), q_valid=take(self.q_valid) & valid)

    def visible_pairs(self) -> Float[Array, ""]:
        """Number of (batch, query, key) pairs with a visible key: the work an ideal kernel does."""
        return jnp.sum(self.dense()[0], dtype=jnp.float32)


def resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {list(IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"
    return impl


def reference_attention(
    q: Float[Array, "B Tq H D"],
    k: Float[Array, "B Tk Hkv D"],
    v: Float[Array, "B Tk Hkv Dv"],
    mask: Bool[Array, "B Tq Tk"],
    bias: Optional[Float[Array, "B Tq Tk"]] = None,
) -> Float[Array, "B Tq H Dv"]:
    """Plain-jnp ground truth: repeat KV heads, float32 softmax, fully masked rows give zeros."""
    group = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, group, axis=2)  # [B, Tk, H, D]
    v = jnp.repeat(v, group, axis=2)  # [B, Tk, H, Dv]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias[:, None]
    logits = jnp.where(mask[:, None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1) * jnp.any(mask, axis=-1)[:, None, :, None]
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def xla_attention(
    q: Float[Array, "B Tq H D"],
    k: Float[Array, "B Tk Hkv D"],
    v: Float[Array, "B Tk Hkv Dv"],
    mask: Bool[Array, "B Tq Tk"],
    bias: Optional[Float[Array, "B Tq Tk"]] = None,
) -> Float[Array, "B Tq H Dv"]:
    """Fast XLA path: head-major ``[B, H, Tq, Tk]`` logits with the KV heads repeated per group.

    On CPU this layout is ~1.5x faster forward + backward than grouped 5-D einsums
    (``bqngd,bknd->bngqk``), which XLA lowers to transposes around small batched dots
    (``experiments/train_profile.py`` measures the attention core; repeating K/V costs G x their
    memory, small next to the logits). The softmax max is a constant for the gradient (it cancels).
    """
    b, tq, h, d = q.shape
    group = h // k.shape[2]
    k = jnp.repeat(k, group, axis=2)  # [B, Tk, H, D]
    v = jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (d**-0.5)  # [B, H, Tq, Tk]
    if bias is not None:
        logits = logits + bias[:, None]
    logits = jnp.where(mask[:, None], logits, _NEG_INF)
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    row_any = jnp.any(mask, axis=-1)[:, None, :, None]  # [B, 1, Tq, 1]
    p = jnp.where(row_any, p / denom, 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v)  # [B, Tq, H, Dv]


def dpa_attention(
    q: Float[Array, "B Tq H D"],
    k: Float[Array, "B Tk Hkv D"],
    v: Float[Array, "B Tk Hkv D"],
    mask: Bool[Array, "B Tq Tk"],
    bias: Optional[Float[Array, "B Tq Tk"]] = None,
) -> Float[Array, "B Tq H D"]:
    """``jax.nn.dot_product_attention`` (XLA implementation; GQA, boolean mask and additive bias);
    rows with no visible key are zeroed, as in :func:`reference_attention`. Measured beside
    :func:`xla_attention` (``experiments/bench_attention_xla.py``), not the ``xla`` path: see there.
    It needs value heads of the query/key size (MLA's are not)."""
    out = jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias[:, None].astype(q.dtype),
                                       mask=mask[:, None], scale=q.shape[-1] ** -0.5, implementation="xla")
    row_any = jnp.any(mask, axis=-1)[:, :, None, None]  # [B, Tq, 1, 1]
    return jnp.where(row_any, out, 0.0).astype(v.dtype)  # [B, Tq, H, D]


def attend(
    q: Float[Array, "B Tq H D"],
    k: Float[Array, "B Tk Hkv D"],
    v: Float[Array, "B Tk Hkv Dv"],
    mask: AttentionMask,
    *,
    impl: str = "auto",
) -> Float[Array, "B Tq H Dv"]:
    """Masked attention through the chosen implementation."""
    requested, impl = impl, resolve_impl(impl)
    if requested == "auto" and impl == "pallas" and (mask.kv_log_keep is not None or mask.kv_expire is not None):
        impl = "xla"  # per-query soft/budget masks are beyond the token-level block-sparse kernel
    if impl == "pallas":
        if mask.kv_expire is not None:
            raise ValueError("impl='pallas' takes token-level masks only; budget pruning (kv_expire) needs 'xla' or 'reference'")
        if mask.kv_log_keep is not None:
            raise ValueError("impl='pallas' takes hard masks only; soft pruning (kv_log_keep) needs 'xla' or 'reference'")
        from pallas_kernels.block_sparse_attention import block_sparse_attention

        # The kernel is causal by index; positions equal indices unless the sequence was
        # compacted, where index order still follows position order (self-attention).
        kv_mask = mask.kv_valid
        if mask.kv_keep is not None:
            kv_mask = kv_mask & (mask.kv_keep | (mask.kv_positions < mask.num_sinks))
        # The kernel takes one head size: pad the smaller of qk / v (MLA) with zeros, slice after.
        dqk, dv = q.shape[-1], v.shape[-1]
        pad = lambda a, n: jnp.pad(a, [(0, 0)] * 3 + [(0, n - a.shape[-1])])  # noqa: E731
        dp = max(dqk, dv)
        out = block_sparse_attention(
            pad(q, dp), pad(k, dp), pad(v, dp), q_mask=mask.q_valid, kv_mask=kv_mask, causal=mask.causal,
            window=mask.window if mask.kv_keep is not None else 0, impl="pallas", sm_scale=dqk**-0.5,
        )
        return out[..., :dv]  # [B, Tq, H, Dv]
    dense_mask, bias = mask.dense()
    fn = reference_attention if impl == "reference" else xla_attention
    return fn(q, k, v, dense_mask, bias)


class QKNorm(nn.Module):
    """RMSNorm of queries or keys ``[B, T, H, D]``: over ``D`` with a ``[D]`` scale (``full=False``,
    Qwen3), or over all heads ``H * D`` with a ``[H, D]`` scale (``full=True``, OLMoE)."""

    eps: float = 1e-6
    full: bool = False
    heads_axis: str = "heads"  # logical name of H: "heads" (queries) or "kv_heads" (keys)

    @nn.compact
    def __call__(self, x: Float[Array, "B T H D"]) -> Float[Array, "B T H D"]:
        axes = (-2, -1) if self.full else (-1,)
        shape, names = (x.shape[-2:], (self.heads_axis, "head_dim")) if self.full else (x.shape[-1:], ("head_dim",))
        scale = param_with_axes(self, "scale", nn.initializers.ones, shape, names)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + self.eps)
        return (normed * scale).astype(x.dtype)


class Attention(nn.Module):
    """GQA self-attention with rotary embeddings. Records query/key work for the ledger.

    ``state`` (optional, the block's :class:`~ling_jax.token_state.TokenState`) switches on the KV
    cache (flax collection ``"cache"``, see :mod:`ling_jax.layers.kv_cache`): ``state.cache_op ==
    "prefill"`` runs the usual forward
    pass and then stores the keys the last query of each row can see; ``"decode"`` runs one token
    per row against the cache (:meth:`decode`). Layers under pruning (a pruner left
    ``state.prune_priority``) get ``config.pruning.budget`` slots, the others ``state.cache_slots``.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        e, h, hkv, d = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        self.wq = param_with_axes(self, "wq", dense_init(e), (e, h, d), ("embed", "heads", "head_dim"))
        self.wk = param_with_axes(self, "wk", dense_init(e), (e, hkv, d), ("embed", "kv_heads", "head_dim"))
        self.wv = param_with_axes(self, "wv", dense_init(e), (e, hkv, d), ("embed", "kv_heads", "head_dim"))
        self.wo = param_with_axes(self, "wo", dense_init(h * d), (h, d, e), ("heads", "head_dim", "embed"))
        if cfg.qkv_bias:  # Qwen2
            zeros = nn.initializers.zeros
            self.bq = param_with_axes(self, "bq", zeros, (h, d), ("heads", "head_dim"))
            self.bk = param_with_axes(self, "bk", zeros, (hkv, d), ("kv_heads", "head_dim"))
            self.bv = param_with_axes(self, "bv", zeros, (hkv, d), ("kv_heads", "head_dim"))
        if cfg.qk_norm != "none":  # Qwen3: one scale per head_dim; OLMoE: over the whole projection
            self.q_norm = QKNorm(cfg.norm_eps, full=cfg.qk_norm == "full", name="q_norm")
            self.k_norm = QKNorm(cfg.norm_eps, full=cfg.qk_norm == "full", heads_axis="kv_heads", name="k_norm")

    def _project(self, x, w, bias_name: str, norm_name: str):
        """x @ w (+ bias) (-> RMSNorm): the q or k/v projection before RoPE."""
        dtype = compute_dtype(self.config)
        y = jnp.einsum("bte,ehd->bthd", x.astype(dtype), w.astype(dtype))  # [B, T, H(kv), D]
        if self.config.qkv_bias:
            y = y + getattr(self, bias_name).astype(dtype)
        if norm_name and self.config.qk_norm != "none":
            y = getattr(self, norm_name)(y)
        return y

    def _rope(self, x, positions):
        return apply_rope(x, positions, self.config.rope_base, self.config.rope_scaling)

    def _query(self, x: Float[Array, "B T E"], positions: Int[Array, "B T"]) -> Float[Array, "B T H D"]:
        q = self._rope(self._project(x, self.wq, "bq", "q_norm"), positions)  # [B, T, H, D]
        return nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))

    def _key_value(self, x: Float[Array, "B T E"], positions: Int[Array, "B T"]) -> tuple[Array, Array]:
        k = self._rope(self._project(x, self.wk, "bk", "k_norm"), positions)  # [B, T, Hkv, D]
        v = self._project(x, self.wv, "bv", "")
        return nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim")), v

    def _output(self, out: Float[Array, "B T H D"]) -> Float[Array, "B T E"]:
        dtype = compute_dtype(self.config)
        return jnp.einsum("bthd,hde->bte", out, self.wo.astype(dtype))

    def __call__(self, x: Float[Array, "B Tq E"], mask: AttentionMask, state: Optional[TokenState] = None,
                 kv_x: Optional[Float[Array, "B Tk E"]] = None) -> Float[Array, "B Tq E"]:
        """Queries from ``x``; keys and values from ``kv_x`` (default ``x``: self-attention)."""
        state = state or TokenState()
        cache_op = state.cache_op
        if cache_op == kv_cache.DECODE:
            if x.shape[1] == 0:  # no query this step (every row exited): write the keys and values only
                self._store(self._write(self._load(), kv_x, mask, state))
                for name in ("attn_pairs_visible", "attn_pairs_computed"):
                    self.sow("intermediates", name, jnp.float32(0.0))
                self.sow("intermediates", "kv_entries", jnp.sum(self._load()["pos"] >= 0, dtype=jnp.float32))
                return jnp.zeros(x.shape, compute_dtype(self.config))
            return self.decode(x, mask, state)
        q = self._query(x, mask.q_positions)
        k, v = self._key_value(x if kv_x is None else kv_x, mask.kv_positions)
        # Queries of a subset of the tokens (adaptive depth): their indices no longer match the key
        # order the block-sparse kernel's causality assumes, so the position-masked XLA path runs.
        impl = self.config.attention_impl if kv_x is None else "xla"
        out = attend(q, k, v, mask, impl=impl)  # [B, Tq, H, D]
        b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
        held = kv_cache.held_by_last_query(mask)  # [B, Tk]: what a KV cache would hold afterwards
        self.sow("intermediates", "attn_pairs_visible", mask.visible_pairs())
        self.sow("intermediates", "attn_pairs_computed", jnp.float32(b * tq * tk))
        self.sow("intermediates", "kv_entries", jnp.sum(held, dtype=jnp.float32))
        if cache_op == kv_cache.PREFILL:
            self._prefill_cache(k, v, mask, state, held)
        return self._output(out)

    def received_attention(self, x: Float[Array, "B T E"], mask: AttentionMask, kind: str) -> Float[Array, "B T"]:
        """The attention each token receives from the last queries of ``x`` under ``kind``
        (``"h2o"``: every query, ``"tova"``: the last, ``"snapkv"``: the last window), for the
        attention-driven pruning baselines in a cache prefill. Its query-key work goes to the
        ledger (``flops_received_attention``): the baseline reads attention scores the pruned
        layer then does not compute."""
        from ling_jax.layers.pruning_baselines import observing_queries, received_attention

        b, t = x.shape[:2]
        n = observing_queries(kind, t)
        q = self._query(x[:, t - n:], mask.q_positions[:, t - n:])  # [B, n, H, D]
        k, _ = self._key_value(x, mask.kv_positions)  # [B, T, Hkv, D]
        cfg = self.config
        hd = cfg.num_heads * cfg.resolved_head_dim
        self.sow("intermediates", "flops_received_attention",
                 jnp.float32(b * n * (2 * cfg.d_model * hd + 2 * t * hd) + b * t * 2 * cfg.d_model * cfg.num_kv_heads * cfg.resolved_head_dim))
        return received_attention(q, k, mask.q_positions[:, t - n:], mask.q_valid[:, t - n:], mask.kv_positions,
                                  mask.kv_valid, kind)

    # ------------------------------------------------------------------------- KV cache

    def _slots(self, state: TokenState) -> int:
        if state.prune_priority is not None:  # under pruning: a fixed budget
            return self.config.pruning.budget
        if state.cache_slots <= 0:
            raise ValueError("an unpruned layer's KV cache needs TokenState.cache_slots > 0 (the context length to hold)")
        return int(state.cache_slots)

    def _policy(self, state: TokenState) -> Optional[str]:
        """``"h2o"``/``"tova"`` when this layer's cache priorities come from attention."""
        baseline = self.config.pruning.baseline
        if state.prune_priority is not None and baseline in ("h2o", "tova"):
            return baseline
        return None

    def _token_state(self, mask: AttentionMask, state: TokenState) -> tuple[Array, Array]:
        """Per-token (score, keep) the cache stores for the keys of ``mask``."""
        score = state.prune_priority
        score = jnp.zeros(mask.kv_positions.shape, jnp.float32) if score is None else score.astype(jnp.float32)
        keep = jnp.ones(mask.kv_positions.shape, bool) if mask.kv_keep is None else mask.kv_keep
        return score, keep

    def _prefill_cache(self, k, v, mask: AttentionMask, state: TokenState, held) -> None:
        score, keep = self._token_state(mask, state)
        last = jnp.max(jnp.where(mask.q_valid, mask.q_positions, -1), axis=1)  # [B]
        first = kv_cache.protected(mask.kv_positions, last, mask.num_sinks, mask.window)
        rank = jnp.where(first, jnp.inf, jnp.where(keep, score, -1e30))  # sinks and window first
        cache = kv_cache.from_sequence(k, v, mask.kv_positions, held, rank, score, keep, self._slots(state))
        self._store(cache)

    def _load(self) -> kv_cache.Cache:
        if not self.has_variable("cache", "pos"):
            raise ValueError("decoding needs a KV cache: run a prefill first (ling_jax.generate.prefill)")
        return {name: self.get_variable("cache", name) for name in ("k", "v", "pos", "score", "keep")}

    def _store(self, cache: kv_cache.Cache) -> None:
        for name, value in cache.items():
            self.put_variable("cache", name, value)

    def _write(self, cache: kv_cache.Cache, x: Float[Array, "B 1 E"], mask: AttentionMask, state: TokenState) -> kv_cache.Cache:
        if x.shape[1] != 1:
            raise ValueError(f"KV-cache decoding takes one token per row, got {x.shape[1]}")
        k, v = self._key_value(x, mask.kv_positions)  # [B, 1, Hkv, D]
        score, keep = self._token_state(mask, state)
        pos = mask.kv_positions[:, 0]
        slot = kv_cache.choose_slot(cache, pos, mask.num_sinks, mask.window)
        return kv_cache.write(cache, slot, k[:, 0], v[:, 0], pos, score[:, 0], keep[:, 0], mask.kv_valid[:, 0])

    def write_kv(self, x: Float[Array, "B 1 E"], mask: AttentionMask, state: TokenState) -> None:
        """Projects the keys and values of one token per row and writes them into the cache
        (with eviction), without computing attention: for tokens that provide keys to later
        queries but need no output here (e.g. tokens that exited at a lower layer)."""
        self._store(self._write(self._load(), x, mask, state))

    def decode(self, x: Float[Array, "B 1 E"], mask: AttentionMask, state: TokenState) -> Float[Array, "B 1 E"]:
        """One decoding step: write the new token's K/V (evicting if full), attend over the cache."""
        cache = self._write(self._load(), x, mask, state)
        q = self._query(x, mask.q_positions)[:, 0]  # [B, H, D]
        q_pos, q_valid = mask.q_positions[:, 0], mask.q_valid[:, 0]
        vis = kv_cache.visible(cache, q_pos, q_valid, mask.num_sinks, mask.window)  # [B, S]
        out, probs = kv_cache.attend(q, cache, vis)
        policy = self._policy(state)
        if policy is not None:
            cache = kv_cache.update_scores(cache, probs, policy, q_valid)
        self._store(cache)
        b, s = vis.shape
        self.sow("intermediates", "attn_pairs_visible", jnp.sum(vis, dtype=jnp.float32))
        self.sow("intermediates", "attn_pairs_computed", jnp.float32(b * s))
        self.sow("intermediates", "kv_entries", jnp.sum(cache["pos"] >= 0, dtype=jnp.float32))
        return self._output(out[:, None])
