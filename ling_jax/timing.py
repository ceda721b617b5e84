"""Timing: programs measured side by side, so load from other processes hits them alike.

* :func:`interleaved` runs every program of a set once per round, after a warm-up call, and
  returns each one's wall and process-CPU seconds per call: the one timing loop of the
  benchmarks (``experiments/bench_*.py``);
* :func:`median_time` is the median wall time of one program;
* :func:`time_relative` / :func:`time_decode_relative`: prefill / per-token decode time of a
  model variant relative to the dense model of the same run (``experiments/``).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.config import ModelConfig
from ling_jax.evaluation import dense_of, eval_fn


def interleaved(calls: Mapping[str, tuple[Callable, tuple]], repeats: int, *,
                warmup: bool = True) -> dict[str, tuple[list[float], list[float]]]:
    """``{name: (wall seconds, CPU seconds)}`` of every call of ``fn(*args)``: each round calls
    every program once, in order (after one warm-up call each); results are blocked on."""
    if warmup:
        for fn, args in calls.values():
            jax.block_until_ready(fn(*args))
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in calls}
    for _ in range(max(repeats, 1)):
        for name, (fn, args) in calls.items():
            w0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args))
            times[name][0].append(time.perf_counter() - w0)
            times[name][1].append(time.process_time() - c0)
    return times


def median_times(calls: Mapping[str, tuple[Callable, tuple]], repeats: int) -> dict[str, float]:
    """Median wall seconds per call of each program of :func:`interleaved`."""
    return {name: float(np.median(wall)) for name, (wall, _) in interleaved(calls, repeats).items()}


def median_time(fn: Callable, *args: Any, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` calls after one warm-up call."""
    return median_times({"f": (fn, args)}, repeats)["f"]


def time_relative(cfg: ModelConfig, variables: dict, dense_variables: dict, batch: dict, *, repeats: int) -> dict:
    """Prefill (one parallel forward pass over the batch) time of ``cfg`` relative to the dense model.

    The evaluation function is timed (forward pass plus a negligible loss reduction, identical
    for both), so no extra compilation is needed. The two alternate (dense, variant, dense, ...)
    and the ratio uses the medians, so load from other processes affects both alike.
    """
    f, g = eval_fn(cfg), eval_fn(dense_of(cfg))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    t = median_times({"dense": (g, (dense_variables, batch)), "variant": (f, (variables, batch))}, repeats)
    return {"prefill_s": t["variant"], "dense_prefill_s": t["dense"], "prefill_rel": t["variant"] / t["dense"]}


@functools.lru_cache(maxsize=64)
def _decode_fns(cfg: ModelConfig, slots: int, steps: int) -> tuple[Callable, Callable]:
    """(fill, run): fill a KV cache from a prompt; run ``steps`` greedy decode steps from it."""
    from ling_jax.generate import decode_step, decoding_model, empty_cache, prefill

    model = decoding_model(cfg)
    attention_policy = cfg.pruning.enabled and cfg.pruning.baseline in ("h2o", "tova")
    oracle_policy = cfg.pruning.enabled and cfg.pruning.baseline == "oracle"

    @jax.jit
    def fill(variables, tokens, oracle):
        b = tokens.shape[0]
        if attention_policy:  # scores come from decoding; the cache arrays have the same shapes
            return empty_cache(model, variables, b, slots)
        valid = jnp.ones(tokens.shape, bool)
        return prefill(model, variables, tokens, valid, slots=slots, oracle=oracle if oracle_policy else None)[1]

    @jax.jit
    def run(variables, cache, token, position):
        b = token.shape[0]
        ones, none = jnp.ones((b,), bool), (jnp.zeros((b,), bool) if oracle_policy else None)

        def step(carry, _):
            cache, tok, pos = carry
            logits, cache = decode_step(model, variables, cache, tok, pos, ones, none)
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
    calls = {}
    for name, c, vs in (("variant", cfg, variables), ("dense", dense_of(cfg), dense_variables)):
        fill, run = _decode_fns(c, slots, new_tokens)
        vs = nn.meta.unbox(vs)
        calls[name] = (run, (vs, fill(vs, prompt, oracle), token, position))
    t = median_times(calls, repeats)
    variant, dense = t["variant"] / new_tokens, t["dense"] / new_tokens
    return {"decode_s_per_token": variant, "dense_decode_s_per_token": dense, "decode_rel": variant / dense}
