"""The training state: :class:`TrainState`, the optimizer and its initialisation.

Below both :mod:`ling_jax.train` (which steps the state) and :mod:`ling_jax.sharding` (which
derives its shardings with ``jax.eval_shape`` of :func:`init_state`), so neither imports the other
in a cycle. Re-exported by :mod:`ling_jax.train`.
"""

from __future__ import annotations

import functools
import typing
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from ling_jax.config import Config
from ling_jax.layers.moe import BIAS_COLLECTION
from ling_jax.model import Transformer

# Variable collections that are model state: carried from step to step in TrainState.extra and
# checkpointed. A new stateful collection must be added here (init_state refuses to create an
# unlisted one, rather than silently leaving it out of checkpoints).
STATE_COLLECTIONS = (BIAS_COLLECTION,)


# A pytree container: JAX rebuilds it through __init__ with whatever leaves a transformation
# produces (ShapeDtypeStructs under eval_shape, shardings, per-leaf tuples from tree_map), so its
# field annotations describe the concrete state and cannot be checked at construction.
@typing.no_type_check
@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any  # non-trained variable collections, e.g. {"moe_bias": ...}

    def variables(self) -> dict:
        """What ``Transformer.apply`` takes for this state: ``params`` and every state collection
        (e.g. MoE routing biases). Whatever applies a trained model passes these, never the
        params alone: a model with a routing bias needs its ``moe_bias`` collection."""
        return {"params": self.params, **self.extra}


def make_optimizer(config: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    t = config.train
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=max(t.warmup_steps, 1),
        decay_steps=max(t.steps, max(t.warmup_steps, 1) + 1), end_value=t.learning_rate * t.min_lr_ratio,
    )
    # No weight decay on norm scales (1-D params).
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)
    tx = optax.chain(
        optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=0.9, b2=t.beta2, weight_decay=t.weight_decay, mask=decay_mask),
    )
    if t.scorer_lr_scale != 1.0:  # (only then: the optimizer state of every other run keeps its structure)
        tx = optax.chain(tx, optax.stateless(functools.partial(_scale_scorers, t.scorer_lr_scale)))
    return tx, schedule


def _scale_scorers(scale: float, updates, params=None):
    """Multiplies the updates of the pruning scorers' parameters (under a ``pruner`` module) by ``scale``."""
    in_pruner = lambda path: any(getattr(k, "key", None) == "pruner" for k in path)  # noqa: E731
    return jax.tree_util.tree_map_with_path(lambda path, u: u * scale if in_pruner(path) else u, updates)


def init_state(config: Config, model: Transformer, rng: jax.Array, *, unbox: bool = True) -> TrainState:
    """``unbox=False`` keeps the logical-axis boxes (``ling_jax.sharding`` reads them under eval_shape).

    Only ``params`` and :data:`STATE_COLLECTIONS` are mutable during init, so whatever layers sow
    (``intermediates``, ``depth``, ...) is dropped: ``extra`` holds state only.
    """
    tokens = jnp.zeros((1, min(8, config.train.seq_len)), jnp.int32)
    variables = model.init(rng, tokens, mutable=["params", *STATE_COLLECTIONS])
    variables = nn.meta.unbox(variables) if unbox else dict(variables)
    params = variables.pop("params")
    extra = {k: v for k, v in variables.items() if k in STATE_COLLECTIONS}
    tx, _ = make_optimizer(config)
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), extra=extra)


def abstract_state(config: Config, model: Transformer, device: Optional[jax.Device] = None) -> TrainState:
    """A TrainState of ShapeDtypeStructs on one device: a restore target that allocates nothing."""
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    shapes = jax.eval_shape(lambda key: init_state(config, model, key), jax.random.key(0))
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
