"""Request-level evaluation: prompt prefill with the mechanisms on, continuation through the cache."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.config import ConfigError, DepthConfig, PruningConfig, get_preset
from ling_jax.evaluation import dense_of
from ling_jax.ledger import dense_forward_flops
from ling_jax.model import Transformer, init_params
from ling_jax.request_eval import continuation_nll, run_request
from ling_jax.testing import assert_close

pytestmark = pytest.mark.fast_xla  # tiny programs compared with each other: see tests/conftest.py

B, P, C = 2, 24, 6
BASE = dataclasses.replace(get_preset("cpu-tiny").model, num_layers=2)
PRUNED = dataclasses.replace(BASE, pruning=PruningConfig(enabled=True, mode="hard", layers="from:1", num_sinks=1,
                                                         window=4, inference_rule="budget", budget=8,
                                                         compaction=True))


@pytest.fixture(scope="module")
def variables():
    return {"params": nn.meta.unbox(jax.jit(lambda k: init_params(Transformer(PRUNED), k))(jax.random.key(0)))}


@pytest.fixture(scope="module")
def request_tokens():
    tokens = jax.random.randint(jax.random.key(3), (B, P + C), 0, BASE.vocab_size)
    return tokens[:, :P], tokens[:, P:]


def test_dense_request_equals_the_forward_pass_and_its_flops(variables, request_tokens):
    prompt, cont = request_tokens
    out = run_request(BASE, variables, prompt, cont)
    full = Transformer(BASE).apply(variables, jnp.concatenate([prompt, cont], axis=1))
    assert_close(out.logits, full[:, P - 1:P + C - 1])
    # Prefill of P tokens with the output head on the last one only, then C - 1 decoding steps.
    head_flops = 2 * BASE.d_model * BASE.vocab_size
    assert out.prefill_computed_flops == pytest.approx(dense_forward_flops(BASE, B, P) - head_flops * B * (P - 1), rel=1e-6)
    assert out.computed_flops > out.prefill_computed_flops
    nll = float(continuation_nll(out.logits, cont))
    assert np.isfinite(nll) and nll > 0


def test_pruned_request_computes_less_and_holds_a_smaller_cache(variables, request_tokens):
    prompt, cont = request_tokens
    dense = run_request(dense_of(PRUNED), variables, prompt, cont)
    pruned = run_request(PRUNED, variables, prompt, cont)
    assert pruned.logits.shape == (B, C, BASE.vocab_size) and bool(jnp.all(jnp.isfinite(pruned.logits)))
    assert pruned.computed_flops < dense.computed_flops
    assert pruned.cache_bytes < dense.cache_bytes


def test_compaction_starting_in_the_pruning_layer_changes_no_prediction_and_computes_less(variables, request_tokens):
    # Only dropped tokens' own outputs change (nothing of a request reads them): the kept tokens see
    # the same keys, so the cache and every continuation prediction are the same.
    prompt, cont = request_tokens
    early_cfg = dataclasses.replace(PRUNED, pruning=dataclasses.replace(PRUNED.pruning, compaction_start="this_layer"))
    late, early = run_request(PRUNED, variables, prompt, cont), run_request(early_cfg, variables, prompt, cont)
    assert_close(early.logits, late.logits)
    assert early.cache_bytes == late.cache_bytes
    assert early.computed_flops < late.computed_flops
    with pytest.raises(ConfigError, match=r"compaction_start='this_layer' needs compaction=true"):
        PruningConfig(enabled=True, mode="hard", compaction_start="this_layer")


def test_adaptive_depth_and_empty_continuations_are_refused(variables, request_tokens):
    prompt, cont = request_tokens
    with pytest.raises(ConfigError, match=r"model.depth.exit_enabled=false"):
        run_request(dataclasses.replace(BASE, depth=DepthConfig(exit_enabled=True, mode="infer")), variables, prompt, cont)
    with pytest.raises(ValueError, match=r"at least one token"):
        run_request(BASE, variables, prompt, cont[:, :0])


@pytest.mark.parametrize("baseline", ["h2o", "tova", "snapkv"])
def test_attention_driven_baselines_prefill_in_one_pass(variables, request_tokens, baseline):
    prompt, cont = request_tokens
    cfg = dataclasses.replace(PRUNED, pruning=dataclasses.replace(PRUNED.pruning, baseline=baseline,
                                                                  compaction_start="this_layer"))
    out = run_request(cfg, variables, prompt, cont)
    dense = run_request(dense_of(cfg), variables, prompt, cont)
    assert bool(jnp.all(jnp.isfinite(out.logits)))
    assert out.cache_bytes < dense.cache_bytes and out.computed_flops < dense.computed_flops
    with pytest.raises(ValueError, match=r"not a plain forward pass"):
        Transformer(cfg).apply(variables, prompt)


def test_received_attention_sums_to_one_per_query_and_head():
    from ling_jax.layers.pruning_baselines import received_attention

    b, t, h, hkv, d = 2, 10, 4, 2, 8
    q = jax.random.normal(jax.random.key(0), (b, t, h, d))
    k = jax.random.normal(jax.random.key(1), (b, t, hkv, d))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    valid = jnp.ones((b, t), bool).at[0, :3].set(False)  # row 0 left-padded
    h2o = received_attention(q, k, pos, valid, pos, valid, "h2o")
    np.testing.assert_allclose(np.asarray(jnp.sum(h2o, axis=1)), [h * (t - 3), h * t], rtol=1e-5)
    assert float(jnp.max(jnp.abs(h2o[0, :3]))) == 0.0  # padding receives nothing
    tova = received_attention(q[:, -1:], k, pos[:, -1:], valid[:, -1:], pos, valid, "tova")
    np.testing.assert_allclose(np.asarray(jnp.sum(tova, axis=1)), [h, h], rtol=1e-5)
    snap = received_attention(q[:, -4:], k, pos[:, -4:], valid[:, -4:], pos, valid, "snapkv")
    plain = received_attention(q[:, -4:], k, pos[:, -4:], valid[:, -4:], pos, valid, "h2o")
    assert bool(jnp.all(snap >= plain - 1e-6))  # max-pooling over neighbours never lowers a score
