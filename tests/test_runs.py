"""ling_jax/runs.py: starting a workdir from given weights (a later curriculum phase, a retrofit)."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from ling_jax.config import PruningConfig, get_preset
from ling_jax.model import Transformer, init_params
from ling_jax.runs import init_workdir
from ling_jax.train import load_trained

DENSE = dataclasses.replace(get_preset("cpu-tiny"), preset="cpu-tiny")
PRUNED = dataclasses.replace(DENSE, model=dataclasses.replace(DENSE.model, pruning=PruningConfig(enabled=True, layers="0")))


@pytest.fixture(scope="module")
def dense_params():
    return nn.meta.unbox(jax.jit(lambda k: init_params(Transformer(DENSE.model), k))(jax.random.key(7)))


def test_a_retrofit_keeps_every_given_weight_and_initialises_the_new_ones(dense_params, tmp_path):
    with pytest.raises(ValueError, match="do not fit the model"):  # the scorer is missing: refused by default
        init_workdir(PRUNED, tmp_path / "strict", {"params": dense_params})
    init_workdir(PRUNED, tmp_path / "retro", {"params": dense_params}, allow_new=True)
    _, _, state = load_trained(tmp_path / "retro")
    got = traverse_util.flatten_dict(nn.meta.unbox(state.params))
    given = traverse_util.flatten_dict(dense_params)
    assert set(given) < set(got) and any("pruner" in path for path in set(got) - set(given))
    for path, value in given.items():
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value))
    assert int(state.step) == 0
    with pytest.raises(FileExistsError):
        init_workdir(PRUNED, tmp_path / "retro", {"params": dense_params}, allow_new=True)


def test_a_given_weight_the_model_lacks_or_misshapes_is_refused(dense_params, tmp_path):
    flat = traverse_util.flatten_dict(dense_params)
    wrong = {**flat, next(iter(flat)): np.zeros((3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"the given weight .* has shape \(3, 3\)"):
        init_workdir(PRUNED, tmp_path / "a", {"params": traverse_util.unflatten_dict(wrong)}, allow_new=True)
    extra = {**flat, ("block_0", "ghost"): np.zeros((2,), np.float32)}
    with pytest.raises(ValueError, match=r"block_0/ghost has no place in this model config"):
        init_workdir(PRUNED, tmp_path / "b", {"params": traverse_util.unflatten_dict(extra)}, allow_new=True)
