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

B, P, C = 2, 24, 6
BASE = dataclasses.replace(get_preset("cpu-tiny").model, num_layers=2)
PRUNED = dataclasses.replace(BASE, pruning=PruningConfig(enabled=True, mode="hard", layers="from:1", num_sinks=1,
                                                         window=4, inference_rule="budget", budget=8,
                                                         compaction=True))


@pytest.fixture(scope="module")
def params():
    return nn.meta.unbox(jax.jit(lambda k: init_params(Transformer(PRUNED), k))(jax.random.key(0)))


@pytest.fixture(scope="module")
def request_tokens():
    tokens = jax.random.randint(jax.random.key(3), (B, P + C), 0, BASE.vocab_size)
    return tokens[:, :P], tokens[:, P:]


def test_dense_request_equals_the_forward_pass_and_its_flops(params, request_tokens):
    prompt, cont = request_tokens
    dense_params = {k: v for k, v in params.items()}
    out = run_request(BASE, dense_params, prompt, cont)
    full = Transformer(BASE).apply({"params": dense_params}, jnp.concatenate([prompt, cont], axis=1))
    assert_close(out.logits, full[:, P - 1:P + C - 1])
    # Prefill of P tokens, then C - 1 steps each attending over the cache's slots (P + C).
    assert out.prefill_computed_flops == pytest.approx(dense_forward_flops(BASE, B, P), rel=1e-6)
    assert out.computed_flops > out.prefill_computed_flops
    nll = float(continuation_nll(out.logits, cont))
    assert np.isfinite(nll) and nll > 0


def test_pruned_request_computes_less_and_holds_a_smaller_cache(params, request_tokens):
    prompt, cont = request_tokens
    dense = run_request(dense_of(PRUNED), params, prompt, cont)
    pruned = run_request(PRUNED, params, prompt, cont)
    assert pruned.logits.shape == (B, C, BASE.vocab_size) and bool(jnp.all(jnp.isfinite(pruned.logits)))
    assert pruned.computed_flops < dense.computed_flops
    assert pruned.cache_bytes < dense.cache_bytes


def test_adaptive_depth_and_empty_continuations_are_refused(params, request_tokens):
    prompt, cont = request_tokens
    with pytest.raises(ConfigError, match=r"model.depth.exit_enabled=false"):
        run_request(dataclasses.replace(BASE, depth=DepthConfig(exit_enabled=True, mode="infer")), params, prompt, cont)
    with pytest.raises(ValueError, match=r"at least one token"):
        run_request(BASE, params, prompt, cont[:, :0])
