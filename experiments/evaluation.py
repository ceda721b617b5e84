"""Evaluation and timing for the experiments: quality, the ledger's token reduction factor, and
measured prefill / decode time relative to the dense model in the same run.

Jitted functions are cached by (static) model config, so a sweep compiles each inference variant
once and reuses it across tasks and seeds that share shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.config import ModelConfig
from ling_jax.ledger import dense_forward_flops, ledger_from_intermediates
from ling_jax.model import Transformer, forward_with_stats

LN2 = math.log(2.0)


def dense_of(config: ModelConfig) -> ModelConfig:
    """The same architecture with every token-skipping mechanism off (the timing/FLOPs reference)."""
    from ling_jax.config import DepthConfig, MoEConfig, PruningConfig

    return dataclasses.replace(config, pruning=PruningConfig(), moe=MoEConfig(), depth=DepthConfig())


# ----------------------------------------------------------------------------- evaluation


def _carry_for(cfg: ModelConfig, oracle: Optional[jax.Array]) -> Optional[dict]:
    if cfg.pruning.enabled and cfg.pruning.baseline == "oracle":
        return {"oracle_keep": oracle}
    return None


@functools.lru_cache(maxsize=256)
def _eval_fn(cfg: ModelConfig) -> Callable:
    model = Transformer(cfg)

    def f(variables, batch):
        logits, inter = forward_with_stats(model, variables, batch["inputs"], carry=_carry_for(cfg, batch["oracle_mask"]))
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]  # [B, T]
        mask = batch["loss_mask"]
        correct = (jnp.argmax(logits, -1) == batch["targets"]) * mask
        return {"nll_sum": jnp.sum(nll * mask), "count": jnp.sum(mask), "correct": jnp.sum(correct)}, inter

    return jax.jit(f)


@functools.lru_cache(maxsize=64)
def _teacher_forced_fn(cfg: ModelConfig) -> Callable:
    """Evaluation through the KV cache, token by token (H2O / TOVA read attention while decoding)."""
    from ling_jax.generate import teacher_forced_decode

    def f(variables, batch):
        logits = teacher_forced_decode(cfg, variables["params"], batch["inputs"], oracle=batch["oracle_mask"])
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        mask = batch["loss_mask"]
        correct = (jnp.argmax(logits, -1) == batch["targets"]) * mask
        return {"nll_sum": jnp.sum(nll * mask), "count": jnp.sum(mask), "correct": jnp.sum(correct)}

    return f


def _sum_tree(tree: Mapping[str, Any], name: str) -> float:
    total = 0.0
    for key, value in tree.items():
        if isinstance(value, Mapping):
            total += _sum_tree(value, name)
        elif key == name:
            total += float(sum(np.asarray(jax.device_get(v), np.float64).sum() for v in value))
    return total


def _values(tree: Mapping[str, Any], name: str) -> list[float]:
    """Every sown scalar called ``name`` anywhere in the tree (one per layer and call)."""
    out: list[float] = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out += _values(value, name)
        elif key == name:
            out += [float(np.asarray(jax.device_get(v), np.float64).mean()) for v in value]
    return out


def evaluate(cfg: ModelConfig, variables: dict, batches: Sequence[dict], metric: str, *, decode: bool = False,
             means: Sequence[str] = ()) -> dict:
    """Quality, token reduction factor and keep ratio of ``cfg`` on ``batches``.

    Returns ``quality`` (accuracy, or bits per byte for ``metric="bpb"``), ``loss`` (nats),
    ``accuracy``, ``trf`` (dense causal-ideal FLOPs / FLOPs an ideal kernel computes, summed over
    the batches), ``trf_computed`` (the same with the FLOPs the implementation really evaluated),
    ``keep_ratio`` (tokens kept per pruning layer / valid tokens; 1.0 without pruning),
    ``pair_ratio`` (visible query-key pairs / causal pairs of the dense model) and
    ``layers_per_token``; each name in ``means`` adds the mean of that sown diagnostic over layers
    and batches (e.g. ``moe_zero_share``). ``decode=True`` evaluates through the KV cache token by token
    (``ling_jax.generate.teacher_forced_decode``); it has no ledger, so the FLOP fields are NaN.
    """
    nll = count = correct = 0.0
    dense = computed = ideal = 0.0
    kept = pairs = layer_tokens = depth_tokens = 0.0
    diag: dict[str, list[float]] = {name: [] for name in means}
    for batch in batches:
        b, t = batch["inputs"].shape
        if decode:
            out = jax.device_get(_teacher_forced_fn(cfg)(variables, batch))
        else:
            out, inter = _eval_fn(cfg)(variables, batch)
            out = jax.device_get(out)
            ledger = ledger_from_intermediates(cfg, inter)
            dense += dense_forward_flops(cfg, b, t, causal_ideal=True)
            computed += ledger.computed
            ideal += ledger.ideal
            kept += _sum_tree(inter, "tokens_kept")
            pairs += _sum_tree(inter, "attn_pairs_visible")
            layer_tokens += _sum_tree(inter, "depth_layer_tokens")
            depth_tokens += _sum_tree(inter, "depth_tokens")
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
        "trf": dense / ideal if ideal else nan,
        "trf_computed": dense / computed if computed else nan,
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


# ----------------------------------------------------------------------------- timing


def median_time(fn: Callable, *args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_relative(cfg: ModelConfig, variables: dict, dense_variables: dict, batch: dict, *, repeats: int) -> dict:
    """Prefill (one parallel forward pass over the batch) time of ``cfg`` relative to the dense model.

    The evaluation function is timed (forward pass plus a negligible loss reduction, identical
    for both), so no extra compilation is needed. The two alternate (dense, variant, dense, ...)
    and the ratio uses the medians, so load from other processes affects both alike.
    """
    f, g = _eval_fn(cfg), _eval_fn(dense_of(cfg))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    jax.block_until_ready(f(variables, batch))
    jax.block_until_ready(g(dense_variables, batch))
    tv, td = [], []
    for _ in range(max(repeats, 1)):
        for fn, vs, out in ((g, dense_variables, td), (f, variables, tv)):
            start = time.perf_counter()
            jax.block_until_ready(fn(vs, batch))
            out.append(time.perf_counter() - start)
    return {"prefill_s": float(np.median(tv)), "dense_prefill_s": float(np.median(td)),
            "prefill_rel": float(np.median(tv) / np.median(td))}


@functools.lru_cache(maxsize=64)
def _decode_fns(cfg: ModelConfig, slots: int, steps: int) -> tuple[Callable, Callable]:
    """(fill, run): fill a KV cache from a prompt; run ``steps`` greedy decode steps from it."""
    from ling_jax.generate import decode_step, decoding_model, empty_cache, prefill

    model = decoding_model(cfg)
    attention_policy = cfg.pruning.enabled and cfg.pruning.baseline in ("h2o", "tova")
    oracle_policy = cfg.pruning.enabled and cfg.pruning.baseline == "oracle"

    @jax.jit
    def fill(params, tokens, oracle):
        b = tokens.shape[0]
        if attention_policy:  # scores come from decoding; the cache arrays have the same shapes
            return empty_cache(model, params, b, slots)
        valid = jnp.ones(tokens.shape, bool)
        return prefill(model, params, tokens, valid, slots=slots, oracle=oracle if oracle_policy else None)[1]

    @jax.jit
    def run(params, cache, token, position):
        b = token.shape[0]
        ones, none = jnp.ones((b,), bool), (jnp.zeros((b,), bool) if oracle_policy else None)

        def step(carry, _):
            cache, tok, pos = carry
            logits, cache = decode_step(model, params, cache, tok, pos, ones, none)
            return (cache, jnp.argmax(logits, -1).astype(jnp.int32), pos + 1), None

        (_, tok, _), _ = jax.lax.scan(step, (cache, token, position), None, length=steps)
        return tok

    return fill, run


def time_decode_relative(cfg: ModelConfig, variables: dict, dense_variables: dict, batch: dict, *,
                         new_tokens: int, repeats: int) -> dict:
    """Per-token decode time of ``cfg`` (KV cache; layers under pruning hold ``budget`` slots)
    relative to the dense model (every layer holds the whole context), same run.

    The cache is filled from the first half of the batch's rows (H2O/TOVA: an empty cache of the
    same shapes, since their scores come from decoding), then ``new_tokens`` greedy decode steps
    run in one jitted scan; only the scan is timed. Variant and dense alternate, medians compared.
    """
    import flax.linen as nn

    t = batch["inputs"].shape[1]
    prompt = jnp.asarray(batch["inputs"][:, : t // 2])
    oracle = jnp.asarray(batch["oracle_mask"][:, : t // 2])
    slots = t // 2 + new_tokens
    token = prompt[:, -1]
    position = jnp.full((prompt.shape[0],), t // 2, jnp.int32)
    runs = []
    for c, vs in ((cfg, variables), (dense_of(cfg), dense_variables)):
        fill, run = _decode_fns(c, slots, new_tokens)
        params = nn.meta.unbox(vs["params"])
        cache = fill(params, prompt, oracle)
        jax.block_until_ready(run(params, cache, token, position))
        runs.append((run, params, cache, []))
    for _ in range(max(repeats, 1)):
        for run, params, cache, times in runs:
            start = time.perf_counter()
            jax.block_until_ready(run(params, cache, token, position))
            times.append(time.perf_counter() - start)
    variant, dense = (float(np.median(r[3])) / new_tokens for r in runs)
    return {"decode_s_per_token": variant, "dense_decode_s_per_token": dense, "decode_rel": variant / dense}
