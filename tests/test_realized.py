"""Realized compute: the ledger's ``computed`` FLOPs are what XLA compiles, mechanism by mechanism.

Each case compiles one forward pass (or one decoding step) and compares the ledger's count with
XLA's cost analysis of that very program. A forward whose token count is chosen at run time
(``nn.switch`` over ``depth.infer_buckets``) is a conditional whose taken branch XLA's static
analysis cannot see (it reports the largest branch); those cases are checked bucket by bucket:
each single-bucket program against XLA, and the bucketed forward against the single-bucket
program of the bucket it chose (same outputs, same ledger). The wall-time side is
``experiments/bench_realized.py``.
"""

import contextlib
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax import generate_exit
from ling_jax.cost import compile_cost, forward_program, xla_flops
from ling_jax.config import DepthConfig, MoEConfig, PruningConfig, get_preset
from ling_jax.evaluation import _eval_fn, eval_fn
from ling_jax.ledger import dense_forward_flops, ledger_from_intermediates, token_reduction_factor
from ling_jax.model import Transformer, init_params
from ling_jax.policy import as_traced, inference_policy, static_config
from ling_jax.testing import assert_close, fast_compile
from ling_jax.token_state import TokenState

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
# Every mechanism at once, pruned tokens dropped from later layers (threshold rule: causal).
COMPACTED = dataclasses.replace(FULL, pruning=dataclasses.replace(FULL.pruning, compaction=True, layers="1"),
                                depth=dataclasses.replace(FULL.depth, mod_inference="threshold"))


@pytest.fixture(scope="module")
def params():
    """One parameter tree with every mechanism's parameters (routers and predictors spread out):
    MoE blocks from FULL, the plain MLPs of the same blocks from FULL without MoE. Initialised in
    training mode: the same parameters (names and shapes) as inference mode, whose bucketed
    forward (an ``nn.switch`` per layer) would make init a program several times larger to compile."""
    def init(cfg):
        cfg = dataclasses.replace(cfg, depth=dataclasses.replace(cfg.depth, mode="train"))
        return nn.meta.unbox(jax.jit(lambda k: init_params(Transformer(cfg), k))(jax.random.key(0)))

    with fast_compile():
        p, full = init(dataclasses.replace(FULL, moe=MoEConfig())), init(FULL)
    for name, block in full.items():
        p[name] = {**p[name], **block} if isinstance(block, dict) else block
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * 4.0 if any(getattr(k, "key", "") in ("router", "predictor") for k in path) else x, p)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (B, T), 0, BASE.vocab_size)


@functools.lru_cache(maxsize=None)
def param_shapes(cfg):
    """The parameter shapes of ``cfg`` (traced once per config: a trace of init costs seconds)."""
    return jax.eval_shape(lambda: nn.meta.unbox(init_params(Transformer(cfg), jax.random.key(0))))


def subset(params, cfg):
    """The parameters ``cfg`` uses, taken from the all-mechanism tree."""
    shapes = param_shapes(cfg)

    def take(tree, like):
        return {k: take(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}

    return take(params, shapes)


def run(cfg, params, tokens, *, fast=False, **policy):
    """(logits, intermediates, depth decisions, XLA FLOPs) of one compiled forward (compiled once).

    ``fast``: compile with most XLA optimizations off (for tests of outputs, not of FLOPs: without
    dead-code elimination XLA's count is not the optimized program's)."""
    p = subset(params, cfg)
    pol = as_traced(inference_policy(cfg, **policy))
    compiled = _compiled(cfg, fast, jax.ShapeDtypeStruct(tokens.shape, tokens.dtype))
    logits, state = compiled.executable(p, tokens, pol)
    return logits, state["intermediates"], state.get("depth", {}), compiled.xla_flops


@functools.lru_cache(maxsize=None)
def _compiled(cfg, fast, tokens):
    """One compilation per (config, mode, token shape), shared by the tests (thresholds are traced)."""
    p = param_shapes(cfg)
    with fast_compile() if fast else contextlib.nullcontext():
        return compile_cost(forward_program(cfg), p, tokens, as_traced(inference_policy(cfg)))


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
    "all combined + compaction, capacity 1/4": (dataclasses.replace(COMPACTED, depth=dataclasses.replace(
        COMPACTED.depth, infer_buckets="0.25")), {"exit_threshold": 0.2, "prune_threshold": 0.5}),
}


def case(name):
    """(config, policy) of a case as the XLA comparison compiles it."""
    cfg, policy = CASES[name]
    if name == "early exit, capacity 0":  # two buckets: XLA sees the larger; check the empty one alone below
        cfg = dataclasses.replace(cfg, depth=dataclasses.replace(cfg.depth, infer_buckets="1"))
    if name.startswith(("zero-compute", "all combined")):
        # Every token to the zero-compute experts: the dense dispatch's buffers are sized by the
        # static capacity, which is what it computes (the sorted dispatch skips empty tiles in a
        # loop whose trip count XLA cannot see: bench_realized times it).
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch="dense", capacity_factor=1.0))
    return cfg, policy


@pytest.mark.parametrize("name", list(CASES))
def test_ledger_computed_matches_xla(name, params, tokens):
    cfg, policy = case(name)
    _, inter, _, xla = run(cfg, params, tokens, **policy)
    assert_ledger_matches_xla(cfg, inter, xla)


def test_realized_mechanisms_compute_less_than_dense(params, tokens):
    """The compacted, bucketed and query-skipping paths really shrink the compiled program."""
    _, inter, _, dense_xla = run(BASE, params, tokens)
    dense = assert_ledger_matches_xla(BASE, inter, dense_xla)
    assert dense == pytest.approx(dense_forward_flops(BASE, B, T))
    assert token_reduction_factor(BASE, ledger_from_intermediates(BASE, inter), B, T) == pytest.approx(1.0)
    for name in ("pruning budget + compaction", "MoD predictor, capacity 1/4", "early exit, capacity 1/2",
                 "all combined, capacity 1/4", "all combined + compaction, capacity 1/4"):
        cfg, policy = case(name)
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
    cache = generate_exit.empty_cache(model, {"params": p}, B, 8)
    from ling_jax.layers import kv_cache

    def step(p, cache, tok):
        return model.apply({"params": p, "cache": cache}, tok[:, None], jnp.zeros((B, 1), jnp.int32),
                           jnp.ones((B, 1), bool), state=TokenState(cache_op=kv_cache.DECODE),
                           mutable=["cache", "depth", "intermediates"])

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
    with fast_compile():
        decoded, _, info = generate_exit.teacher_forced(cfg, {"params": p}, tokens[:, :16])
    assert np.all(np.asarray(info["exit_layer"]) == 0)
    forward, _, _, _ = run(cfg, params, tokens[:, :16], fast=True, exit_threshold=0.0)
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
    with fast_compile():  # what is counted is compilations, not what XLA makes of the program
        for v in np.linspace(0.05, 0.95, 8):
            variant = dataclasses.replace(cfg, pruning=dataclasses.replace(cfg.pruning, threshold=float(v)),
                                          depth=dataclasses.replace(cfg.depth, mod_threshold=float(v),
                                                                    exit_threshold=float(v)))
            out, _ = eval_fn(variant)(p, batch)
            sums.append(float(out["nll_sum"]))
    assert compiled._cache_size() - before == 1
    assert len(set(sums)) > 1, "the thresholds must change the result"


def test_keep_all_capacity_one_and_unreachable_threshold_equal_dense(params, tokens):
    """Pruning with compaction (threshold 0, budget T: keeps all), MoD (capacity 1), early exit
    (threshold 1) and MoE in one model equal the same model with every skipping mechanism off."""
    cfg = dataclasses.replace(COMPACTED, pruning=dataclasses.replace(COMPACTED.pruning, budget=T),
                              depth=dataclasses.replace(FULL.depth, mod_inference="topk", mod_capacity=1.0))
    logits, _, _, _ = run(cfg, params, tokens, fast=True, prune_threshold=0.0, exit_threshold=1.0)
    plain = dataclasses.replace(FULL, depth=DepthConfig(), pruning=PruningConfig())
    ref, _, _, _ = run(plain, params, tokens, fast=True)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref))


def test_no_future_token_changes_an_earlier_output(params, tokens):
    """All mechanisms with causal rules, pruned tokens compacted away: changing the tail leaves
    the head's logits and decisions unchanged."""
    cfg = COMPACTED
    t = T // 2
    other = tokens.at[:, t:].set((tokens[:, t:] + 7) % BASE.vocab_size)
    a, _, da, _ = run(cfg, params, tokens, fast=True, exit_threshold=0.1, mod_threshold=0.5)
    b, _, db, _ = run(cfg, params, other, fast=True, exit_threshold=0.1, mod_threshold=0.5)
    assert_close(a[:, :t], b[:, :t])
    np.testing.assert_array_equal(np.asarray(da["exit_layer"][0])[:, :t], np.asarray(db["exit_layer"][0])[:, :t])


def test_compaction_with_adaptive_depth_drops_tokens_and_keeps_their_state(params, tokens):
    """After the compacting pruner, MoD and early exit run on the kept tokens only; a dropped
    token reaches the head from the state it had when dropped (not "exited"), and its per-token
    depth state (layers used) stops counting there."""
    cfg = COMPACTED  # at most budget = 16 of the 64 tokens stay after block 1
    logits, inter, decisions, _ = run(cfg, params, tokens, fast=True, prune_threshold=0.5, exit_threshold=0.2)
    assert bool(jnp.all(jnp.isfinite(logits)))
    kept = float(np.asarray(inter["block_1"]["pruner"]["tokens_kept"][0]))
    assert kept < B * T, "the pruner should drop some tokens"
    used = np.asarray(decisions["layers_used"][0])  # [B, T]
    assert used.min() <= 2 < cfg.num_layers, "dropped tokens stop after the compacting block"
    assert int(np.asarray(decisions["exit_layer"][0]).max()) <= cfg.num_layers - 1


def test_everything_combined_decodes_like_the_forward(params, tokens):
    """Compaction, MoD, early exit and MoE in one config decode token by token (compaction is a
    prefill setting: the budgeted KV cache does the pruning) with the decisions of the forward
    pass without compaction."""
    cfg = dataclasses.replace(COMPACTED, pruning=dataclasses.replace(COMPACTED.pruning, budget=16),
                              depth=dataclasses.replace(COMPACTED.depth, exit_threshold=0.0, mod_threshold=0.5))
    p = subset(params, cfg)
    with fast_compile():
        decoded, _, info = generate_exit.teacher_forced(cfg, {"params": p}, tokens[:, :16])
    plain = dataclasses.replace(cfg, pruning=dataclasses.replace(cfg.pruning, compaction=False))
    forward, _, decisions, _ = run(plain, params, tokens[:, :16], fast=True, exit_threshold=0.0, mod_threshold=0.5)
    np.testing.assert_array_equal(np.asarray(info["exit_layer"]), np.asarray(decisions["exit_layer"][0]))
    assert_close(decoded, forward)
