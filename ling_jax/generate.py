"""Autoregressive generation with per-layer KV caches, pruned to a fixed budget when pruning is on.

* :func:`prefill` runs the prompt through the model in parallel (the same forward pass as
  training/evaluation, including compaction) and stores in each attention layer the keys its last
  query can see (:mod:`ling_jax.layers.kv_cache`). H2O/TOVA, whose priorities come from attention
  during decoding, prefill token by token instead.
* :func:`decode_step` feeds one token per row: each layer writes the new key/value (evicting the
  lowest-priority key outside sinks and window when full) and attends over its cache. Layers under
  pruning hold ``pruning.budget`` slots: memory O(budget), not O(context).
* :func:`generate`: prefill + a ``lax.scan`` of decode steps, greedy / temperature / top-p sampling,
  batched prompts of different lengths (left-padded; each row keeps its own positions).
* :func:`teacher_forced_decode`: the logits of every position of given sequences, computed by
  decoding them token by token through the cache (how a cache policy is evaluated).

Every function takes the model's ``variables``: ``{"params": ..., **state collections}`` as
``model.init`` returns them or :meth:`ling_jax.train_state.TrainState.variables` builds them from a
trained state (a model with an MoE routing bias needs its ``moe_bias`` collection).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ling_jax.array_types import HostArray
from ling_jax.config import ConfigError, ModelConfig
from ling_jax.layers import kv_cache
from ling_jax.layers.pruning_baselines import ATTENTION_POLICIES
from ling_jax.model import Transformer
from ling_jax.token_state import TokenState


@dataclasses.dataclass(frozen=True)
class Sampling:
    """``temperature=0``: greedy. Otherwise softmax(logits / temperature) restricted to the
    smallest set of tokens whose probability reaches ``top_p``."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ConfigError(f"Sampling.temperature must be >= 0 (0: greedy), got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"Sampling.top_p must be in (0, 1], got {self.top_p!r}")


@dataclasses.dataclass
class Generation:
    tokens: Int[Array, "B N"]  # generated tokens (after eos: eos)
    logits: Float[Array, "B N V"]  # the logits each token was drawn from
    cache: dict  # the final "cache" collection
    cache_bytes: int


def decoding_model(config: ModelConfig) -> Transformer:
    """The model for decoding: same parameters, no rematerialisation, hard pruning masks."""
    if config.pruning.enabled and config.pruning.mode != "hard":
        raise ConfigError("decoding needs model.pruning.mode='hard' (soft masks are for training)")
    if config.depth.mod_enabled or config.depth.exit_enabled:
        raise ConfigError(
            "ling_jax.generate decodes fixed-depth models only, got model.depth.mod_enabled="
            f"{config.depth.mod_enabled} and model.depth.exit_enabled={config.depth.exit_enabled}: decode "
            "adaptive-depth models with ling_jax.generate_exit (generate / teacher_forced), or set both to false")
    return Transformer(dataclasses.replace(config, remat="none"))


def model_variables(variables: Mapping) -> dict:
    """``variables`` unboxed, refused if they are the params alone (see the module docstring)."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError("pass the model's variables {'params': ..., **state collections} (e.g. "
                        "TrainState.variables()), not its params alone")
    return nn.meta.unbox(dict(variables))


def left_pad(prompts: Sequence[Sequence[int | np.integer]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths -> (tokens [B, T], valid [B, T]), right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad needs at least one prompt and every prompt needs at least one token")
    t = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    valid = np.zeros((len(prompts), t), bool)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p):], valid[i, t - len(p):] = p, True
    return tokens, valid


def positions_of(valid: Bool[Array, "B T"]) -> Int[Array, "B T"]:
    """Per-row positions: 0, 1, ... over the valid tokens (padding gets 0)."""
    return jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)


def sample(logits: Float[Array, "B V"], rng: jax.Array, sampling: Sampling) -> Int[Array, "B"]:
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(ordered, axis=-1)
        inside = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p  # the first token always
        cutoff = jnp.min(jnp.where(inside, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _state(op: str, slots: int, oracle: Optional[Array]) -> TokenState:
    return TokenState(cache_op=op, cache_slots=slots, oracle=oracle)


def prefill(model: Transformer, variables, tokens: Int[Array, "B T"], valid: Bool[Array, "B T"], *, slots: int,
            oracle: Optional[Bool[Array, "B T"]] = None) -> tuple[Float[Array, "B T V"], dict]:
    """Parallel prompt pass that fills every layer's cache; returns (logits, cache collection)."""
    logits, state = model.apply(variables, tokens, positions_of(valid), valid,
                                state=_state(kv_cache.PREFILL, slots, oracle), mutable=["cache"])
    return logits, state["cache"]


def empty_cache(model: Transformer, variables, batch: int, slots: int) -> dict:
    """A cache collection with every slot empty (a prefill of one invalid token)."""
    tokens = jnp.zeros((batch, 1), jnp.int32)
    oracle = jnp.zeros((batch, 1), bool) if model.config.pruning.baseline == "oracle" else None
    cfg = model.config
    if cfg.pruning.enabled and cfg.pruning.baseline in ATTENTION_POLICIES:
        # The parallel pruner refuses attention-driven policies; the cache layout is that of any budget policy.
        cfg = dataclasses.replace(cfg, pruning=dataclasses.replace(cfg.pruning, baseline="window"))
    _, cache = prefill(Transformer(cfg), variables, tokens, jnp.zeros((batch, 1), bool), slots=slots, oracle=oracle)
    return cache


def decode_step(model: Transformer, variables, cache: dict, token: Int[Array, "B"], position: Int[Array, "B"],
                valid: Bool[Array, "B"], oracle: Optional[Bool[Array, "B"]] = None) -> tuple[Float[Array, "B V"], dict]:
    """One token per row through every layer's cache; returns (logits, updated cache)."""
    logits, state = model.apply(
        {**variables, "cache": cache}, token[:, None], position[:, None], valid[:, None],
        state=_state(kv_cache.DECODE, 0, None if oracle is None else oracle[:, None]), mutable=["cache"])
    return logits[:, 0], state["cache"]


def _scan_tokens(model, variables, cache, tokens, positions, valid, oracle):
    """Decodes given tokens one position at a time: (logits [B, T, V], cache)."""
    def step(cache, xs):
        tok, pos, ok, orc = xs
        logits, cache = decode_step(model, variables, cache, tok, pos, ok, orc)
        return cache, logits

    orc = jnp.zeros_like(valid) if oracle is None else oracle
    xs = (tokens.T, positions.T, valid.T, orc.T)  # scan over T
    cache, logits = jax.lax.scan(step, cache, xs)
    return jnp.swapaxes(logits, 0, 1), cache


def _uses_attention_scores(config: ModelConfig) -> bool:
    return config.pruning.enabled and config.pruning.baseline in ATTENTION_POLICIES


@functools.partial(jax.jit, static_argnames=("config", "slots"))
def _teacher_forced(config, variables, tokens, valid, oracle, slots):
    model = decoding_model(config)
    cache = empty_cache(model, variables, tokens.shape[0], slots)
    oracle = oracle if config.pruning.baseline == "oracle" else None
    return _scan_tokens(model, variables, cache, tokens, positions_of(valid), valid, oracle)[0]


def teacher_forced_decode(config: ModelConfig, variables, tokens: Int[HostArray, "B T"], valid: Optional[Bool[HostArray, "B T"]] = None,
                          *, oracle: Optional[Bool[HostArray, "B T"]] = None) -> Float[Array, "B T V"]:
    """Logits at every position, computed by decoding the sequence token by token through the
    (pruned) KV cache: each prediction sees exactly what the cache holds at that point."""
    valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
    oracle = jnp.zeros(tokens.shape, bool) if oracle is None else jnp.asarray(oracle, bool)
    return _teacher_forced(config, model_variables(variables), jnp.asarray(tokens, jnp.int32), valid, oracle, tokens.shape[1])


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampling", "eos_id"))
def _generate(config, variables, tokens, valid, oracle, rng, max_new_tokens, sampling, eos_id):
    model = decoding_model(config)
    b, t = tokens.shape
    slots = t + max_new_tokens  # unpruned layers hold the whole context
    positions = positions_of(valid)
    oracle = oracle if config.pruning.baseline == "oracle" else None
    if _uses_attention_scores(config):
        cache = empty_cache(model, variables, b, slots)
        logits, cache = _scan_tokens(model, variables, cache, tokens, positions, valid, oracle)
    else:
        logits, cache = prefill(model, variables, tokens, valid, slots=slots, oracle=oracle)
    next_pos = jnp.sum(valid, axis=1).astype(jnp.int32)  # [B]

    def step(state, rng_t):
        cache, last_logits, pos, done = state
        token = sample(last_logits, rng_t, sampling)
        if eos_id is not None:
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        no_oracle = None if oracle is None else jnp.zeros((b,), bool)
        new_logits, cache = decode_step(model, variables, cache, token, pos, jnp.ones((b,), bool), no_oracle)
        return (cache, new_logits, pos + 1, done), (token, last_logits)

    init = (cache, logits[:, -1], next_pos, jnp.zeros((b,), bool))
    (cache, _, _, _), (out, out_logits) = jax.lax.scan(step, init, jax.random.split(rng, max_new_tokens))
    return out.T, jnp.swapaxes(out_logits, 0, 1), cache


def generate(config: ModelConfig, variables, tokens: Int[HostArray, "B T"], valid: Optional[Bool[HostArray, "B T"]] = None, *,
             max_new_tokens: int, sampling: Sampling = Sampling(), rng: Optional[jax.Array] = None,
             oracle: Optional[Bool[HostArray, "B T"]] = None, eos_id: Optional[int] = None) -> Generation:
    """Generates ``max_new_tokens`` per row after left-padded prompts (see :func:`left_pad`).

    ``variables`` are the model's (unboxed or boxed; see the module docstring); ``oracle`` is the
    oracle mask of the prompt (baseline ``"oracle"``; generated tokens are not oracle tokens).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    tokens = jnp.asarray(tokens, jnp.int32)
    valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
    oracle = jnp.zeros(tokens.shape, bool) if oracle is None else jnp.asarray(oracle, bool)
    rng = jax.random.key(0) if rng is None else rng
    out, logits, cache = _generate(config, model_variables(variables), tokens, valid, oracle, rng,
                                   max_new_tokens, sampling, eos_id)
    return Generation(tokens=out, logits=logits, cache=cache, cache_bytes=kv_cache.nbytes(cache))
