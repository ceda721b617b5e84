"""ling_jax/train_state.py: the optimizer."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.config import ConfigError, TrainConfig, get_preset
from ling_jax.train_state import make_optimizer


def _update(scale: float):
    config = get_preset("cpu-tiny")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, scorer_lr_scale=scale, warmup_steps=0))
    tx, _ = make_optimizer(config)
    params = {"block_0": {"pruner": {"scorer": {"w": jnp.ones((4,))}}, "attn": {"wq": jnp.ones((4, 4))}}}
    grads = {"block_0": {"pruner": {"scorer": {"w": jnp.full((4,), 0.5)}}, "attn": {"wq": jnp.full((4, 4), 0.5)}}}
    state = tx.init(params)
    for _ in range(2):  # the first step is the warmup's zero learning rate
        updates, state = tx.update(grads, state, params)
    return updates


def test_scorer_learning_rate_scale_multiplies_only_the_scorers_updates():
    plain, scaled = _update(1.0), _update(10.0)
    np.testing.assert_allclose(scaled["block_0"]["pruner"]["scorer"]["w"], 10 * plain["block_0"]["pruner"]["scorer"]["w"],
                               rtol=1e-6)
    np.testing.assert_array_equal(scaled["block_0"]["attn"]["wq"], plain["block_0"]["attn"]["wq"])
    assert float(jnp.abs(plain["block_0"]["attn"]["wq"]).max()) > 0
    with pytest.raises(ConfigError, match="scorer_lr_scale"):
        TrainConfig(scorer_lr_scale=0.0)
