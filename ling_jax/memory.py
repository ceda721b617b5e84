"""Per-device memory of one compiled, sharded train step (``ling-jax info``).

Above both :mod:`ling_jax.sharding` (the plan) and :mod:`ling_jax.train` (the step it compiles).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from ling_jax import sharding as sharding_lib
from ling_jax.config import Config, ConfigError
from ling_jax.model import Transformer
from ling_jax.train import jit_train_step


def _shard_bytes(abstract: Any, shardings: Any) -> int:
    total = 0
    for leaf, sharding in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings)):
        total += math.prod(sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


def memory_report(config: Config) -> dict:
    """Per-device bytes of one compiled train step on ``config.mesh`` over the present devices.

    ``param_bytes_per_device`` and ``optimizer_bytes_per_device`` are the shards of the compiled
    program's inputs; ``activation_bytes_per_device`` is its temporary memory (activations kept
    for the backward pass, gradients, collectives' buffers) from XLA's memory analysis.
    """
    model = Transformer(config.model)
    try:
        p = sharding_lib.plan(config, model)
    except ConfigError as e:
        if jax.default_backend() != "cpu" or "devices" not in str(e):
            raise
        raise ConfigError(f"{e}. To plan a larger mesh on this CPU machine, fake its devices: "
                          "XLA_FLAGS=--xla_force_host_platform_device_count=N ling-jax info ...") from None
    state = sharding_lib.abstract_state(config, model, p.state)
    b, t = config.train.batch_size, config.train.seq_len
    dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "oracle_mask": jnp.bool_}
    batch = {k: jax.ShapeDtypeStruct((b, t), d, sharding=p.batch) for k, d in dtypes.items()}
    compiled = jit_train_step(config, model, p).lower(state, batch).compile()
    in_state = compiled.input_shardings[0][0]
    mem = compiled.memory_analysis()
    report = {
        "mesh": sharding_lib.mesh_sizes(p.mesh),
        "devices": p.mesh.size,
        "param_bytes_per_device": _shard_bytes(state.params, in_state.params),
        "optimizer_bytes_per_device": _shard_bytes(state.opt_state, in_state.opt_state),
        "batch_bytes_per_device": _shard_bytes(batch, compiled.input_shardings[0][1]),
    }
    if mem is not None:
        report.update({
            "activation_bytes_per_device": int(mem.temp_size_in_bytes),
            "argument_bytes_per_device": int(mem.argument_size_in_bytes),
            "output_bytes_per_device": int(mem.output_size_in_bytes),
            "peak_bytes_per_device": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                         + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
        })
    return report
