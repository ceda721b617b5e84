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

import functools
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

from ling_jax.config import ConfigError, ModelConfig
from ling_jax.generate import decode_step, decoding_model, positions_of, prefill
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
def _request(config: ModelConfig, params, prompt, prompt_valid, continuation, oracle, policy, slots):
    model = decoding_model(config)
    b, p = prompt.shape
    prompt_logits, state = model.apply(
        {"params": params}, prompt, positions_of(prompt_valid), prompt_valid,
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
            {"params": params, "cache": cache}, token[:, None], (start + offset)[:, None], ones[:, None],
            state=TokenState(cache_op=kv_cache.DECODE, oracle=None if no_oracle is None else no_oracle[:, None]),
            policy=policy, mutable=["cache", "intermediates"])
        return new_state["cache"], (logits[:, 0], _sum_leaves(new_state["intermediates"]))

    feed = continuation[:, :-1].T  # [C - 1, B]: token j feeds the prediction of token j + 1
    _, (step_logits, step_stats) = jax.lax.scan(step, cache, (feed, jnp.arange(feed.shape[0], dtype=jnp.int32)))
    logits = jnp.concatenate([prompt_logits, jnp.swapaxes(step_logits, 0, 1)], axis=1)  # [B, C, V]
    return logits, cache, _sum_leaves(prefill_stats), _sum_leaves(step_stats)


def run_request(config: ModelConfig, params, prompt: Int[Array, "B P"], continuation: Int[Array, "B C"], *,
                prompt_valid: Optional[Bool[Array, "B P"]] = None, oracle: Optional[Bool[Array, "B P"]] = None,
                policy: Optional[InferencePolicy] = None) -> RequestResult:
    """Prefills ``prompt`` (left-padded where ``prompt_valid`` is False) with ``config``'s
    mechanisms, then teacher-forces ``continuation`` through the cache (see the module docstring).

    ``oracle`` is the prompt's oracle mask (baseline ``"oracle"``); ``policy`` the call-time
    thresholds (traced: a sweep compiles once)."""
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
    logits, cache, pre, steps = _request(config, nn.meta.unbox(params), prompt, prompt_valid,
                                         jnp.asarray(continuation, jnp.int32), oracle, policy, slots)
    pre_ledger = ledger_from_intermediates(config, jax.device_get(pre))
    step_ledger = ledger_from_intermediates(config, jax.device_get(steps))
    return RequestResult(logits=logits, computed_flops=pre_ledger.computed + step_ledger.computed,
                         ideal_flops=pre_ledger.ideal + step_ledger.ideal,
                         prefill_computed_flops=pre_ledger.computed, cache_bytes=kv_cache.nbytes(cache),
                         prefill_terms=pre_ledger.by_term(), continuation_terms=step_ledger.by_term())


def continuation_nll(logits: Float[Array, "B C V"], continuation: Int[Array, "B C"],
                     mask: Optional[Float[Array, "B C"]] = None) -> Float[Array, ""]:
    """Mean negative log-likelihood (nats) of the continuation tokens under ``logits``."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), continuation)  # [B, C]
    mask = jnp.ones(nll.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
