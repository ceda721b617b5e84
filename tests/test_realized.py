"""Realized compute: the ledger's ``computed`` FLOPs are what XLA compiles, mechanism by mechanism.

Each case compiles one forward pass (or one decoding step) and compares the ledger's count with
XLA's cost analysis of that very program. A forward whose token count is chosen at run time
(``nn.switch`` over ``depth.infer_buckets``) is a conditional whose taken branch XLA's static
analysis cannot see (it reports the largest branch); those cases are checked bucket by bucket:
each single-bucket program against XLA, and the bucketed forward against the single-bucket
program of the bucket it chose (same outputs, same ledger). The wall-time side is
``experiments/bench_realized.py``.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax import generate_exit
from ling_jax.cost import forward_cost, xla_flops
from ling_jax.config import DepthConfig, MoEConfig, PruningConfig, get_preset
from ling_jax.evaluation import _eval_fn, eval_fn
from ling_jax.ledger import dense_forward_flops, ledger_from_intermediates, token_reduction_factor
from ling_jax.model import Transformer, init_params
from ling_jax.policy import static_config
from ling_jax.testing import assert_close

B, T = 2, 64
BASE = dataclasses.replace(get_preset("cpu-tiny").model, num_layers=3)
TOLERANCE = 0.10  # acceptance: ledger within 10% of XLA

EXIT = dict(mode="infer", exit_enabled=True, exit_confidence="margin")
MOD = dict(mode="infer", mod_enabled=True, mod_layers="every:2:1", mod_capacity=0.25)
HARD = dict(enabled=True, mode="hard", layers="from:1", num_sinks=1, window=4, budget=16)


def cfg_with(depth=None, pruning=None, moe=None):
    return dataclasses.replace(BASE, depth=DepthConfig(**(depth or {})), pruning=PruningConfig(**(pruning or {})),
                               moe=MoEConfig(**(moe or {})))


FULL = cfg_with(depth=dict(**MOD, exit_enabled=True), pruning=HARD,
                moe=dict(enabled=True, num_experts=4, top_k=2, num_zero_experts=2, layers="every:2:0"))


@pytest.fixture(scope="module")
def params():
    """One parameter tree with every mechanism's parameters (routers and predictors spread out):
    MoE blocks from FULL, the plain MLPs of the same blocks from FULL without MoE."""
    init = lambda cfg: nn.meta.unbox(jax.jit(lambda k: init_params(Transformer(cfg), k))(jax.random.key(0)))  # noqa: E731
    p = init(dataclasses.replace(FULL, moe=MoEConfig()))
    for name, block in init(FULL).items():
        p[name] = {**p[name], **block} if isinstance(block, dict) else block
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * 4.0 if any(getattr(k, "key", "") in ("router", "predictor") for k in path) else x, p)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (B, T), 0, BASE.vocab_size)


def subset(params, cfg):
    """The parameters ``cfg`` uses, taken from the all-mechanism tree."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(init_params(Transformer(cfg), jax.random.key(0))))

    def take(tree, like):
        return {k: take(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}

    return take(params, shapes)


def run(cfg, params, tokens, **policy):
    """(logits, intermediates, depth decisions, XLA FLOPs) of one compiled forward."""
    return tuple(forward_cost(cfg, subset(params, cfg), tokens, **policy))


def assert_ledger_matches_xla(cfg, inter, xla_flops):
    computed = ledger_from_intermediates(cfg, inter).computed
    assert abs(xla_flops / computed - 1.0) < TOLERANCE, (xla_flops, computed)
    return computed


CASES = {
    "pruning threshold (masked)": (cfg_with(pruning=HARD), {"prune_threshold": 0.6}),
    "pruning budget (masked)": (cfg_with(pruning={**HARD, "inference_rule": "budget"}), {}),
    "pruning budget + compaction": (cfg_with(pruning={**HARD, "inference_rule": "budget", "compaction": True}), {}),
    "MoD predictor, capacity 1/4": (cfg_with(depth={**MOD, "infer_buckets": "0.25"}), {}),
    "MoD threshold, capacity 1/2": (cfg_with(depth={**MOD, "mod_inference": "threshold", "infer_buckets": "0.5"}),
                                    {"mod_threshold": 0.3}),
    "MoD top-k": (cfg_with(depth={**MOD, "mod_inference": "topk"}), {}),
    "early exit, capacity 1/2": (cfg_with(depth={**EXIT, "infer_buckets": "0.5"}), {"exit_threshold": 0.0}),
    "early exit, capacity 0": (cfg_with(depth={**EXIT, "infer_buckets": "0,1"}), {"exit_threshold": 0.0}),
    "zero-compute experts (dense dispatch)": (
        cfg_with(moe=dict(enabled=True, num_experts=4, top_k=2, num_zero_experts=2, layers="every:2:0",
                          dispatch="dense")), {}),
    "all combined, capacity 1/4": (dataclasses.replace(FULL, depth=dataclasses.replace(
        FULL.depth, infer_buckets="0.25", mod_inference="threshold")), {"exit_threshold": 0.2}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_ledger_computed_matches_xla(name, params, tokens):
    cfg, policy = CASES[name]
    if name == "early exit, capacity 0":  # two buckets: XLA sees the larger; check the empty one alone below
        cfg = dataclasses.replace(cfg, depth=dataclasses.replace(cfg.depth, infer_buckets="1"))
    if name.startswith("zero-compute") or name.startswith("all combined"):
        # Every token to the zero-compute experts: the dense dispatch's buffers are sized by the
        # static capacity, which is what it computes (the sorted dispatch skips empty tiles in a
        # loop whose trip count XLA cannot see: bench_realized times it).
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch="dense", capacity_factor=1.0))
    _, inter, _, xla = run(cfg, params, tokens, **policy)
    assert_ledger_matches_xla(cfg, inter, xla)


def test_realized_mechanisms_compute_less_than_dense(params, tokens):
    """The compacted, bucketed and query-skipping paths really shrink the compiled program."""
    _, inter, _, dense_xla = run(BASE, params, tokens)
    dense = assert_ledger_matches_xla(BASE, inter, dense_xla)
    assert dense == pytest.approx(dense_forward_flops(BASE, B, T))
    assert token_reduction_factor(BASE, ledger_from_intermediates(BASE, inter), B, T) == pytest.approx(1.0)
    for name in ("pruning budget + compaction", "MoD predictor, capacity 1/4", "early exit, capacity 1/2",
                 "all combined, capacity 1/4"):
        cfg, policy = CASES[name]
        _, inter, _, xla = run(cfg, params, tokens, **policy)
        assert xla < 0.85 * dense_xla, name
        assert token_reduction_factor(cfg, ledger_from_intermediates(cfg, inter), B, T) > 1.15, name


@pytest.mark.parametrize("threshold", [0.0, 0.05, 1.0])
def test_bucketed_forward_equals_the_single_bucket_program_it_chose(params, tokens, threshold):
    """Default buckets pick a capacity per layer; the same capacity alone gives the same result,
    and with every bucket only ("1") the masked full-depth program gives the same logits."""
    cfg = cfg_with(depth=EXIT)
    logits, inter, depth, _ = run(cfg, params, tokens, exit_threshold=threshold)
    full = dataclasses.replace(cfg, depth=dataclasses.replace(cfg.depth, infer_buckets="1"))
    ref_logits, ref_inter, ref_depth, _ = run(full, params, tokens, exit_threshold=threshold)
    np.testing.assert_array_equal(np.asarray(depth["exit_layer"][0]), np.asarray(ref_depth["exit_layer"][0]))
    assert_close(logits, ref_logits)
    bucketed = ledger_from_intermediates(cfg, inter).computed
    masked = ledger_from_intermediates(full, ref_inter).computed
    exited = np.asarray(depth["exit_layer"][0]) < BASE.num_layers - 1
    if exited.all():
        assert bucketed < 0.6 * masked  # everything exits at layer 0: the rest is (nearly) free
    if not exited.any():
        assert bucketed == pytest.approx(masked)


def test_every_token_exiting_first_costs_one_layer(params, tokens):
    cfg = cfg_with(depth=EXIT)
    _, inter, depth, _ = run(cfg, params, tokens, exit_threshold=0.0)
    assert np.all(np.asarray(depth["exit_layer"][0]) == 0)
    ledger = ledger_from_intermediates(cfg, inter)
    assert ledger.counts["block_1"]["tokens_computed"] == 0 and ledger.counts["block_2"]["tokens_computed"] == 0
    assert ledger.counts["block_0"]["tokens_computed"] == B * T
    # The single-bucket program of the buckets chosen (layer 0: all; above: none) is what XLA sees.
    layer0 = dense_forward_flops(BASE, B, T) / BASE.num_layers
    assert ledger.computed < 1.5 * layer0


@pytest.mark.parametrize("buckets", ["0", "1"])
def test_early_exit_decode_step_ledger_matches_xla(params, tokens, buckets):
    """One decoding step with the bucket fixed: no row live (keys and values only) or all rows."""
    cfg = cfg_with(depth={**EXIT, "infer_buckets": buckets})
    model = generate_exit.decoding_model(cfg)
    p = subset(params, cfg)
    cache = generate_exit.empty_cache(model, p, B, 8)
    from ling_jax.layers import kv_cache

    def step(p, cache, tok):
        carry = {kv_cache.CACHE_OP: kv_cache.DECODE, kv_cache.CACHE_SLOTS: 0}
        return model.apply({"params": p, "cache": cache}, tok[:, None], jnp.zeros((B, 1), jnp.int32),
                           jnp.ones((B, 1), bool), carry=carry, mutable=["cache", "depth", "intermediates"])

    fn = jax.jit(step)
    flops = xla_flops(fn, p, cache, tokens[:, 0])
    _, state = fn(p, cache, tokens[:, 0])
    computed = assert_ledger_matches_xla(cfg, state["intermediates"], flops)
    if buckets == "0":
        kv = ledger_from_intermediates(cfg, state["intermediates"])
        assert kv.count("tokens_computed") == 0 and kv.count("flops_kv_only") > 0
        assert computed < 0.2 * dense_forward_flops(BASE, B, 1)


def test_decoding_with_everything_exited_still_equals_the_forward(params, tokens):
    """CALM-style decoding (threshold 0: every row exits at layer 0, later layers write keys and
    values only) equals the teacher-forced forward pass with the same decisions."""
    cfg = cfg_with(depth={**EXIT, "exit_threshold": 0.0})
    p = subset(params, cfg)
    decoded, _, info = generate_exit.teacher_forced(cfg, p, tokens[:, :16])
    assert np.all(np.asarray(info["exit_layer"]) == 0)
    forward, _, _, _ = run(cfg, params, tokens[:, :16], exit_threshold=0.0)
    assert_close(decoded, forward)


def test_threshold_sweep_compiles_once(params, tokens):
    """Eight thresholds of each kind through ``evaluate``'s compiled function: one compilation."""
    cfg = cfg_with(depth={**MOD, "mod_inference": "threshold", "exit_enabled": True},
                   pruning={**HARD, "inference_rule": "threshold"})
    p = {"params": subset(params, cfg)}
    batch = {"inputs": tokens[:, :32], "targets": tokens[:, 1:33],
             "loss_mask": jnp.ones((B, 32), jnp.float32), "oracle_mask": jnp.zeros((B, 32), bool)}
    compiled = _eval_fn(static_config(cfg))
    before = compiled._cache_size()
    sums = []
    for v in np.linspace(0.05, 0.95, 8):
        variant = dataclasses.replace(cfg, pruning=dataclasses.replace(cfg.pruning, threshold=float(v)),
                                      depth=dataclasses.replace(cfg.depth, mod_threshold=float(v),
                                                                exit_threshold=float(v)))
        out, _ = eval_fn(variant)(p, batch)
        sums.append(float(out["nll_sum"]))
    assert compiled._cache_size() - before == 1
    assert len(set(sums)) > 1, "the thresholds must change the result"


def test_keep_all_capacity_one_and_unreachable_threshold_equal_dense(params, tokens):
    """Pruning (threshold 0), MoD (capacity 1), early exit (threshold 1) and MoE in one model
    equal the same model with every skipping mechanism off."""
    cfg = dataclasses.replace(FULL, depth=dataclasses.replace(FULL.depth, mod_inference="topk", mod_capacity=1.0))
    logits, _, _, _ = run(cfg, params, tokens, prune_threshold=0.0, exit_threshold=1.0)
    plain = dataclasses.replace(FULL, depth=DepthConfig(), pruning=PruningConfig())
    ref, _, _, _ = run(plain, params, tokens)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref))


def test_no_future_token_changes_an_earlier_output(params, tokens):
    """All mechanisms with causal rules: changing the tail leaves the head's logits unchanged."""
    cfg = dataclasses.replace(FULL, depth=dataclasses.replace(FULL.depth, mod_inference="threshold"))
    t = T // 2
    other = tokens.at[:, t:].set((tokens[:, t:] + 7) % BASE.vocab_size)
    a, _, da, _ = run(cfg, params, tokens, exit_threshold=0.1, mod_threshold=0.5)
    b, _, db, _ = run(cfg, params, other, exit_threshold=0.1, mod_threshold=0.5)
    assert_close(a[:, :t], b[:, :t])
    np.testing.assert_array_equal(np.asarray(da["exit_layer"][0])[:, :t], np.asarray(db["exit_layer"][0])[:, :t])
