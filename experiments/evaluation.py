"""Timing for the experiments: measured prefill / decode time relative to the dense model in the
same run. Quality and the ledger's token reduction factor come from ``ling_jax.evaluation``
(re-exported here).
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.config import ModelConfig
from ling_jax.evaluation import (  # noqa: F401  (re-exported)
    LN2, eval_fn, dense_of, relative_loss,
)
from ling_jax.evaluation import evaluate as _evaluate


def evaluate(*args, **kwargs) -> dict:
    """:func:`ling_jax.evaluation.evaluate`, plus ``trf``: the *ideal* token reduction factor
    (``trf_ideal``) under the name the experiment records and report.py have always used for it.
    The realized figure is ``trf_computed`` beside it."""
    r = _evaluate(*args, **kwargs)
    return {**r, "trf": r["trf_ideal"]}


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
    f, g = eval_fn(cfg), eval_fn(dense_of(cfg))
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
