"""Request-level evaluation: prefill a prompt with the mechanisms on, then continue through the cache.

The serving question is not "how good is every position of a pruned sequence" but "given a long
input the model skipped work on, does what comes next stay right". One request is a prompt of
``P`` tokens and a continuation of ``C`` tokens:

1. the prompt is prefilled in one parallel pass with every mechanism of the config on (token
   pruning with its budgeted KV cache and compaction, MoE), which leaves a (pruned) KV cache;
2. the continuation is teacher-forced through that cache one token at a time
   (:func:`ling_jax.generate.decode_step`), so every prediction sees exactly what the cache kept;
   the prefill computes the output head for the prompt's last token only (its prediction is the
   continuation's first token), as a server does, for the dense model and every variant alike;
3. quality is measured on the continuation only: the prediction of continuation token ``j`` comes
   from the prompt plus continuation tokens ``< j``;
4. work is the ledger's ``computed`` FLOPs of the whole request (prefill + continuation steps,
   :mod:`ling_jax.ledger`) and the KV cache's bytes, beside the dense model on the same request.

Models with adaptive depth prefill token by token (:mod:`ling_jax.generate_exit`: a parallel
prefill would store keys a later exited token still needs), which is correct but slow at long
prompts; they are refused here until a parallel depth prefill exists.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from ling_jax.array_types import HostArray
from ling_jax.config import ConfigError, ModelConfig, PruningConfig
from ling_jax.generate import decoding_model, model_variables, positions_of
from ling_jax.layers import kv_cache
from ling_jax.ledger import ledger_from_intermediates
from ling_jax.policy import InferencePolicy, as_traced, inference_policy
from ling_jax.token_state import TokenState


class RequestResult(NamedTuple):
    """One batch of requests through one config."""

    logits: Float[Array, "B C V"]  # prediction of each continuation token
    computed_flops: float  # ledger ``computed`` of prefill + continuation
    ideal_flops: float  # ledger ``ideal`` of prefill + continuation
    prefill_computed_flops: float
    cache_bytes: int  # KV cache held after the prefill (all layers)
    prefill_terms: dict  # prefill ``computed`` FLOPs by ledger term (Ledger.by_term)
    continuation_terms: dict  # the same for the continuation's decoding steps


def _sum_leaves(tree):
    """Sown values summed over the decoding steps (a scan stacks them)."""
    return jax.tree_util.tree_map(lambda v: jnp.sum(v), tree)


@functools.partial(jax.jit, static_argnames=("config", "slots"))
def _request(config: ModelConfig, variables, prompt, prompt_valid, continuation, oracle, policy, slots):
    model = decoding_model(config)
    b, p = prompt.shape
    prompt_logits, state = model.apply(
        variables, prompt, positions_of(prompt_valid), prompt_valid,
        state=TokenState(cache_op=kv_cache.PREFILL, cache_slots=slots,
                         oracle=oracle if config.pruning.baseline == "oracle" else None),
        policy=policy, last_only=True, mutable=["cache", "intermediates"])  # [B, 1, V]: only the next token
    cache, prefill_stats = state["cache"], state["intermediates"]
    start = jnp.sum(prompt_valid, axis=1).astype(jnp.int32)  # [B] position of continuation token 0
    ones = jnp.ones((b,), bool)
    no_oracle = jnp.zeros((b,), bool) if config.pruning.baseline == "oracle" else None

    def step(cache, xs):
        token, offset = xs
        logits, new_state = model.apply(
            {**variables, "cache": cache}, token[:, None], (start + offset)[:, None], ones[:, None],
            state=TokenState(cache_op=kv_cache.DECODE, oracle=None if no_oracle is None else no_oracle[:, None]),
            policy=policy, mutable=["cache", "intermediates"])
        return new_state["cache"], (logits[:, 0], _sum_leaves(new_state["intermediates"]))

    feed = continuation[:, :-1].T  # [C - 1, B]: token j feeds the prediction of token j + 1
    _, (step_logits, step_stats) = jax.lax.scan(step, cache, (feed, jnp.arange(feed.shape[0], dtype=jnp.int32)))
    logits = jnp.concatenate([prompt_logits, jnp.swapaxes(step_logits, 0, 1)], axis=1)  # [B, C, V]
    return logits, cache, _sum_leaves(prefill_stats), _sum_leaves(step_stats)


def run_request(config: ModelConfig, variables, prompt: Int[HostArray, "B P"], continuation: Int[HostArray, "B C"], *,
                prompt_valid: Optional[Bool[HostArray, "B P"]] = None, oracle: Optional[Bool[HostArray, "B P"]] = None,
                policy: Optional[InferencePolicy] = None) -> RequestResult:
    """Prefills ``prompt`` (left-padded where ``prompt_valid`` is False) with ``config``'s
    mechanisms, then teacher-forces ``continuation`` through the cache (see the module docstring).

    ``variables`` are the model's (``{"params": ..., **state collections}``); ``oracle`` is the
    prompt's oracle mask (baseline ``"oracle"``); ``policy`` the call-time thresholds (traced: a
    sweep compiles once)."""
    if config.depth.mod_enabled or config.depth.exit_enabled:
        raise ConfigError("run_request prefills in parallel, which adaptive depth does not support yet: set "
                          "model.depth.mod_enabled=false and model.depth.exit_enabled=false (or decode the prompt "
                          "token by token with ling_jax.generate_exit.teacher_forced)")
    if continuation.shape[1] < 1:
        raise ValueError("run_request needs a continuation of at least one token")
    prompt = jnp.asarray(prompt, jnp.int32)
    prompt_valid = jnp.ones(prompt.shape, bool) if prompt_valid is None else jnp.asarray(prompt_valid, bool)
    oracle = jnp.zeros(prompt.shape, bool) if oracle is None else jnp.asarray(oracle, bool)
    policy = as_traced(policy if policy is not None else inference_policy(config))
    slots = prompt.shape[1] + continuation.shape[1]  # unpruned layers hold the whole request
    logits, cache, pre, steps = _request(config, model_variables(variables), prompt, prompt_valid,
                                         jnp.asarray(continuation, jnp.int32), oracle, policy, slots)
    pre_ledger = ledger_from_intermediates(config, jax.device_get(pre))
    step_ledger = ledger_from_intermediates(config, jax.device_get(steps))
    return RequestResult(logits=logits, computed_flops=pre_ledger.computed + step_ledger.computed,
                         ideal_flops=pre_ledger.ideal + step_ledger.ideal,
                         prefill_computed_flops=pre_ledger.computed, cache_bytes=kv_cache.nbytes(cache),
                         prefill_terms=pre_ledger.by_term(), continuation_terms=step_ledger.by_term())


def continuation_nll(logits: Float[Array, "B C V"], continuation: Int[HostArray, "B C"],
                     mask: Optional[Float[HostArray, "B C"]] = None) -> Float[Array, ""]:
    """Mean negative log-likelihood (nats) of the continuation tokens under ``logits``."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), continuation)  # [B, C]
    mask = jnp.ones(nll.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ----------------------------------------------------------------------------- methods and batches of requests

METHODS = ("dense", "learned", "window", "h2o", "tova", "snapkv", "random", "oracle")


def pruning_method(model: ModelConfig, method: str, budget: int, *, num_sinks: int = 1, window: int = 8,
                   layers: str = "0") -> ModelConfig:
    """The inference config of ``method`` holding ``budget`` KV slots per layer, deciding at
    ``layers`` under the budget rule, with compaction starting in the deciding layer (a dropped
    prompt token does no further work). ``"learned"`` keeps the model's trained scorer; ``"dense"``
    switches pruning off."""
    if method not in METHODS:
        raise ConfigError(f"request method must be one of {list(METHODS)}, got {method!r}")
    if method == "dense":
        return dataclasses.replace(model, pruning=dataclasses.replace(model.pruning, enabled=False))
    fields = dict(mode="hard", inference_rule="budget", budget=budget, num_sinks=num_sinks, window=window,
                  compaction=True, compaction_start="this_layer")
    if method == "learned":
        if not model.pruning.enabled or model.pruning.baseline != "learned":
            raise ConfigError("method 'learned' needs a model trained with model.pruning.enabled=true (a learned scorer)")
        return dataclasses.replace(model, pruning=dataclasses.replace(model.pruning, **fields))
    return dataclasses.replace(model, pruning=PruningConfig(enabled=True, layers=layers, baseline=method, **fields))


def evaluate_requests(config: ModelConfig, variables, prompts: np.ndarray, continuations: np.ndarray, scored: np.ndarray,
                      *, metric: str, oracle: Optional[np.ndarray] = None, batch_size: int = 16) -> dict:
    """Quality and work of ``config`` over requests: ``metric="accuracy"`` (argmax equals the
    continuation token where ``scored``) or ``"bpb"`` (bits per token of the scored continuation
    tokens; bytes for a byte model). Returns ``quality``, ``computed_flops``, ``ideal_flops``,
    ``kv_bytes_per_request``, ``seconds`` (timed calls after one warm-up call) and ``terms``
    (computed FLOPs by ``prefill:`` / ``continuation:`` ledger term)."""
    if metric not in ("accuracy", "bpb"):
        raise ValueError(f"metric must be 'accuracy' or 'bpb', got {metric!r}")
    hits = total = nll_sum = computed = ideal = seconds = 0.0
    terms: dict[str, float] = {}
    cache_bytes = 0
    for i in range(0, len(prompts), batch_size):
        prompt, cont, score = prompts[i:i + batch_size], continuations[i:i + batch_size], scored[i:i + batch_size]
        evidence = None if oracle is None else oracle[i:i + batch_size]
        if i == 0:  # compile and warm up outside the timed calls
            jax.block_until_ready(run_request(config, variables, prompt, cont, oracle=evidence).logits)
        start = time.perf_counter()
        out = run_request(config, variables, prompt, cont, oracle=evidence)
        logits = np.asarray(jax.block_until_ready(out.logits))
        seconds += time.perf_counter() - start
        n = float(np.sum(score))
        if metric == "accuracy":
            hits += float(np.sum((logits.argmax(-1) == cont) * score))
        else:
            nll_sum += float(continuation_nll(out.logits, cont, score)) * n
        total += n
        computed, ideal = computed + out.computed_flops, ideal + out.ideal_flops
        cache_bytes = max(cache_bytes, out.cache_bytes // len(prompt))
        for phase, part in (("prefill", out.prefill_terms), ("continuation", out.continuation_terms)):
            for k, v in part.items():
                terms[f"{phase}:{k}"] = terms.get(f"{phase}:{k}", 0.0) + v
    if total == 0:
        raise ValueError("evaluate_requests: no scored continuation token")
    quality = hits / total if metric == "accuracy" else nll_sum / total / math.log(2)
    return {"quality": quality, "computed_flops": computed, "ideal_flops": ideal, "kv_bytes_per_request": cache_bytes,
            "seconds": seconds, "terms": terms}


def text_requests(data: np.ndarray, count: int, prompt: int, continuation: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` requests from a byte array (e.g. source files): prompts of ``prompt`` bytes and the
    true next ``continuation`` bytes, at evenly spaced offsets."""
    span = prompt + continuation
    if len(data) <= span:
        raise ValueError(f"the data ({len(data)} tokens) is too short for requests of {span} tokens")
    starts = np.linspace(0, len(data) - span - 1, count).astype(np.int64)
    seq = np.stack([data[a:a + span] for a in starts]).astype(np.int32)  # [N, P + C]
    return seq[:, :prompt], seq[:, prompt:]
