"""Quality and work of a model variant on evaluation batches: bits per byte or accuracy, the
ledger's token reduction factor, keep ratio, visible pairs and layers per token.

Jitted functions are cached by (static) model config, so a sweep compiles each inference variant
once and reuses it for every batch and every seed that shares shapes. ``experiments/`` and the
CLI's pruning sweep (``ling_jax/sweep.py``) both evaluate through :func:`evaluate`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ling_jax.config import ModelConfig
from ling_jax.ledger import dense_forward_flops, ledger_from_intermediates, sown, sown_total
from ling_jax.model import Transformer, forward_with_stats
from ling_jax.policy import as_traced, inference_policy, static_config
from ling_jax.token_state import TokenState

LN2 = math.log(2.0)


def dense_of(config: ModelConfig) -> ModelConfig:
    """The same architecture with every token-skipping mechanism off (the timing/FLOPs reference)."""
    from ling_jax.config import DepthConfig, MoEConfig, PruningConfig

    return dataclasses.replace(config, pruning=PruningConfig(), moe=MoEConfig(), depth=DepthConfig())


# ----------------------------------------------------------------------------- evaluation


def _state_for(cfg: ModelConfig, oracle: Optional[jax.Array]) -> Optional[TokenState]:
    if cfg.pruning.enabled and cfg.pruning.baseline == "oracle":
        return TokenState(oracle=oracle)
    return None


def eval_fn(cfg: ModelConfig) -> Callable:
    """Jitted ``(variables, batch) -> (sums of nll, count, correct; sown intermediates)`` for ``cfg``.

    The thresholds of ``cfg`` go in as a traced :class:`~ling_jax.policy.InferencePolicy`, so
    configs that differ only in thresholds share one compiled program."""
    compiled = _eval_fn(static_config(cfg))
    policy = as_traced(inference_policy(cfg))
    return lambda variables, batch: compiled(variables, batch, policy)


@functools.lru_cache(maxsize=256)
def _eval_fn(cfg: ModelConfig) -> Callable:
    model = Transformer(cfg)

    def f(variables, batch, policy):
        logits, inter = forward_with_stats(model, variables, batch["inputs"], state=_state_for(cfg, batch["oracle_mask"]),
                                           policy=policy)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])  # [B, T]
        mask = batch["loss_mask"]
        correct = (jnp.argmax(logits, -1) == batch["targets"]) * mask
        return {"nll_sum": jnp.sum(nll * mask), "count": jnp.sum(mask), "correct": jnp.sum(correct)}, inter

    return jax.jit(f)


@functools.lru_cache(maxsize=64)
def _teacher_forced_fn(cfg: ModelConfig) -> Callable:
    """Evaluation through the KV cache, token by token (H2O / TOVA read attention while decoding)."""
    from ling_jax.generate import teacher_forced_decode

    def f(variables, batch):
        logits = teacher_forced_decode(cfg, variables, batch["inputs"], oracle=batch["oracle_mask"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
        mask = batch["loss_mask"]
        correct = (jnp.argmax(logits, -1) == batch["targets"]) * mask
        return {"nll_sum": jnp.sum(nll * mask), "count": jnp.sum(mask), "correct": jnp.sum(correct)}

    return f


def _values(tree: Mapping[str, Any], name: str) -> list[float]:
    """Every sown scalar called ``name`` anywhere in the tree (one per layer and call)."""
    return [float(np.asarray(jax.device_get(v), np.float64).mean())
            for path, values in sown(tree).items() if path[-1] == name for v in values]


def evaluate(cfg: ModelConfig, variables: dict, batches: Sequence[dict], metric: str, *, decode: bool = False,
             means: Sequence[str] = ()) -> dict:
    """Quality, token reduction factor and keep ratio of ``cfg`` on ``batches``.

    Returns ``quality`` (accuracy, or bits per byte for ``metric="bpb"``), ``loss`` (nats),
    ``accuracy``, ``trf_computed`` (FLOPs the dense model's program executes / FLOPs this
    variant's program executes, summed over the batches: realized), ``trf_ideal`` (dense causal
    FLOPs / FLOPs an ideal sparse kernel would execute), ``flops_dense|computed|ideal``,
    ``keep_ratio`` (tokens kept per pruning layer / valid tokens; 1.0 without pruning),
    ``pair_ratio`` (visible query-key pairs / causal pairs of the dense model) and
    ``layers_per_token``; each name in ``means`` adds the mean of that sown diagnostic over layers
    and batches (e.g. ``moe_zero_share``). ``decode=True`` evaluates through the KV cache token by token
    (``ling_jax.generate.teacher_forced_decode``); it has no ledger, so the FLOP fields are NaN.
    """
    nll = count = correct = 0.0
    dense = dense_ideal = computed = ideal = 0.0
    kept = pairs = layer_tokens = depth_tokens = 0.0
    diag: dict[str, list[float]] = {name: [] for name in means}
    for batch in batches:
        b, t = batch["inputs"].shape
        if decode:
            out = jax.device_get(_teacher_forced_fn(cfg)(variables, batch))
        else:
            out, inter = eval_fn(cfg)(variables, batch)
            out = jax.device_get(out)
            ledger = ledger_from_intermediates(cfg, inter)
            dense += dense_forward_flops(cfg, b, t)
            dense_ideal += dense_forward_flops(cfg, b, t, causal_ideal=True)
            computed += ledger.computed
            ideal += ledger.ideal
            kept += sown_total(inter, "tokens_kept")
            pairs += sown_total(inter, "attn_pairs_visible")
            layer_tokens += sown_total(inter, "depth_layer_tokens")
            depth_tokens += sown_total(inter, "depth_tokens")
            for name in means:
                diag[name].extend(_values(inter, name))
        nll += float(out["nll_sum"])
        count += float(out["count"])
        correct += float(out["correct"])
    loss = nll / max(count, 1.0)
    accuracy = correct / max(count, 1.0)
    tokens = sum(b["inputs"].shape[0] * b["inputs"].shape[1] for b in batches)
    causal_pairs = sum(b["inputs"].shape[0] * b["inputs"].shape[1] * (b["inputs"].shape[1] + 1) / 2 for b in batches)
    n_prune = len(cfg.pruning_layers)
    nan = float("nan")
    return {
        "quality": loss / LN2 if metric == "bpb" else accuracy,
        "loss": loss,
        "accuracy": accuracy,
        "trf_computed": dense / computed if computed else nan,
        "trf_ideal": dense_ideal / ideal if ideal else nan,
        "flops_dense": dense if not decode else nan,
        "flops_computed": computed if not decode else nan,
        "flops_ideal": ideal if not decode else nan,
        "keep_ratio": (kept / (n_prune * tokens) if n_prune else 1.0) if not decode else nan,
        "pair_ratio": pairs / (cfg.num_layers * causal_pairs) if not decode else nan,
        "layers_per_token": (layer_tokens / depth_tokens if depth_tokens else float(cfg.num_layers)) if not decode else nan,
        **{name: float(np.mean(v)) if v else nan for name, v in diag.items()},
    }


def relative_loss(quality: float, reference: float, metric: str) -> float:
    """Relative quality loss vs the reference (positive = worse): accuracy drop or bpb increase."""
    if metric == "bpb":
        return (quality - reference) / reference
    return (reference - quality) / reference if reference > 0 else float("nan")
