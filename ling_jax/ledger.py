"""The compute ledger: analytic FLOPs from the counts the layers record.

Layers ``sow`` counts into the ``intermediates`` collection; this module multiplies them by the
cost of one unit of work. Count names (summed over the batch):

``tokens_computed``      tokens through the attention projections (Q, K, V, O; MLA: its low-rank ones)
``attn_pairs_computed``  (query, key) pairs the attention implementation actually evaluated
``attn_pairs_visible``   pairs with a visible key: what an ideal sparse kernel evaluates
``mlp_tokens``           tokens through a dense SwiGLU MLP
``expert_evals``         (token, routed FFN expert) assignments; zero-compute experts excluded (ideal)
``expert_evals_computed`` the expert rows the dispatch implementation evaluates (computed)
``shared_evals``         (token, shared expert) evaluations
``router_tokens``        tokens scored by an MoE router
``head_tokens``          tokens through the output head (final and early-exit heads)
``flops_*``              FLOPs a layer computed itself (small scorers and routers)

The **token reduction factor** is dense FLOPs / FLOPs of the run, for the same input, in two kinds
that are never mixed (:func:`token_reduction_factor`): ``computed`` (what the compiled program
executes; headlines use it) and ``ideal`` (what an ideal sparse kernel would execute).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from ling_jax.config import ModelConfig


def unit_flops(cfg: ModelConfig) -> dict[str, float]:
    """FLOPs of one unit of each recorded count (a multiply-add is 2 FLOPs)."""
    e, h, v = cfg.d_model, cfg.num_heads, cfg.vocab_size
    expert_dim = cfg.moe.expert_dim or cfg.mlp_dim
    return {
        "tokens_computed": _query_flops(cfg) + kv_flops_per_token(cfg) + 2.0 * h * _head_dims(cfg)[1] * e,
        "attn_pairs": 2.0 * h * sum(_head_dims(cfg)),  # q.k and p.v
        "mlp_tokens": 6.0 * e * cfg.mlp_dim,
        "expert_evals": 6.0 * e * expert_dim,
        "shared_evals": 6.0 * e * expert_dim,
        "router_tokens": 2.0 * e * (cfg.moe.num_experts + cfg.moe.num_zero_experts),
        "head_tokens": 2.0 * e * v,
    }


def _head_dims(cfg: ModelConfig) -> tuple[int, int]:
    """(query/key head size, value head size)."""
    if cfg.attention == "mla":
        return cfg.mla.qk_head_dim, cfg.mla.v_head_dim
    return cfg.resolved_head_dim, cfg.resolved_head_dim


def _query_flops(cfg: ModelConfig) -> float:
    """FLOPs of the query projection of one token (MLA: through the q_lora_rank bottleneck)."""
    e, h, dqk = cfg.d_model, cfg.num_heads, _head_dims(cfg)[0]
    if cfg.attention == "mla" and cfg.mla.q_lora_rank:
        return 2.0 * cfg.mla.q_lora_rank * (e + h * dqk)
    return 2.0 * e * h * dqk


def kv_flops_per_token(cfg: ModelConfig) -> float:
    """FLOPs of the key and value projections of one token (part of ``tokens_computed``).
    MLA: the latent down-projection (with the shared rotary key) and the per-head up-projection."""
    if cfg.attention == "mla":
        m = cfg.mla
        return 2.0 * (cfg.d_model * (m.kv_lora_rank + m.qk_rope_head_dim)
                      + m.kv_lora_rank * cfg.num_heads * (m.qk_nope_head_dim + m.v_head_dim))
    return 2.0 * cfg.d_model * 2 * cfg.num_kv_heads * cfg.resolved_head_dim


def sown(intermediates: Mapping[str, Any]) -> dict[tuple[str, ...], tuple]:
    """Every sown entry of an ``intermediates`` tree by its module path: ``{("block_0", "attn",
    "kv_entries"): (value per call, ...)}`` (``flax.traverse_util.flatten_dict``). The one walker of
    sown statistics: the ledger, evaluation, training losses and router-bias updates read through it.
    Works on host values and on tracers inside ``jit``."""
    return traverse_util.flatten_dict(intermediates)


def _flatten(tree: Mapping[str, Any]) -> dict[tuple[str, ...], float]:
    """Each sown entry summed over its calls, on the host in float64."""
    return {path: float(sum(np.asarray(jax.device_get(x), dtype=np.float64).sum() for x in values))
            for path, values in sown(tree).items()}


def sown_total(intermediates: Mapping[str, Any], name: str) -> float:
    """Sum of every sown scalar called ``name`` anywhere in the tree (all layers, all calls)."""
    return sum((v for path, v in _flatten(intermediates).items() if path[-1] == name), 0.0)


# Terms priced twice: what the implementation evaluates (computed) and what an ideal sparse one
# would (ideal); each total takes one of each pair.
_IDEAL_ONLY = ("attn_ideal", "expert_ideal")
_COMPUTED_ONLY = ("attn_computed", "expert_computed", "flops_moe_dispatch")


@dataclasses.dataclass
class Ledger:
    """FLOPs by layer and component; `computed` uses pairs evaluated, `ideal` pairs visible."""

    per_layer: dict[str, dict[str, float]]
    counts: dict[str, dict[str, float]]

    @property
    def computed(self) -> float:
        return sum(v for layer in self.per_layer.values() for k, v in layer.items() if k not in _IDEAL_ONLY)

    @property
    def ideal(self) -> float:
        return sum(v for layer in self.per_layer.values() for k, v in layer.items() if k not in _COMPUTED_ONLY)

    def by_term(self) -> dict[str, float]:
        """``computed`` FLOPs by term (summed over layers): where the work of a run goes."""
        out: dict[str, float] = {}
        for layer in self.per_layer.values():
            for k, v in layer.items():
                if k not in _IDEAL_ONLY:
                    out[k] = out.get(k, 0.0) + v
        return out

    def count(self, name: str) -> float:
        return sum(layer.get(name, 0.0) for layer in self.counts.values())


def ledger_from_intermediates(cfg: ModelConfig, intermediates: Mapping[str, Any]) -> Ledger:
    """Groups the recorded counts by top-level module (block_i, head) and prices them."""
    units = unit_flops(cfg)
    counts: dict[str, dict[str, float]] = {}
    for path, value in _flatten(intermediates).items():
        group = path[0] if path[0].startswith("block_") else "head"
        name = path[-1]
        counts.setdefault(group, {})
        counts[group][name] = counts[group].get(name, 0.0) + value
    per_layer: dict[str, dict[str, float]] = {}
    for group, c in counts.items():
        flops = {}
        for name, value in c.items():
            if name in units:
                flops[name] = value * units[name]
            elif name.startswith("flops_"):
                flops[name] = value
        if "expert_evals" in c:  # the dispatch's own count, else (older records) the assignments
            flops.pop("expert_evals", None)
            flops["expert_computed"] = c.get("expert_evals_computed", c["expert_evals"]) * units["expert_evals"]
            flops["expert_ideal"] = c["expert_evals"] * units["expert_evals"]
        if "attn_pairs_computed" in c:
            flops["attn_computed"] = c["attn_pairs_computed"] * units["attn_pairs"]
            flops["attn_ideal"] = c.get("attn_pairs_visible", c["attn_pairs_computed"]) * units["attn_pairs"]
        per_layer[group] = flops
    return Ledger(per_layer=per_layer, counts=counts)


def dense_forward_flops(cfg: ModelConfig, batch_size: int, seq_len: int, *, causal_ideal: bool = False) -> float:
    """FLOPs of the dense baseline model (every token, every layer, full T x T attention).

    With ``causal_ideal`` the attention term counts only the causal half (T(T+1)/2 pairs).
    """
    units = unit_flops(cfg)
    tokens = batch_size * seq_len
    pairs = batch_size * (seq_len * (seq_len + 1) / 2 if causal_ideal else seq_len * seq_len)
    per_layer = tokens * units["tokens_computed"] + pairs * units["attn_pairs"] + tokens * units["mlp_tokens"]
    return cfg.num_layers * per_layer + tokens * units["head_tokens"]


def token_reduction_factor(cfg: ModelConfig, ledger: Ledger, batch_size: int, seq_len: int,
                           kind: str = "computed") -> float:
    """Dense FLOPs / FLOPs of this run, of one ``kind`` (never mixed):

    ``computed``  what the dense model's compiled program executes (full T x T attention scores)
                  / what this run's compiled program executes (``Ledger.computed``): a *realized*
                  saving, which XLA's cost analysis and a timer confirm;
    ``ideal``     the dense model's causal pairs only / what an ideal sparse kernel would execute
                  (``Ledger.ideal``: attention at visible pairs only).
    """
    if kind == "computed":
        return dense_forward_flops(cfg, batch_size, seq_len) / ledger.computed
    if kind == "ideal":
        return dense_forward_flops(cfg, batch_size, seq_len, causal_ideal=True) / ledger.ideal
    raise ValueError(f"token_reduction_factor: kind must be 'computed' or 'ideal', got {kind!r}")


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the dense model at a given sequence length (causal-ideal)."""
    return dense_forward_flops(cfg, 1, seq_len, causal_ideal=True) / seq_len
