"""Token pruning: config errors, invariances (keep-all == dense, causality, soft == hard when
binarised), scorer gradients, the budget rule against a brute-force reference, baselines on
hand-made examples, compaction and the ledger."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_jax.config import ConfigError, ModelConfig, PruningConfig, get_preset
from ling_jax.layers import kv_cache
from ling_jax.layers.attention import AttentionMask, attend
from ling_jax.layers.pruning import budget_expiry, hard_keep, soft_log_keep, temperature
from ling_jax.layers.pruning_baselines import random_priority
from ling_jax.ledger import ledger_from_intermediates, token_reduction_factor
from ling_jax.model import Transformer, init_params
from ling_jax.testing import assert_close
from ling_jax.token_state import TokenState

pytestmark = pytest.mark.fast_xla  # tiny programs compared with each other: see tests/conftest.py

B, T = 2, 40
BASE = get_preset("cpu-tiny").model  # 2 layers, d_model 64


def make(**pruning) -> ModelConfig:
    return dataclasses.replace(BASE, pruning=PruningConfig(enabled=True, **pruning))


HARD = dict(mode="hard", layers="all", num_sinks=2, window=4)


@functools.lru_cache(maxsize=None)
def apply_fn(cfg: ModelConfig, collections=()):
    """Jitted apply for a config, compiled once per (config, shapes) across tests."""
    model = Transformer(cfg)

    def run(p, tokens, positions=None, valid=None, **kw):
        if collections:
            return model.apply({"params": p}, tokens, positions, valid, mutable=list(collections), **kw)
        return model.apply({"params": p}, tokens, positions, valid, **kw), {}

    return jax.jit(run)


def spread_scorers(p, scale=40.0):
    """Scorer weights large and bias 0, so keep decisions differ from token to token."""
    def f(path, x):
        names = [getattr(k, "key", "") for k in path]
        if "scorer" not in names:
            return x
        return jnp.zeros_like(x) if names[-1] == "b" else x * scale
    return jax.tree_util.tree_map_with_path(f, p)


@pytest.fixture(scope="module")
def params():
    """Parameters with a low-rank scorer (a superset of the linear one) on every layer."""
    model = Transformer(make(layers="all", scorer="lowrank"))
    p = jax.jit(lambda k: nn.meta.unbox(init_params(model, k)))(jax.random.key(0))
    return spread_scorers(p)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (B, T), 0, BASE.vocab_size)


@pytest.fixture(scope="module")
def dense(params, tokens):
    return apply_fn(BASE)(params, tokens)[0]


# ----------------------------------------------------------------------------- config (acceptance 5)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_keep_ratio_outside_unit_interval_fails(ratio):
    with pytest.raises(ConfigError, match=r"PruningConfig.target_keep_ratio must be in \(0.0, 1.0\]"):
        PruningConfig(target_keep_ratio=ratio)
    PruningConfig(target_keep_ratio=1.0)


def test_budget_smaller_than_sinks_plus_window_fails():
    with pytest.raises(ConfigError, match=r"budget \(10\) must be >= num_sinks \+ window \(4 \+ 8\)"):
        PruningConfig(budget=10, num_sinks=4, window=8)


def test_pruning_a_layer_that_does_not_exist_fails():
    with pytest.raises(ConfigError, match=r"pruning.layers selects layers \[5\] that do not exist"):
        make(layers="1,5")


def test_unknown_scorer_kind_fails():
    with pytest.raises(ConfigError, match=r"PruningConfig.scorer must be one of \['linear', 'lowrank'\], got 'mlp'"):
        PruningConfig(scorer="mlp")


@pytest.mark.parametrize("kwargs,match", [
    (dict(baseline="h2o"), r"is a hard mask: set mode='hard'"),
    (dict(mode="hard", baseline="window"), r"set inference_rule='budget'"),
    (dict(mode="soft", compaction=True), r"compaction needs mode='hard'"),
    (dict(mode="hard", inference_rule="threshold", baseline="snapkv"), r"set inference_rule='budget'"),
    (dict(window=0), r"window must be a positive integer"),
    (dict(final_temperature=0.0), r"final_temperature must be > 0"),
    (dict(baseline="lru"), r"baseline must be one of"),
])
def test_other_bad_settings_fail_clearly(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PruningConfig(**kwargs)


# ----------------------------------------------------------------------------- invariances (acceptance 1)


@pytest.mark.xla_optimized
@pytest.mark.parametrize("kwargs", [
    dict(threshold=0.0),
    dict(threshold=0.0, compaction=True, budget=64),
    dict(inference_rule="budget", budget=T),
    dict(inference_rule="budget", budget=T, compaction=True),
    dict(inference_rule="budget", budget=T, scorer="linear", cascade=False),
])
def test_keep_everything_gives_exactly_the_dense_logits(params, tokens, dense, kwargs):
    out, _ = apply_fn(make(**{**HARD, "scorer": "lowrank", **kwargs}))(params, tokens)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dense))


@pytest.mark.parametrize("kwargs", [
    dict(mode="soft", layers="all", scorer="lowrank"),
    dict(**HARD, scorer="lowrank"),  # threshold, cascade
    dict(**HARD, inference_rule="budget", budget=12),
    dict(**HARD, scorer="lowrank", compaction=True, budget=24),  # threshold compaction (overflow: earliest kept)
])
def test_no_future_token_changes_an_earlier_output(params, tokens, kwargs):
    cfg = make(**kwargs)
    fn = apply_fn(cfg)
    base = fn(params, tokens)[0]
    assert not np.allclose(base, apply_fn(BASE)(params, tokens)[0])  # pruning is really active
    for t in (3, 17, T - 1):
        changed = tokens.at[:, t:].set((tokens[:, t:] * 7 + 3) % BASE.vocab_size)
        out = fn(params, changed)[0]
        np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))


def test_budget_compaction_reproduces_the_last_position_of_one_pruning_layer(params, tokens):
    """Budget compaction keeps what the last query sees, so with one pruning layer that does not
    cascade into re-scoring, the last position's logits match the masked (uncompacted) model."""
    kw = dict(HARD, layers="0", inference_rule="budget", budget=12)
    masked = apply_fn(make(**kw))(params, tokens)[0]
    compacted = apply_fn(make(**kw, compaction=True))(params, tokens)[0]
    assert_close(compacted[:, -1], masked[:, -1])


def test_hard_mask_equals_soft_mask_with_binarised_scores(params, tokens):
    scores = jax.random.normal(jax.random.key(2), (B, T)) * 3
    keep = hard_keep(scores, 0.5)
    binary = jnp.where(jax.nn.sigmoid(scores) >= 0.5, 0.0, -jnp.inf)  # log of the binarised keep prob
    q = jax.random.normal(jax.random.key(3), (B, T, 4, 16))
    k, v = (jax.random.normal(jax.random.key(i), (B, T, 2, 16)) for i in (4, 5))
    base = AttentionMask.causal_self(jnp.broadcast_to(jnp.arange(T), (B, T))).replace(num_sinks=1, window=3)
    run = jax.jit(attend, static_argnames="impl")
    for impl in ("reference", "xla"):
        hard = run(q, k, v, base.replace(kv_keep=keep), impl=impl)
        soft = run(q, k, v, base.replace(kv_log_keep=jnp.maximum(binary, -1e30)), impl=impl)
        assert_close(soft, hard)
    # In the model: a near-zero temperature binarises the soft mask.
    hard_logits = apply_fn(make(**HARD, scorer="lowrank"))(params, tokens)[0]
    soft_cfg = make(layers="all", scorer="lowrank", num_sinks=2, window=4, temperature=1e-6, final_temperature=1e-6)
    assert_close(apply_fn(soft_cfg)(params, tokens)[0], hard_logits)


@pytest.mark.parametrize("kwargs", [
    dict(threshold=1.0),  # nothing passes the threshold
    dict(inference_rule="budget", budget=3, window=1, num_sinks=2),  # the budget holds sinks and self only
    dict(threshold=1.0, compaction=True, budget=8),
])
def test_every_non_sink_token_pruned_gives_finite_outputs(params, tokens, kwargs):
    cfg = make(**{**HARD, "window": 1, **kwargs})
    valid = jnp.arange(T)[None, :] >= jnp.array([[0], [9]])  # second row left-padded
    positions = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)
    out, inter = apply_fn(cfg, ("intermediates",))(params, tokens, positions, valid)
    assert np.isfinite(np.asarray(out)).all()
    kept = ledger_from_intermediates(cfg, inter["intermediates"]).count("tokens_kept")
    per_row = cfg.pruning.num_sinks + (1 if "budget" in kwargs.values() else 0)  # sinks (+ self)
    assert kept == cfg.num_layers * B * per_row


# ----------------------------------------------------------------------------- training signal


@pytest.mark.parametrize("scorer", ["linear", "lowrank"])
def test_the_scorer_receives_gradient(params, tokens, scorer):
    cfg = make(layers="all", scorer=scorer, regularizer_weight=0.0)
    model = Transformer(cfg)
    p = jax.tree_util.tree_map_with_path(lambda path, x: x / 40.0 if "scorer" in str(path) else x, params)

    def loss(p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    grads = jax.jit(jax.grad(loss))(p)
    for layer in ("block_0", "block_1"):
        g = grads[layer]["pruner"]["scorer"]
        assert float(jnp.abs(g["w"]).sum()) > 0 and float(jnp.abs(g["b"])) > 0
        if scorer == "lowrank":
            assert float(jnp.abs(g["wq"]).sum()) > 0 and float(jnp.abs(g["wk"]).sum()) > 0


def test_regulariser_drives_the_keep_ratio_toward_its_target(params, tokens):
    cfg = make(layers="all", scorer="linear", target_keep_ratio=0.2, regularizer_weight=3.0)
    model = Transformer(cfg)
    p = jax.tree_util.tree_map_with_path(lambda path, x: x / 40.0 if "scorer" in str(path) else x, params)

    def reg(p):
        _, state = model.apply({"params": p}, tokens, mutable=["intermediates"])
        inter = state["intermediates"]
        blocks = [inter[f"block_{i}"]["pruner"] for i in range(cfg.num_layers)]
        loss = sum(v for blk in blocks for v in blk["loss_pruning_keep"])
        ratio = sum(blk["pruning_keep_ratio"][0] for blk in blocks) / len(blocks)
        return loss, ratio

    (loss, ratio), grads = jax.jit(jax.value_and_grad(reg, has_aux=True))(p)
    assert ratio > 0.2 and float(loss) > 0
    assert all(float(grads[f"block_{i}"]["pruner"]["scorer"]["b"]) > 0 for i in range(2))  # descent lowers keep
    step = jax.tree_util.tree_map(lambda x, g: x - 2.0 * g, p, grads)
    assert float(jax.jit(reg)(step)[1]) < float(ratio)


def test_temperature_anneals_geometrically():
    pc = PruningConfig(temperature=1.0, final_temperature=0.01, anneal_steps=100)
    assert float(temperature(pc, 0)) == pytest.approx(1.0)
    assert float(temperature(pc, 50)) == pytest.approx(0.1, rel=1e-5)
    assert float(temperature(pc, 1000)) == pytest.approx(0.01, rel=1e-5)
    assert float(temperature(pc, None)) == pytest.approx(0.01, rel=1e-5)  # evaluation: the hard end
    assert float(temperature(PruningConfig(temperature=0.5), 7)) == 0.5
    s = jnp.array([-1.0, 1.0])
    assert float(jnp.exp(soft_log_keep(s, 0.01))[0]) < 1e-30 and float(jnp.exp(soft_log_keep(s, 0.01))[1]) > 0.999


# ----------------------------------------------------------------------------- the budget rule


def brute_force_budget(prio, cand, pos, valid, k, window, sinks):
    """Per query: sinks, its window and the k best exited candidates (ties: the more recent)."""
    b, t = prio.shape
    out = np.zeros((b, t, t), bool)
    for r in range(b):
        for i in range(t):
            if not valid[r, i]:
                continue
            older = [j for j in range(t) if cand[r, j] and pos[r, i] - pos[r, j] >= window]
            best = sorted(older, key=lambda j: (prio[r, j], pos[r, j]), reverse=True)[:k]
            for j in range(t):
                if valid[r, j] and pos[r, j] <= pos[r, i]:
                    out[r, i, j] = pos[r, j] < sinks or pos[r, i] - pos[r, j] < window or j in best
    return out


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(0, 5), window=st.integers(1, 4), sinks=st.integers(0, 2),
       ties=st.booleans(), block=st.sampled_from([1, 3, 16, 20, 32]))
def test_budget_expiry_matches_brute_force(seed, k, window, sinks, ties, block):
    rng = np.random.default_rng(seed)
    b, t = 2, 16
    prio = rng.integers(0, 3, (b, t)).astype(np.float32) if ties else rng.normal(size=(b, t)).astype(np.float32)
    valid = np.ones((b, t), bool)
    valid[1, :rng.integers(0, 6)] = False  # left padding
    pos = np.maximum(np.cumsum(valid, 1) - 1, 0)
    keep = rng.random((b, t)) < 0.8
    cand = keep & valid & (pos >= sinks)
    expiry = jax.jit(budget_expiry, static_argnums=(3, 4, 5))(jnp.asarray(prio), jnp.asarray(cand), jnp.asarray(pos),
                                                              k, window, block)
    mask = AttentionMask.causal_self(jnp.asarray(pos), jnp.asarray(valid)).replace(
        kv_keep=jnp.asarray(keep), kv_expire=expiry, num_sinks=sinks, window=window)
    expected = brute_force_budget(prio, cand, pos, valid, k, window, sinks)
    np.testing.assert_array_equal(np.asarray(mask.dense()[0]), expected)
    per_query = expected.sum(-1)
    assert per_query.max() <= sinks + window + k


@pytest.mark.xla_optimized
def test_budget_expiry_writes_no_count_per_pair():
    """The budget rule's expiry reads the T x T (beater, key) pairs once and writes no [T, T]
    running count (a cumsum over the pairs was the largest cost of a 2048-token prefill with
    compaction at keep 0.1 besides the first layer's attention, ``experiments/bench_pruning.py``)."""
    t = 2048
    args = jnp.zeros((1, t)), jnp.ones((1, t), bool), jnp.arange(t)[None]
    cost = jax.jit(lambda p, c, q: budget_expiry(p, c, q, 100, 4)).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert cost["bytes accessed"] < 4 * t * t, cost["bytes accessed"]  # 4 t^2: one int32 [T, T] array


# ----------------------------------------------------------------------------- baselines (acceptance 2)


def visible_to_last_query(cfg, params, tokens, oracle=None):
    """Positions the last query of row 0 can see at the top layer (via the cache a prefill holds)."""
    model = Transformer(cfg)
    run = jax.jit(lambda p, t, o: model.apply(
        {"params": p}, t, state=TokenState(cache_op=kv_cache.PREFILL, cache_slots=tokens.shape[1], oracle=o),
        mutable=["cache"]))
    _, state = run(params, tokens, oracle)
    pos = np.asarray(state["cache"][f"block_{cfg.num_layers - 1}"]["attn"]["pos"][0])
    return sorted(int(p) for p in pos if p >= 0)


BUDGET = dict(HARD, inference_rule="budget", budget=10, num_sinks=2, window=3)  # 5 older keys


def test_window_baseline_keeps_sinks_and_the_most_recent(params, tokens):
    got = visible_to_last_query(make(**BUDGET, baseline="window"), params, tokens)
    assert got == [0, 1] + list(range(T - 8, T))  # sinks + (budget - sinks) most recent


def test_random_baseline_keeps_exactly_the_budget_and_depends_on_seed(params, tokens):
    a = visible_to_last_query(make(**BUDGET, baseline="random", seed=0), params, tokens)
    b = visible_to_last_query(make(**BUDGET, baseline="random", seed=1), params, tokens)
    assert len(a) == len(b) == 10 and a[:2] == [0, 1] and a[-3:] == [T - 3, T - 2, T - 1]
    assert a != b
    u = random_priority(jnp.arange(1000)[None], layer=0, seed=0)
    assert 0.45 < float(u.mean()) < 0.55 and float(u.min()) >= 0 and float(u.max()) < 1


def test_oracle_baseline_keeps_the_oracle_tokens(params, tokens):
    oracle = jnp.zeros((B, T), bool).at[:, jnp.array([5, 11, 20, 29])].set(True)
    got = visible_to_last_query(make(**BUDGET, baseline="oracle"), params, tokens, oracle=oracle)
    assert got == [0, 1, 5, 11, 20, 29, T - 4, T - 3, T - 2, T - 1]  # the 5th slot: the most recent other
    thr = visible_to_last_query(make(**HARD, baseline="oracle"), params, tokens, oracle=oracle)
    assert thr == [0, 1, 5, 11, 20, 29] + list(range(T - 4, T))  # threshold rule: the oracle set exactly


def test_learned_budget_keeps_the_highest_scores(params, tokens):
    cfg = make(**{**BUDGET, "layers": "1"}, scorer="linear", cascade=False)
    model = Transformer(cfg)  # capture the scorer's output (row 0, layer 1)
    capture = lambda mdl, _: mdl.name == "scorer"
    _, state = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["intermediates"],
                                                capture_intermediates=capture))(params, tokens)
    score = np.asarray(state["intermediates"]["block_1"]["pruner"]["scorer"]["__call__"][0][0])
    older = np.arange(2, T - 3)
    best = sorted(older[np.argsort(score[older])[::-1][:5]].tolist())
    got = visible_to_last_query(cfg, params, tokens)
    assert got == sorted([0, 1] + best + [T - 3, T - 2, T - 1])
    # The budget rule ranks; it does not threshold.
    strict = dataclasses.replace(cfg, pruning=dataclasses.replace(cfg.pruning, threshold=1.0))
    assert visible_to_last_query(strict, params, tokens) == got


def test_h2o_and_tova_evict_by_the_attention_keys_received():
    """Hand-made cache: 4 slots, sinks 0, window 1. Key 0 was attended heavily long ago, key 1 a
    little each step, key 2 only by the last query. H2O keeps the heavy hitter; TOVA the key the
    current query likes."""
    cache = kv_cache.empty(1, 3, 1, 2, jnp.float32)
    cache = {**cache, "pos": jnp.array([[0, 1, 2]], jnp.int32)}
    steps = [jnp.array([[[0.9, 0.1, 0.0]]]), jnp.array([[[0.6, 0.2, 0.2]]]), jnp.array([[[0.0, 0.3, 0.7]]])]
    ok = jnp.array([True])
    h2o, tova = cache, cache
    for probs in steps:
        h2o = kv_cache.update_scores(h2o, probs, "h2o", ok)
        tova = kv_cache.update_scores(tova, probs, "tova", ok)
    np.testing.assert_allclose(np.asarray(h2o["score"][0]), [1.5, 0.6, 0.9], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(tova["score"][0]), [0.0, 0.3, 0.7], rtol=1e-6)
    q_pos = jnp.array([3])
    assert int(kv_cache.choose_slot(h2o, q_pos, 0, 1)[0]) == 1  # lowest accumulated attention
    assert int(kv_cache.choose_slot(tova, q_pos, 0, 1)[0]) == 0  # lowest current attention
    # Sinks and the window are never evicted; an empty slot is used first.
    assert int(kv_cache.choose_slot(tova, q_pos, 1, 1)[0]) == 1
    assert int(kv_cache.choose_slot(tova, jnp.array([2]), 0, 2)[0]) == 0
    assert int(kv_cache.choose_slot({**tova, "pos": jnp.array([[0, -1, 2]])}, q_pos, 0, 1)[0]) == 1


def test_attention_policies_refuse_the_parallel_forward(params, tokens):
    with pytest.raises(ValueError, match=r"baseline=.h2o. scores keys by the attention they receive: run it through a KV-cache prefill"):
        apply_fn(make(**BUDGET, baseline="h2o"))(params, tokens)
    with pytest.raises(ValueError, match=r"baseline='oracle' needs the task's oracle mask"):
        apply_fn(make(**BUDGET, baseline="oracle"))(params, tokens)


# ----------------------------------------------------------------------------- compaction and ledger


def test_compaction_shortens_later_layers_and_the_ledger_sees_it(params, tokens):
    kw = dict(HARD, layers="0", inference_rule="budget", budget=10)
    masked, inter_m = apply_fn(make(**kw), ("intermediates",))(params, tokens)
    compacted, inter_c = apply_fn(make(**kw, compaction=True), ("intermediates",))(params, tokens)
    lm = ledger_from_intermediates(make(**kw), inter_m["intermediates"])
    lc = ledger_from_intermediates(make(**kw), inter_c["intermediates"])
    pairs = lambda inter, i: float(inter["intermediates"][f"block_{i}"]["attn"]["attn_pairs_computed"][0])
    assert pairs(inter_c, 0) == B * T * T and pairs(inter_c, 1) == B * 10 * 10  # layer 1 runs on 10 tokens
    assert pairs(inter_m, 1) == B * T * T
    kv = lambda inter, i: float(inter["intermediates"][f"block_{i}"]["attn"]["kv_entries"][0])
    assert kv(inter_m, 0) == kv(inter_c, 1) == B * 10  # what the last query (and a cache) holds
    assert lc.count("tokens_kept") == B * 10
    assert token_reduction_factor(BASE, lc, B, T) > token_reduction_factor(BASE, lm, B, T)
    assert lc.computed < lm.computed
    assert "flops_pruning_scorer" in lc.per_layer["block_0"]
    assert np.isfinite(np.asarray(compacted)).all()
