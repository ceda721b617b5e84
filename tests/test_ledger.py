"""The compute ledger agrees with XLA's own cost analysis of the compiled dense forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from ling_jax.config import get_preset
from ling_jax.ledger import dense_forward_flops, ledger_from_intermediates, token_reduction_factor
from ling_jax.model import Transformer, forward_with_stats, init_params


@pytest.mark.parametrize("preset,batch,seq", [("cpu-tiny", 2, 64), ("cpu-small", 2, 128)])
def test_ledger_matches_xla_cost_analysis(preset, batch, seq):
    cfg = get_preset(preset).model
    model = Transformer(cfg)
    params = nn.meta.unbox(init_params(model, jax.random.key(0)))
    tokens = jnp.zeros((batch, seq), jnp.int32)
    _, inter = forward_with_stats(model, {"params": params}, tokens)
    ledger = ledger_from_intermediates(cfg, inter)
    assert ledger.computed == pytest.approx(dense_forward_flops(cfg, batch, seq))
    cost = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert abs(cost["flops"] / ledger.computed - 1.0) < 0.10, (cost["flops"], ledger.computed)


def test_dense_token_reduction_factor_is_one_for_ideal_causal():
    cfg = get_preset("cpu-tiny").model
    model = Transformer(cfg)
    params = nn.meta.unbox(init_params(model, jax.random.key(0)))
    _, inter = forward_with_stats(model, {"params": params}, jnp.zeros((2, 32), jnp.int32))
    ledger = ledger_from_intermediates(cfg, inter)
    # The ideal count uses visible (causal) pairs: exactly the dense causal-ideal FLOPs.
    assert token_reduction_factor(cfg, ledger, 2, 32) == pytest.approx(1.0)
    assert ledger.computed > ledger.ideal


def test_sown_total_sums_every_call_of_a_name_across_layers():
    import numpy as np

    from ling_jax.ledger import sown_total

    tree = {"block_0": {"tokens_kept": (np.float32(3.0), np.float32(4.0)), "other": (np.float32(100.0),)},
            "block_1": {"inner": {"tokens_kept": (np.ones((2,), np.float32),)}}}
    assert sown_total(tree, "tokens_kept") == 9.0
    assert sown_total(tree, "missing") == 0.0
