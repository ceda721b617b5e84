"""KV-cache decoding with adaptive depth: early exit and causal Mixture-of-Depths routing.

Built on the per-layer KV cache of :mod:`ling_jax.generate` (``Attention.decode`` and the
``"cache"`` collection): each decoding step runs :class:`ling_jax.model.Transformer` in
``depth.mode="infer"`` on one token per row, so the decisions are those of the forward pass:

* a token that exits after layer ``l`` skips the remaining layers' queries, attention and MLP; its
  hidden state is carried up unchanged and every later layer still writes its keys and values,
  computed from that carried state, into the cache, so later tokens can attend to it;
* on a Mixture-of-Depths layer a token the causal rule (predictor or router threshold) does not
  route skips the block and writes no keys or values there.

Layers under hard token pruning keep the budgeted, evicting cache of :mod:`ling_jax.generate`.

A parallel prefill would store in each layer the keys visible to the row's last *live* query,
which misses later tokens that exited; prompts are therefore fed token by token
(:func:`teacher_forced`), which is also how decoding is checked against the forward pass.

Every function takes the model's ``variables`` (``{"params": ..., **state collections}``, as in
:mod:`ling_jax.generate`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ling_jax.config import ConfigError, ModelConfig
from ling_jax.generate import empty_cache, model_variables, positions_of
from ling_jax.layers import kv_cache
from ling_jax.model import Transformer
from ling_jax.token_state import TokenState


def decoding_model(config: ModelConfig) -> Transformer:
    """The model for decoding with adaptive depth: inference decisions, no rematerialisation."""
    if config.pruning.enabled and config.pruning.mode != "hard":
        raise ConfigError("decoding needs model.pruning.mode='hard' (soft masks are for training)")
    if config.mod_layers and config.depth.mod_inference == "topk":
        raise ConfigError("decoding needs a causal Mixture-of-Depths decision: set model.depth.mod_inference to "
                          "'predictor' or 'threshold' (got 'topk', which reads future tokens)")
    return Transformer(dataclasses.replace(config, remat="none", depth=dataclasses.replace(config.depth, mode="infer")))


def _info(model: Transformer, depth_state: dict, b: int) -> dict[str, Array]:
    """Per-token decisions of one step: ``exit_layer`` and ``layers_used`` [B, T]."""
    used = depth_state["layers_used"][0]
    never = jnp.full(used.shape, model.config.num_layers - 1, jnp.int32)
    return {"exit_layer": depth_state.get("exit_layer", (never,))[0], "layers_used": used}


def decode_step(model: Transformer, variables, cache: dict, token: Int[Array, "B"], position: Int[Array, "B"],
                valid: Bool[Array, "B"], forced_exit: Optional[Int[Array, "B"]] = None
                ) -> tuple[Float[Array, "B V"], dict, dict[str, Array]]:
    """One token per row through every layer's cache: (logits, cache, {exit_layer, layers_used} [B])."""
    logits, state = model.apply(
        {**variables, "cache": cache}, token[:, None], position[:, None], valid[:, None],
        forced_exit=None if forced_exit is None else forced_exit[:, None], state=TokenState(cache_op=kv_cache.DECODE),
        mutable=["cache", "depth"])
    info = {k: v[:, 0] for k, v in _info(model, state["depth"], token.shape[0]).items()}
    return logits[:, 0], state["cache"], info


def _scan(model, variables, cache, tokens, positions, valid, forced_exit):
    """Decodes given tokens one position at a time: (logits [B, T, V], cache, info [B, T])."""
    def step(cache, xs):
        tok, pos, ok, forced = xs
        logits, cache, info = decode_step(model, variables, cache, tok, pos, ok, forced)
        return cache, (logits, info)

    xs = (tokens.T, positions.T, valid.T, None if forced_exit is None else forced_exit.T)  # scan over T
    cache, (logits, info) = jax.lax.scan(step, cache, xs)
    return jnp.swapaxes(logits, 0, 1), cache, {k: v.T for k, v in info.items()}


@functools.partial(jax.jit, static_argnames=("config", "slots"))
def _teacher_forced(config, variables, tokens, valid, forced_exit, slots):
    model = decoding_model(config)
    cache = empty_cache(model, variables, tokens.shape[0], slots)
    return _scan(model, variables, cache, tokens, positions_of(valid), valid, forced_exit)


def teacher_forced(config: ModelConfig, variables, tokens: Int[Array, "B T"], valid: Optional[Bool[Array, "B T"]] = None,
                   *, forced_exit: Optional[Int[Array, "B T"]] = None) -> tuple[Float[Array, "B T V"], dict, dict]:
    """Decodes given sequences token by token through the cache.

    Returns (logits [B, T, V], final ``"cache"`` collection, {``exit_layer``, ``layers_used``} [B, T]).
    ``forced_exit`` replaces the exit rule as in ``Transformer(..., forced_exit=)``.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
    return _teacher_forced(config, model_variables(variables), tokens, valid, forced_exit, tokens.shape[1])


@functools.partial(jax.jit, static_argnames=("config", "steps"))
def _generate(config, variables, prompt, valid, steps):
    model = decoding_model(config)
    b, t = prompt.shape
    cache = empty_cache(model, variables, b, t + steps)
    logits, cache, info = _scan(model, variables, cache, prompt, positions_of(valid), valid, None)
    pos0 = jnp.sum(valid, axis=1).astype(jnp.int32)  # [B]

    def step(state, _):
        cache, last_logits, last_info, pos = state
        token = jnp.argmax(last_logits, axis=-1).astype(jnp.int32)
        new_logits, cache, new_info = decode_step(model, variables, cache, token, pos, jnp.ones((b,), bool))
        return (cache, new_logits, new_info, pos + 1), (token, last_info)

    last_info = {k: v[:, -1] for k, v in info.items()}
    _, (tokens, infos) = jax.lax.scan(step, (cache, logits[:, -1], last_info, pos0), None, length=steps)
    return tokens.T, {k: v.T for k, v in infos.items()}


def generate(config: ModelConfig, variables, prompt: Int[Array, "B P"], steps: int,
             valid: Optional[Bool[Array, "B P"]] = None) -> dict[str, Array]:
    """Greedy decoding with adaptive depth after (left-padded) prompts.

    Returns ``tokens`` [B, steps] and, for the step that predicted each of them, ``exit_layer``
    and ``layers_used`` [B, steps].
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    prompt = jnp.asarray(prompt, jnp.int32)
    valid = jnp.ones(prompt.shape, bool) if valid is None else jnp.asarray(valid, bool)
    tokens, info = _generate(config, model_variables(variables), prompt, valid, steps)
    return {"tokens": tokens, **info}
