"""Adaptive depth: Mixture-of-Depths routing and early exit, in the forward pass and in decoding."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_jax import generate_exit
from ling_jax.config import ConfigError, DepthConfig, get_preset
from ling_jax.layers import depth as depth_lib
from ling_jax.layers.attention import Attention, AttentionMask
from ling_jax.layers.basics import RMSNorm, apply_rope
from ling_jax.layers.depth_exit import margin_confidence, saturation_confidence, threshold_at
from ling_jax.layers.depth_mod import compact_mask, expand_mask, topk_selection
from ling_jax.ledger import ledger_from_intermediates
from ling_jax.model import Transformer, init_params
from ling_jax.routing import token_capacity, selection_indices
from ling_jax.testing import assert_close, fast_compile
from ling_jax.token_state import TokenState

pytestmark = pytest.mark.fast_xla  # tiny programs compared with each other: see tests/conftest.py

B, T = 2, 24
BASE = get_preset("cpu-tiny").model  # 2 layers


def make_cfg(**depth):
    return dataclasses.replace(BASE, depth=DepthConfig(**depth))


_make_cfg = make_cfg


def apply_fn(cfg, collections=("intermediates", "depth")):
    """Jitted apply returning (logits, state) for a config."""
    model = Transformer(cfg)
    return jax.jit(lambda p, tokens, **kw: model.apply({"params": p}, tokens, mutable=list(collections), **kw))


@pytest.fixture(scope="module")
def params():
    """One parameter tree holding every depth parameter (MoD on all blocks, exits on all)."""
    cfg = make_cfg(mod_enabled=True, mod_layers="all", exit_enabled=True)
    p = nn.meta.unbox(jax.jit(lambda k: init_params(Transformer(cfg), k))(jax.random.key(0)))
    # Give the routers and predictors some spread so decisions are not all alike.
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * 4.0 if any(getattr(k, "key", "") in ("router", "predictor") for k in path) else x, p)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (B, T), 0, BASE.vocab_size)


@pytest.fixture(scope="module")
def dense(params, tokens):
    logits, _ = apply_fn(BASE, ("intermediates",))(params, tokens)
    return logits


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("capacity", [0.0, -0.1, 1.5])
def test_capacity_outside_unit_interval_fails(capacity):
    with pytest.raises(ConfigError, match=r"DepthConfig.mod_capacity must be in \(0.0, 1.0\]"):
        DepthConfig(mod_capacity=capacity)


def test_routing_a_block_that_does_not_exist_fails():
    with pytest.raises(ConfigError, match=r"mod_layers selects layers \[5\] that do not exist"):
        make_cfg(mod_enabled=True, mod_layers="1,5")
    with pytest.raises(ConfigError, match=r"exit_layers selects layers \[3\]"):
        make_cfg(exit_enabled=True, exit_layers="3")


@pytest.mark.parametrize("confidence,bad,good", [("margin", 1.01, 0.0), ("margin", -0.1, 1.0),
                                                 ("classifier", 1.5, 0.5), ("saturation", -1.01, -1.0),
                                                 ("saturation", 1.2, 0.9)])
def test_exit_threshold_outside_the_confidence_range_fails(confidence, bad, good):
    with pytest.raises(ConfigError, match=rf"exit_threshold must be in .* for exit_confidence='{confidence}'"):
        DepthConfig(exit_confidence=confidence, exit_threshold=bad)
    assert DepthConfig(exit_confidence=confidence, exit_threshold=good).exit_threshold == good


@pytest.mark.parametrize("field,value", [("mode", "eval"), ("mod_inference", "oracle"), ("mod_threshold", 1.5),
                                         ("mod_predictor_threshold", 1.0), ("mod_predictor_threshold", 0.0),
                                         ("mod_weight", "softmax"), ("exit_decay", -1.0), ("predictor_dim", -2)])
def test_other_bad_settings_fail(field, value):
    with pytest.raises(ConfigError, match=f"DepthConfig.{field}"):
        DepthConfig(**{field: value})


# ----------------------------------------------------------------------------- Mixture-of-Depths


@pytest.mark.xla_optimized
def test_capacity_one_equals_dense_exactly(params, tokens, dense):
    cfg = make_cfg(mod_enabled=True, mod_layers="all", mod_capacity=1.0)
    logits, _ = apply_fn(cfg)(params, tokens)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(dense))


@pytest.fixture(scope="module")
def mod_quarter():
    return make_cfg(mod_enabled=True, mod_layers="every:2:1", mod_capacity=0.25)


def test_routed_block_runs_on_capacity_tokens(params, tokens, mod_quarter):
    _, state = apply_fn(mod_quarter)(params, tokens)
    ledger = ledger_from_intermediates(mod_quarter, state["intermediates"])
    c = token_capacity(T, 0.25)
    assert ledger.counts["block_1"]["tokens_computed"] == B * c
    assert ledger.counts["block_1"]["mlp_tokens"] == B * c
    assert ledger.counts["block_1"]["attn_pairs_computed"] == B * c * c
    assert ledger.counts["block_0"]["tokens_computed"] == B * T
    routed = state["depth"]["block_1_depth"]["mod_routed"][0]
    assert np.all(np.asarray(routed).sum(1) == c)
    layers = depth_lib.layers_per_token(mod_quarter, state["intermediates"])
    assert layers == pytest.approx(BASE.num_layers - 1 + c / T)


def test_compacted_path_equals_masked_reference_forward_and_grad(params, tokens, mod_quarter, monkeypatch):
    """The plain reference runs the block on every token with queries/keys masked to the top-k."""
    c = mod_quarter.depth.mod_capacity
    fast = Transformer(mod_quarter)
    monkeypatch.setattr(depth_lib, "causal_selection",
                        lambda cfg, scores, pred, policy: topk_selection(scores, c, jnp.ones(scores.shape, bool))[0])
    # One bucket of every slot: the block sees all T tokens, the unrouted ones masked out.
    ref = Transformer(dataclasses.replace(mod_quarter, depth=dataclasses.replace(
        mod_quarter.depth, mode="infer", infer_buckets="1.0")))
    def loss(m):
        def f(p):
            logits = m.apply({"params": p}, tokens)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

        return jax.jit(jax.grad(f, has_aux=True))(params)

    (g_fast, fast_logits), (g_ref, ref_logits) = loss(fast), loss(ref)
    assert_close(fast_logits, ref_logits)
    assert_close(g_fast, g_ref, kind="grad")
    router = g_fast["block_1_depth"]["mod"]["router"]
    assert float(jnp.abs(router).max()) > 0, "the router must get a gradient through the block output"


@pytest.mark.xla_optimized
def test_unrouted_tokens_pass_on_the_residual(params, tokens):
    """One routed block: unrouted tokens' logits are those of the embedding alone."""
    cfg = dataclasses.replace(make_cfg(mod_enabled=True, mod_layers="all", mod_capacity=0.25), num_layers=1)
    one = {k: v for k, v in params.items() if k not in ("block_1", "block_2", "block_1_depth", "block_2_depth")}
    logits, state = apply_fn(cfg)(one, tokens)
    routed = np.asarray(state["depth"]["block_0_depth"]["mod_routed"][0])
    embed_only = Transformer(cfg).apply({"params": one}, jnp.asarray(tokens), method=lambda m, t: m.logits(m.embed(t)))
    np.testing.assert_array_equal(np.asarray(logits)[~routed], np.asarray(embed_only)[~routed])
    assert not np.allclose(np.asarray(logits)[routed], np.asarray(embed_only)[routed])


def test_predictor_learns_only_from_its_own_loss(params, tokens, mod_quarter):
    model = Transformer(mod_quarter)

    def aux(p):
        _, state = model.apply({"params": p}, tokens, mutable=["intermediates"])
        return state["intermediates"]["block_1_depth"]["loss_mod_predictor"][0]

    grads = jax.jit(jax.grad(aux))(params)
    trunk = {k: v for k, v in grads.items() if not k.endswith("_depth")}
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree_util.tree_leaves(trunk))
    assert float(jnp.abs(grads["block_1_depth"]["mod"]["router"]).max()) == 0
    assert float(jnp.abs(grads["block_1_depth"]["mod"]["predictor"]["w_out"]).max()) > 0
    _, state = apply_fn(mod_quarter)(params, tokens)
    assert 0.0 <= depth_lib.mod_predictor_accuracy(state["intermediates"]) <= 1.0


def test_padding_and_length_one_give_no_nans(params):
    cfg = make_cfg(mod_enabled=True, mod_layers="all", mod_capacity=0.125, exit_enabled=True)
    toks = jnp.zeros((2, 9), jnp.int32)
    valid = jnp.ones((2, 9), bool).at[1].set(False)  # an all-padding row
    run = apply_fn(cfg, ("intermediates",))
    logits, state = run(params, toks, valid=valid, targets=toks)
    chex.assert_tree_all_finite((logits, state))
    chex.assert_tree_all_finite(run(params, toks[:, :1]))


# ----------------------------------------------------------------------------- early exit


@pytest.mark.xla_optimized
@pytest.mark.parametrize("confidence", ["margin", "saturation", "classifier"])
def test_threshold_above_reachable_confidence_is_the_full_model(params, tokens, dense, confidence):
    cfg = make_cfg(mode="infer", exit_enabled=True, exit_confidence=confidence, exit_threshold=1.0)
    logits, state = apply_fn(cfg)(params, tokens)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(dense))
    assert np.all(np.asarray(state["depth"]["exit_layer"][0]) == BASE.num_layers - 1)
    assert depth_lib.layers_per_token(cfg, state["intermediates"]) == BASE.num_layers


def test_lowest_threshold_exits_everything_at_the_first_exit(params, tokens):
    cfg = make_cfg(mode="infer", exit_enabled=True, exit_threshold=0.0)
    logits, state = apply_fn(cfg)(params, tokens)
    assert np.all(np.asarray(state["depth"]["exit_layer"][0]) == 0)
    assert depth_lib.layers_per_token(cfg, state["intermediates"]) == 1.0
    # The exit logits come from layer 0's exit head: the shared head on its own norm.
    model = Transformer(cfg)
    x0 = model.apply({"params": params}, tokens, method=lambda m, t: m.blocks[0](
        m.embed(t), AttentionMask.causal_self(jnp.broadcast_to(jnp.arange(T), t.shape)), TokenState())[0])
    h = RMSNorm(BASE.norm_eps).apply({"params": params["block_0_depth"]["exit_norm"]}, x0)
    assert_close(logits, h @ params["head"])
    # Nothing is live after layer 0: block 1 runs the zero bucket (no query, and with no cache
    # to fill no key either), and the final head runs on no token.
    ledger = ledger_from_intermediates(cfg, state["intermediates"])
    assert ledger.counts["block_1"]["tokens_computed"] == 0
    assert ledger.counts["block_1"]["flops_kv_only"] == 0
    assert ledger.counts["head"]["head_tokens"] == B * T  # layer 0's exit head only


def test_exit_training_sows_losses_through_the_train_step():
    from ling_jax.train import init_state, make_train_step

    config = get_preset("cpu-tiny")
    config = dataclasses.replace(config, model=dataclasses.replace(
        config.model, num_layers=2, depth=DepthConfig(exit_enabled=True, exit_train_freeze=0.5)))
    model = Transformer(config.model)
    state = jax.jit(lambda k: init_state(config, model, k))(jax.random.key(0))
    toks = jax.random.randint(jax.random.key(2), (2, 17), 0, 256)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": jnp.ones((2, 16), jnp.float32),
             "oracle_mask": jnp.zeros((2, 16), bool)}
    _, metrics = jax.jit(make_train_step(config, model))(state, batch)
    for name in ("loss_exit", "loss_exit_classifier"):
        assert name in metrics and np.isfinite(float(metrics[name])) and float(metrics[name]) > 0
    assert float(metrics["loss"]) > float(metrics["ce"])
    # Random training exits need the step's "depth" rng; without it the forward is the full model.
    full = Transformer(dataclasses.replace(config.model, depth=DepthConfig(exit_enabled=True)))
    frozen = lambda **kw: model.apply({"params": state.params}, batch["inputs"], mutable=["depth"], **kw)
    _, with_rng = frozen(rngs={"depth": jax.random.key(0)})
    assert 0 < int((with_rng["depth"]["exit_layer"][0] == 0).sum()) < batch["inputs"].size
    np.testing.assert_array_equal(np.asarray(frozen()[0]), np.asarray(full.apply({"params": state.params}, batch["inputs"])))


def test_confidences_stay_in_range_and_threshold_decays():
    logits = jax.random.normal(jax.random.key(3), (2, 5, 7)) * 30
    m = margin_confidence(logits)
    assert float(m.min()) >= 0 and float(m.max()) <= 1
    a, b = jax.random.normal(jax.random.key(4), (2, 2, 5, 16))
    s = saturation_confidence(a, b)
    assert float(s.min()) >= -1 and float(s.max()) <= 1
    assert_close(saturation_confidence(a, a), jnp.ones((2, 5)))
    pos = jnp.arange(0, 100)[None]
    for conf, lo in (("margin", 0.0), ("saturation", -1.0)):
        thr = threshold_at(DepthConfig(exit_confidence=conf, exit_threshold=0.9, exit_decay=2.0), pos, 100)
        assert float(thr[0, 0]) == pytest.approx(0.9) and np.all(np.diff(np.asarray(thr[0])) < 0)
        assert float(thr.min()) > lo
    assert np.all(np.asarray(threshold_at(DepthConfig(exit_threshold=0.7), pos, 100)) == np.float32(0.7))


# ----------------------------------------------------------------------------- causality


@pytest.fixture(scope="module")
def causal_runs(params):
    """Exact (bit-level) causality needs one bucket of every slot: with several buckets a future
    token can change the capacity chosen and so the rounding of earlier rows (checked to a
    tolerance, with the same decisions, in tests/test_realized.py)."""
    runs = {}
    make_cfg = lambda **kw: _make_cfg(infer_buckets="1", **kw)  # noqa: E731
    for name, depth in {
        "predictor": dict(mod_inference="predictor"),
        "threshold": dict(mod_inference="threshold", mod_threshold=0.5),
    }.items():
        cfg = make_cfg(mode="infer", mod_enabled=True, mod_layers="every:2:1", exit_enabled=True,
                       exit_threshold=0.05, exit_decay=1.0, exit_confidence="margin", **depth)
        runs[name] = apply_fn(cfg)
    cfg = make_cfg(mode="infer", exit_enabled=True, exit_confidence="saturation", exit_threshold=0.5)
    runs["saturation"] = apply_fn(cfg)
    return runs


@settings(max_examples=10, deadline=None)
@given(t=st.integers(0, T - 1), rule=st.sampled_from(["predictor", "threshold", "saturation"]))
def test_causal_decisions_never_read_a_future_token(causal_runs, params, tokens, t, rule):
    run = causal_runs[rule]
    base_logits, base = run(params, tokens)
    changed = tokens.at[:, t].set((tokens[:, t] + 101) % BASE.vocab_size)
    logits, state = run(params, changed)
    flat = lambda s: {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                      for path, v in jax.tree_util.tree_flatten_with_path(s["depth"])[0]}
    before, after = flat(base), flat(state)
    assert before.keys() == after.keys() and before
    for key in before:
        np.testing.assert_array_equal(after[key][:, :t], before[key][:, :t], err_msg=key)
    np.testing.assert_array_equal(np.asarray(logits[:, :t]), np.asarray(base_logits[:, :t]))


# ----------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def decode_cfg():
    return make_cfg(mode="infer", mod_enabled=True, mod_layers="every:2:1", mod_inference="predictor",
                    exit_enabled=True, exit_confidence="margin", exit_threshold=0.03)


def _attention_inputs(cfg, params, tokens, forced_exit):
    """The forward pass's keys/values per layer, from the inputs each Attention call received.

    One bucket of every slot (no ``nn.switch``, whose branches the interceptor cannot leak from):
    the same decisions and numbers as the bucketed forward, with frozen queries masked."""
    cfg = dataclasses.replace(cfg, depth=dataclasses.replace(cfg.depth, infer_buckets="1"))
    seen = []

    def grab(next_fun, args, kwargs, context):
        if isinstance(context.module, Attention) and context.method_name == "__call__":
            seen.append(args[:2])  # (normed hidden state, mask)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        logits, state = Transformer(cfg).apply({"params": params}, tokens, forced_exit=forced_exit,
                                               mutable=["intermediates", "depth"])
    kv = []
    for layer, (h, mask) in enumerate(seen):
        p = params[f"block_{layer}"]["attn"]
        k = apply_rope(jnp.einsum("bte,ehd->bthd", h, p["wk"]), mask.kv_positions, cfg.rope_base)
        v = jnp.einsum("bte,ehd->bthd", h, p["wv"])
        # A routed layer sees its tokens compacted: put every valid key back at its position.
        rows = jnp.arange(h.shape[0])[:, None]
        at = jnp.where(mask.kv_valid, mask.kv_positions, h.shape[1])  # [B, C]; invalid: dropped
        back = lambda a: jnp.zeros((h.shape[0], T) + a.shape[2:], a.dtype).at[rows, at].set(a, mode="drop")  # noqa: E731
        kv.append((back(k), back(v), back(mask.kv_valid)))
    return logits, state, kv


def test_decoding_equals_teacher_forced_forward_with_same_decisions(params, tokens, decode_cfg):
    decoded, cache, info = generate_exit.teacher_forced(decode_cfg, {"params": params}, tokens)
    exit_layer = info["exit_layer"]
    n_exit = int((exit_layer < decode_cfg.num_layers - 1).sum())
    assert 0 < n_exit < B * T, "want a mix of exited and full-depth tokens"

    forward, state, kv = _attention_inputs(decode_cfg, params, tokens, forced_exit=exit_layer)
    assert_close(decoded, forward)
    np.testing.assert_array_equal(np.asarray(state["depth"]["layers_used"][0]), np.asarray(info["layers_used"]))
    # Left to itself the forward pass makes the same decisions.
    _, free = apply_fn(decode_cfg)(params, tokens)
    np.testing.assert_array_equal(np.asarray(free["depth"]["exit_layer"][0]), np.asarray(exit_layer))
    for layer, (k, v, kv_valid) in enumerate(kv):
        c = cache[f"block_{layer}"]["attn"]
        pos = np.asarray(c["pos"])  # [B, S]: the position each slot holds, -1 if empty
        for row in range(B):
            held = np.sort(pos[row][pos[row] >= 0])
            np.testing.assert_array_equal(held, np.flatnonzero(np.asarray(kv_valid[row])), err_msg=f"layer {layer}")
        slot = pos >= 0
        at = lambda a: np.take_along_axis(np.asarray(a), np.maximum(pos, 0)[..., None, None], axis=1)[slot]
        assert_close(np.asarray(c["k"])[slot], at(k))  # carried-up keys of exited tokens included
        assert_close(np.asarray(c["v"])[slot], at(v))
    assert not np.all(np.asarray(kv[1][2])), "the routed layer should skip some tokens' keys"


def test_generate_matches_teacher_forced_greedy(params, tokens, decode_cfg):
    prompt, steps = tokens[:, :6], 8
    out = generate_exit.generate(decode_cfg, {"params": params}, prompt, steps)
    full = jnp.concatenate([prompt, out["tokens"][:, :-1]], axis=1)  # [B, 6 + 7]
    logits, state = apply_fn(decode_cfg)(params, full)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 5:], -1)), np.asarray(out["tokens"]))
    np.testing.assert_array_equal(np.asarray(state["depth"]["exit_layer"][0][:, 5:]), np.asarray(out["exit_layer"]))
    np.testing.assert_array_equal(np.asarray(state["depth"]["layers_used"][0][:, 5:]), np.asarray(out["layers_used"]))


def test_decoding_rejects_non_causal_routing():
    with pytest.raises(ConfigError, match="causal Mixture-of-Depths decision"):
        generate_exit.decoding_model(make_cfg(mod_enabled=True, mod_inference="topk"))


# ----------------------------------------------------------------------------- compaction helpers


def test_compaction_round_trip_keeps_unselected_entries():
    selected = jnp.array([[True, False, True, False, False], [False, False, False, False, True]])
    idx, valid = selection_indices(selected, 2)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    mask = AttentionMask.causal_self(pos)
    small = compact_mask(mask, idx, valid)
    np.testing.assert_array_equal(np.asarray(small.q_valid), [[True, True], [True, False]])
    np.testing.assert_array_equal(np.asarray(small.q_positions[0]), [0, 2])
    back = expand_mask(small.replace(kv_keep=jnp.zeros((2, 2), bool)), idx, valid, mask)
    np.testing.assert_array_equal(np.asarray(back.kv_keep), ~np.asarray(selected))
    # A per-token field the block created: the other tokens get its fill value (priority 0).
    state = TokenState().scatter(TokenState(prune_priority=jnp.full((2, 2), 3.0)), idx, valid, 5)
    np.testing.assert_array_equal(np.asarray(state.prune_priority), np.where(np.asarray(selected), 3.0, 0.0))
    with pytest.raises(ValueError, match="self-attention mask"):
        compact_mask(mask.replace(kv_positions=jnp.zeros((2, 3), jnp.int32), kv_valid=jnp.ones((2, 3), bool)), idx, valid)


def test_combines_with_pruning_through_the_shared_compaction(params, tokens):
    """A pruner inside a routed block runs on the compacted tokens; capacity 1.0 changes nothing."""
    from ling_jax.config import PruningConfig

    pruned = dataclasses.replace(BASE, num_layers=1, pruning=PruningConfig(enabled=True, layers="all"))
    with_mod = dataclasses.replace(pruned, depth=DepthConfig(mod_enabled=True, mod_layers="all", mod_capacity=1.0))
    p = nn.meta.unbox(jax.jit(lambda k: init_params(Transformer(with_mod), k))(jax.random.key(5)))
    ref, _ = apply_fn(pruned, ("intermediates",))(p, tokens)
    out, _ = apply_fn(with_mod, ("intermediates",))(p, tokens)
    assert_close(out, ref)


def _per_token_fields() -> list[str]:
    """Every AttentionMask field that is an array (pytree node), i.e. travels with its token."""
    return [f.name for f in dataclasses.fields(AttentionMask) if f.metadata.get("pytree_node", True)]


def _random_like_field(name: str, rng: np.random.Generator, shape) -> np.ndarray:
    ann = str({f.name: f.type for f in dataclasses.fields(AttentionMask)}[name])
    if "Bool[" in ann:
        return rng.random(shape) < 0.5
    if "Int[" in ann:
        return rng.integers(0, 100, shape).astype(np.int32)
    if "Float[" in ann:
        return rng.normal(size=shape).astype(np.float32)
    raise AssertionError(f"AttentionMask.{name}: unknown annotation {ann!r}; teach this test its dtype")


def test_every_per_token_mask_field_survives_compaction():
    """A new per-token AttentionMask field cannot be forgotten by MoD compaction: compact_mask
    gathers every one, expand_mask scatters back every one a block may change (all but the
    positions and validity, which stay those of the full sequence)."""
    rng = np.random.default_rng(0)
    selected = jnp.array([[True, False, True, False, False, True], [False, True, False, False, True, False]])
    idx, valid = selection_indices(selected, 3)  # row 1 has an empty slot
    names = _per_token_fields()
    assert {"q_positions", "kv_valid", "kv_keep", "kv_log_keep", "kv_expire"} <= set(names)
    full = {n: _random_like_field(n, rng, selected.shape) for n in names}
    mask = AttentionMask(**{n: jnp.asarray(v) for n, v in full.items()}, causal=False, window=3, num_sinks=2)
    small = compact_mask(mask, idx, valid)
    v = np.asarray(valid)
    assert (small.causal, small.window, small.num_sinks) == (False, 3, 2)
    for n in names:
        got = getattr(small, n)
        assert got is not None and got.shape == idx.shape, f"compact_mask dropped AttentionMask.{n}"
        want = np.take_along_axis(full[n], np.asarray(idx), axis=1)
        if n in ("q_valid", "kv_valid"):
            np.testing.assert_array_equal(np.asarray(got), want & v, err_msg=n)
        else:
            np.testing.assert_array_equal(np.asarray(got)[v], want[v], err_msg=n)
    fixed = {"q_positions", "kv_positions", "q_valid", "kv_valid"}
    new = {n: _random_like_field(n, rng, idx.shape) for n in names if n not in fixed}
    back = expand_mask(small.replace(**{n: jnp.asarray(x) for n, x in new.items()}), idx, valid, mask)
    sel = np.asarray(selected)
    for n in names:
        got = np.asarray(getattr(back, n))
        if n in fixed:
            np.testing.assert_array_equal(got, full[n], err_msg=n)
            continue
        want = full[n].copy()
        rows, cols = np.nonzero(v)
        want[rows, np.asarray(idx)[rows, cols]] = new[n][rows, cols]
        np.testing.assert_array_equal(got, want, err_msg=f"expand_mask did not scatter back AttentionMask.{n}")
        np.testing.assert_array_equal(got[~sel], full[n][~sel], err_msg=n)


def test_mod_with_budget_pruning_carries_the_expiry_into_the_routed_block(params, tokens):
    """Budget pruning at layer 0 sets kv_expire; the routed layer 1 compacts the mask with it.
    Capacity 1.0 must equal the pruned model exactly (the expiry reached the block); capacity 0.5
    gives finite logits."""
    from ling_jax.config import PruningConfig

    budget = PruningConfig(enabled=True, layers="0", mode="hard", inference_rule="budget", budget=8, window=2)
    pruned = dataclasses.replace(BASE, pruning=budget)
    with_mod = lambda **kw: dataclasses.replace(pruned, depth=DepthConfig(mod_enabled=True, mod_layers="1", **kw))
    # The module's parameters (they hold MoD routers) plus a pruner for layer 0 (shapes only: no init compile).
    shapes = jax.eval_shape(lambda k: nn.meta.unbox(init_params(Transformer(with_mod()), k)), jax.random.key(5))
    pruner = jax.tree_util.tree_map(lambda s: jax.random.normal(jax.random.key(6), s.shape, s.dtype),
                                    shapes["block_0"]["pruner"])
    p = {**params, "block_0": {**params["block_0"], "pruner": pruner}}
    ref, state = apply_fn(pruned, ("intermediates",))(p, tokens)
    visible = ledger_from_intermediates(pruned, state["intermediates"]).counts["block_1"]["attn_pairs_visible"]
    assert visible < B * T * (T + 1) / 2, "the budget should hide some keys from layer 1"
    out, _ = apply_fn(with_mod(mod_capacity=1.0), ("intermediates",))(p, tokens)
    assert_close(out, ref)
    out, _ = apply_fn(with_mod(mod_capacity=0.5), ("intermediates",))(p, tokens)
    assert out.shape == (B, T, BASE.vocab_size) and bool(jnp.all(jnp.isfinite(out)))
