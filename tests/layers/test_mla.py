"""Multi-head latent attention (ling_jax/layers/mla.py): reference vs fast paths (forward and
gradients), the KV cache against the parallel forward, the ledger against XLA's cost analysis,
config validation. Hugging Face parity is in tests/interop/test_hf.py."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.config import ConfigError, MLAConfig, ModelConfig, PruningConfig, RopeScalingConfig
from ling_jax.generate import teacher_forced_decode
from ling_jax.ledger import ledger_from_intermediates, unit_flops
from ling_jax.model import Transformer
from ling_jax.testing import assert_close

pytestmark = pytest.mark.fast_xla  # tiny programs compared with each other: see tests/conftest.py

MLA_DIMS = MLAConfig(q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12)
CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=48, max_seq_len=32,
                  attention="mla", mla=MLA_DIMS)
TOKENS = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)


@pytest.fixture(scope="module")
def params():
    p = nn.meta.unbox(jax.jit(Transformer(CFG).init)(jax.random.key(0), TOKENS)["params"])
    leaves, tree = jax.tree_util.tree_flatten(p)  # norm scales off 1
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _variants():
    yarn_no_lora = dataclasses.replace(CFG, mla=dataclasses.replace(MLA_DIMS, q_lora_rank=0, mscale_all_dim=0.5),
                                       rope_scaling=RopeScalingConfig(kind="yarn", factor=4.0, original_max_len=8))
    return {"q_lora": CFG, "no_q_lora_yarn_mscale": yarn_no_lora}


@pytest.mark.parametrize("name", list(_variants()))
def test_reference_vs_xla_forward_and_grad(name):
    cfg = _variants()[name]
    ref, fast = (Transformer(dataclasses.replace(cfg, attention_impl=i)) for i in ("reference", "xla"))
    p = jax.jit(ref.init)(jax.random.key(2), TOKENS)["params"]
    loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, TOKENS) ** 2)  # noqa: E731
    (l_fast, g_fast), (l_ref, g_ref) = (jax.jit(jax.value_and_grad(loss(m)))(p) for m in (fast, ref))
    assert_close(l_fast, l_ref)
    assert_close(g_fast, g_ref, kind="grad")
    attn = nn.meta.unbox(p)["block_0"]["attn"]
    assert ("wq_a" in attn) == bool(cfg.mla.q_lora_rank) and attn["wo"].shape == (4, 12, 32)


def test_pallas_path_pads_the_value_heads(params):
    """The block-sparse kernel takes one head size: values (12) wider than queries/keys are padded."""
    ref, out = (jax.jit(Transformer(dataclasses.replace(CFG, attention_impl=i)).apply)({"params": params}, TOKENS)
                for i in ("reference", "pallas"))
    assert_close(out, ref)


def test_mscale_scales_the_softmax(params):
    """DeepSeek's YaRN mscale: softmax logits times (0.1 * m * ln(factor) + 1)^2, nothing else."""
    from ling_jax.layers.mla import softmax_mscale

    yarn = dataclasses.replace(CFG, rope_scaling=RopeScalingConfig(kind="yarn", factor=4.0, original_max_len=8))
    with_m = dataclasses.replace(yarn, mla=dataclasses.replace(MLA_DIMS, mscale_all_dim=1.0))
    assert softmax_mscale(with_m) == pytest.approx((0.1 * np.log(4.0) + 1.0) ** 2)
    assert softmax_mscale(yarn) == 1.0 and softmax_mscale(CFG) == 1.0
    a, b = (jax.jit(Transformer(c).apply)({"params": params}, TOKENS) for c in (yarn, with_m))
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-3


def test_kv_cache_decoding_equals_the_forward(params):
    """Token-by-token decoding through the (up-projected) per-head cache gives the parallel logits."""
    forward = jax.jit(Transformer(CFG).apply)({"params": params}, TOKENS)
    assert_close(teacher_forced_decode(CFG, {"params": params}, TOKENS), forward)


def test_budget_pruning_with_compaction(params):
    """MLA is a drop-in for the attention core: budget pruning with compaction runs unchanged, and a
    budget covering every token equals the unpruned model."""
    pruning = PruningConfig(enabled=True, mode="hard", layers="from:1", num_sinks=1, window=4, budget=16,
                            inference_rule="budget", compaction=True)
    cfg = dataclasses.replace(CFG, pruning=pruning)
    p = jax.jit(Transformer(cfg).init)(jax.random.key(0), TOKENS)["params"]  # the pruner's scorer too
    logits = jax.jit(Transformer(cfg).apply)({"params": p}, TOKENS)
    assert_close(logits, jax.jit(Transformer(CFG).apply)({"params": p}, TOKENS))


@pytest.mark.xla_optimized
def test_ledger_matches_xla_cost_analysis(params):
    """The ledger's MLA FLOPs (low-rank projections, q.k at nope+rope dims, p.v at v dims) are what
    XLA compiles, within 10%; and they are not the MHA formula's."""
    fn = jax.jit(lambda p, t: Transformer(CFG).apply({"params": p}, t, mutable=["intermediates"]))
    cost = fn.lower(params, TOKENS).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    _, state = fn(params, TOKENS)
    computed = ledger_from_intermediates(CFG, state["intermediates"]).computed
    assert abs(float(cost["flops"]) / computed - 1.0) < 0.10, (cost["flops"], computed)
    mha = dataclasses.replace(CFG, attention="mha", mla=MLAConfig())
    assert unit_flops(CFG)["tokens_computed"] != unit_flops(mha)["tokens_computed"]
    assert unit_flops(CFG)["attn_pairs"] == 2.0 * 4 * (12 + 12)


@pytest.mark.parametrize("changes, match", [
    (dict(attention="gqa"), r"attention must be one of \['mha', 'mla'\]"),
    (dict(attention="mha"), "mla is set but ModelConfig.attention is 'mha'"),
    (dict(mla=dataclasses.replace(MLA_DIMS, kv_lora_rank=0)), "mla.kv_lora_rank must be a positive integer"),
    (dict(mla=dataclasses.replace(MLA_DIMS, qk_rope_head_dim=3)), "qk_rope_head_dim .3. must be even"),
    (dict(num_kv_heads=2), "num_kv_heads .2. must equal num_heads .4."),
    (dict(qk_norm="head"), "qk_norm='head' is not supported with attention='mla'"),
])
def test_bad_configs_are_refused(changes, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(CFG, **changes)
    with pytest.raises(ConfigError, match="MLAConfig.v_head_dim must be >= 0"):
        MLAConfig(v_head_dim=-1)


def test_every_mla_parameter_has_a_sharding_rule():
    from ling_jax.config import Config, TrainConfig
    from ling_jax.sharding import logical_state_specs, partition_table, unruled_names

    config = Config(model=CFG, train=TrainConfig(batch_size=2, seq_len=16))
    assert unruled_names(logical_state_specs(config)) == set()
    table = partition_table(config)
    names = [n for n in table if "block_0" in n and "attn" in n]
    assert any("wkv_b" in n for n in names) and any("q_a_norm" in n for n in names), names
