"""The dense baseline transformer: shapes, dtypes, causality, presets, logical axis names."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.config import PRESETS, get_preset
from ling_jax.model import Transformer, init_params
from ling_jax.testing import assert_close

pytestmark = pytest.mark.fast_xla  # tiny programs compared with each other: see tests/conftest.py

jax.config.update("jax_numpy_rank_promotion", "allow")


@pytest.fixture(scope="module")
def tiny():
    cfg = get_preset("cpu-tiny").model
    model = Transformer(cfg)
    params = nn.meta.unbox(init_params(model, jax.random.key(0)))
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
    return cfg, model, params, apply


def test_output_shape_and_dtype(tiny):
    cfg, _, params, apply = tiny
    tokens = jax.random.randint(jax.random.key(1), (3, 17), 0, cfg.vocab_size)
    logits = apply(params, tokens)
    chex.assert_shape(logits, (3, 17, cfg.vocab_size))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    chex.assert_tree_all_finite(apply(params, tokens[:, :1]))  # sequence of length 1


def test_params_are_float32_and_bf16_compute_close(tiny):
    cfg, _, params, apply = tiny
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    bf16 = Transformer(cfg.__class__(**{**cfg.__dict__, "dtype": "bfloat16"}))
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size)
    out16 = bf16.apply({"params": params}, tokens)
    chex.assert_type(out16, jnp.float32)
    probs = lambda x: jax.nn.softmax(x, -1)
    assert_close(probs(out16), probs(apply(params, tokens)), dtype=jnp.bfloat16)


def test_causality(tiny):
    """Changing token t never changes logits before t."""
    cfg, _, params, apply = tiny
    tokens = jax.random.randint(jax.random.key(3), (2, 24), 0, cfg.vocab_size)
    base = apply(params, tokens)
    for t in (0, 7, 23):
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
        out = apply(params, changed)
        np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
        assert not np.allclose(out[:, t:], base[:, t:])


def test_tied_embeddings_have_no_head():
    cfg = get_preset("cpu-tiny").model
    tied = cfg.__class__(**{**cfg.__dict__, "tie_embeddings": True})
    params = init_params(Transformer(tied), jax.random.key(0))
    assert "head" not in params and "head" in init_params(Transformer(cfg), jax.random.key(0))


def test_remat_gives_same_gradients(tiny):
    cfg, _, params, _ = tiny
    remat = Transformer(cfg.__class__(**{**cfg.__dict__, "remat": "block"}))
    tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, cfg.vocab_size)
    loss = lambda m: jax.grad(lambda p: jnp.mean(m.apply({"params": p}, tokens) ** 2))(params)
    assert_close(loss(remat), loss(Transformer(cfg)), kind="grad")


def test_too_long_sequence_is_a_clear_error(tiny):
    cfg, model, params, _ = tiny
    with pytest.raises(ValueError, match=r"sequence length 129 is larger than the model supports \(max_seq_len=128\)"):
        model.apply({"params": params}, jnp.zeros((1, 129), jnp.int32))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_abstractly(name):
    """jax.eval_shape of init for every preset, without allocating it."""
    cfg = get_preset(name).model
    shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes["params"])))
    assert n > cfg.vocab_size * cfg.d_model


def test_every_param_has_logical_axis_names(tiny):
    cfg, model, _, _ = tiny
    boxed = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and all(isinstance(n, str) for n in leaf.names)
