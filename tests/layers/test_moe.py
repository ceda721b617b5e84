"""Tests of the MoE layer: routers, losses, bias update, capacity policy, every dispatch impl
against the per-expert loop reference (forward and gradients), zero-compute and shared experts,
the ledger, bad settings, and one whole-model train step."""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_jax.config import ConfigError, ModelConfig, MoEConfig, apply_overrides, get_preset
from ling_jax.layers import moe_routers as routers
from ling_jax.layers.basics import MLP
from ling_jax.layers.moe import MoE, update_router_bias
from ling_jax.layers.moe_dispatch import capacity_keep, dispatch, expert_capacity, resolve_impl
from ling_jax.layers.moe_sorted import grouped_swiglu, pick_tiles
from ling_jax.ledger import ledger_from_intermediates
from ling_jax.testing import assert_close

pytestmark = pytest.mark.fast_xla  # tiny programs compared with each other: see tests/conftest.py

N, E, F, X, K = 24, 16, 8, 4, 2  # tokens, model dim, expert dim, experts, top-k


# ----------------------------------------------------------------------------- dispatch vs reference


def _expert_weights(dtype):
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (N, E))
    wg, wu = (jax.random.normal(kk, (X, E, F)) * E**-0.5 for kk in k[1:3])
    wd = jax.random.normal(k[3], (X, F, E)) * F**-0.5
    return tuple(a.astype(dtype) for a in (x, wg, wu, wd))


@functools.cache
def _dispatch_grad(impl: str, **options):
    """jit(value_and_grad) of a dispatch; shapes are fixed so hypothesis examples never recompile."""

    def loss(x, w, wg, wu, wd, ids, active):
        y = dispatch(x, ids, w, active, wg, wu, wd, impl=impl, **options)  # [N, E] float32
        return jnp.sum(y * jnp.cos(jnp.arange(E, dtype=jnp.float32))), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


@st.composite
def routings(draw):
    """ids [N, K] (distinct per token), weights, active: random, all tokens to one expert,
    experts with no tokens, and nothing active."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    mode = draw(st.sampled_from(["random", "one_expert", "empty_experts", "nothing"]))
    ids = np.stack([rng.permutation(X)[:K] for _ in range(N)])
    active = rng.random((N, K)) > draw(st.sampled_from([0.0, 0.3]))
    if mode == "one_expert":  # every token's only active choice is expert 2
        ids[:, 0], ids[:, 1] = 2, (2 + 1 + rng.integers(0, X - 1, N)) % X
        active[:, 0], active[:, 1] = True, False
    elif mode == "empty_experts":  # experts 2 and 3 receive nothing
        ids = np.stack([rng.permutation(2) for _ in range(N)])
    elif mode == "nothing":
        active[:] = False
    weights = rng.random((N, K)).astype(np.float32)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(weights), jnp.asarray(active)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("impl", ["dense", "sorted", "pallas"])
@settings(max_examples=6, deadline=None)
@given(routing=routings())
def test_dispatch_matches_reference(impl, dtype, routing):
    ids, weights, active = routing
    x, wg, wu, wd = _expert_weights(dtype)
    (_, y), grads = _dispatch_grad(impl)(x, weights, wg, wu, wd, ids, active)
    (_, y_ref), grads_ref = _dispatch_grad("reference")(x, weights, wg, wu, wd, ids, active)
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    assert_close(y, y_ref, dtype=dtype)
    assert_close(grads, grads_ref, dtype=dtype, kind="grad")
    if not bool(active.any()):
        assert float(jnp.abs(y).max()) == 0.0


@pytest.mark.parametrize("contiguous", [True, False], ids=["pregathered", "gather_per_tile"])
def test_sorted_kernel_tile_ladder_and_layouts(contiguous):
    """A ladder of tiles smaller than a group, both row layouts: same values and gradients."""
    x, wg, wu, wd = _expert_weights(jnp.float32)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(np.stack([rng.permutation(X)[:K] for _ in range(N)]), jnp.int32)
    w = jnp.asarray(rng.random((N, K)), jnp.float32)
    active = jnp.asarray(rng.random((N, K)) > 0.2)

    def loss(impl, **kw):
        f = lambda *a: jnp.sum(jnp.sin(dispatch(a[0], ids, a[1], active, *a[2:], impl=impl, **kw)))  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))(x, w, wg, wu, wd)

    assert_close(loss("sorted", tiles=(8, 4, 2), contiguous=contiguous), loss("reference"), kind="grad")


def test_grouped_swiglu_ignores_rows_outside_groups():
    x, wg, wu, wd = _expert_weights(jnp.float32)
    tokens = jnp.arange(6, dtype=jnp.int32)
    w = jnp.ones((6,))
    starts, sizes = jnp.array([0, 2, 2, 3]), jnp.array([2, 0, 1, 0])  # rows 3..5 belong to no expert
    out = grouped_swiglu(x, tokens, w, starts, sizes, wg, wu, wd, tiles=8)
    swiglu = lambda a, g: (jax.nn.silu(a @ wg[g]) * (a @ wu[g])) @ wd[g]  # noqa: E731
    expected = jnp.zeros_like(x).at[0].set(swiglu(x[0], 0)).at[1].set(swiglu(x[1], 0)).at[2].set(swiglu(x[2], 2))
    assert_close(out, expected)


def test_tile_sizes():
    assert pick_tiles(8192, 64) == (256, 224, 192, 160, 128, 96, 64, 32)  # 128 rows per expert
    assert pick_tiles(8192, 32) == (512, 448, 384, 320, 256, 192, 128, 64)  # 256 rows per expert
    assert pick_tiles(1024, 16) == (128, 96, 64, 32)  # 64 rows per expert: 4 sizes
    assert pick_tiles(48, 4) == (32,)
    assert pick_tiles(4, 8) == (8,)
    with pytest.raises(ValueError, match="decreasing"):
        x, wg, wu, wd = _expert_weights(jnp.float32)
        grouped_swiglu(x, jnp.arange(4), jnp.ones(4), jnp.zeros(X, int), jnp.ones(X, int), wg, wu, wd, tiles=(4, 8))


@pytest.mark.parametrize("size", [0, 1, 31, 32, 33, 100, 256, 257, 600])
def test_walk_covers_an_expert_with_full_tiles_and_one_fitting_tile(size):
    """Every row exactly once, in order; full top tiles, then the smallest size holding the rest."""
    from ling_jax.layers.moe_sorted import _walk

    tiles = (256, 224, 192, 160, 128, 96, 64, 32)

    def step(c, r0, n_own, tile):
        i, starts, lens, owned = c
        return i + 1, starts.at[i].set(r0), lens.at[i].set(tile), owned.at[i].set(jnp.minimum(n_own, tile))

    zeros = jnp.zeros(8, jnp.int32)
    n, starts, lens, owned = jax.jit(lambda s: _walk((0, zeros, zeros, zeros), 5, s, tiles, step))(size)
    n, starts, lens, owned = int(n), np.asarray(starts)[:int(n)], np.asarray(lens)[:int(n)], np.asarray(owned)[:int(n)]
    full, rest = divmod(size, 256)
    want = [256] * full + ([min(t for t in tiles if t >= rest)] if rest else [])
    assert list(lens) == want and owned.sum() == size
    assert list(starts) == [5 + sum(want[:i]) for i in range(len(want))]  # contiguous, in order


def test_auto_is_sorted_on_cpu_and_bad_impl_fails():
    assert resolve_impl("auto") == "sorted"
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("ragged")


# ----------------------------------------------------------------------------- capacity


def test_expert_capacity_formula():
    assert expert_capacity(100, 2, 8, 1.25) == math.ceil(1.25 * 100 * 2 / 8) == 32
    assert expert_capacity(100, 2, 8, 0.0) == 100  # dropless: a token picks an expert at most once
    assert expert_capacity(100, 2, 8, 50.0) == 100
    assert expert_capacity(10, 1, 64, 0.01) == 1
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(10, 1, 2, -1.0)


def test_capacity_drops_second_choices_then_later_tokens():
    ids = jnp.array([[0, 1], [0, 1], [1, 0], [0, 1]])
    active = jnp.ones((4, 2), bool)
    # Expert 0 in priority order: t0 (1st), t1 (1st), t3 (1st), t2 (2nd) -> t2's 2nd choice drops.
    # Expert 1: t2 (1st), t0 (2nd), t1 (2nd), t3 (2nd) -> t3's 2nd choice drops.
    keep = capacity_keep(ids, active, 2, 3)
    np.testing.assert_array_equal(keep, [[1, 1], [1, 1], [1, 0], [1, 0]])
    # Inactive assignments (padding, zero experts) use no capacity.
    active = active.at[1].set(False)
    np.testing.assert_array_equal(capacity_keep(ids, active, 2, 3), [[1, 1], [0, 0], [1, 1], [1, 1]])


def _moe_cfg(**moe) -> ModelConfig:
    base = dict(enabled=True, num_experts=X, top_k=K, expert_dim=F, dispatch="reference")
    return ModelConfig(d_model=E, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=2 * F,
                       moe=MoEConfig(**{**base, **moe}))


@functools.cache
def _apply_fn(cfg: ModelConfig):
    layer = MoE(cfg)
    return jax.jit(lambda v, x, valid, rngs: layer.apply(v, x, valid, mutable=["intermediates"], rngs=rngs))


@functools.cache
def _init_fn(cfg: ModelConfig):
    layer = MoE(cfg)
    return jax.jit(lambda key, x, valid: nn.meta.unbox(layer.init(key, x, valid)))


def _canonical(cfg: ModelConfig) -> ModelConfig:
    """A config with the same variables (shapes) as `cfg`, so tests share one init compile."""
    m = cfg.moe
    moe = MoEConfig(enabled=True, num_experts=m.num_experts, num_zero_experts=m.num_zero_experts, top_k=1,
                    expert_dim=m.expert_dim, num_shared_experts=m.num_shared_experts, dispatch="reference",
                    bias_update_rate=0.1 if m.bias_update_rate > 0 else 0.0)
    return dataclasses.replace(cfg, moe=moe)


def _run(cfg, x, valid=None, variables=None, seed=0, rngs=None):
    """Jitted init (unboxed) and apply; returns (y, {stat: value}, variables)."""
    if variables is None:
        variables = _init_fn(_canonical(cfg))(jax.random.key(seed), x, valid)
    y, state = _apply_fn(cfg)(variables, x, valid, rngs or {})
    return y, {k: v[0] for k, v in state["intermediates"].items()}, variables


def _x(b=2, t=12, seed=3):
    return jax.random.normal(jax.random.key(seed), (b, t, E))


def test_dropped_assignments_pass_through_as_zero():
    x = _x()
    cfg = _moe_cfg(top_k=1, capacity_factor=0.01)  # capacity 1 per expert
    y, stats, variables = _run(cfg, x)
    nonzero = np.asarray(jnp.any(y.reshape(-1, E) != 0, axis=-1))
    assert nonzero.sum() == stats["expert_evals"] <= X  # only the first token of each expert
    assert float(stats["moe_dropped_fraction"]) == pytest.approx(1 - nonzero.sum() / x.shape[0] / x.shape[1])
    # The kept token of each expert is the earliest one routed there.
    logits = x.reshape(-1, E) @ variables["params"]["router"]
    first = {int(g): i for i, g in reversed(list(enumerate(np.asarray(jnp.argmax(logits, -1)))))}
    assert set(np.flatnonzero(nonzero)) == set(first.values())
    # A capacity that covers every token keeps every active assignment: the dropless result.
    ids = jnp.asarray(np.stack([np.random.default_rng(0).permutation(X)[:K] for _ in range(N)]))
    active = jnp.asarray(np.random.default_rng(1).random((N, K)) > 0.2)
    full = expert_capacity(N, K, X, X / K)
    np.testing.assert_array_equal(capacity_keep(ids, active, X, full), active)
    assert not np.array_equal(capacity_keep(ids, active, X, expert_capacity(N, K, X, 0.5)), active)


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_top_k_from_one_to_all_experts(top_k):
    x = _x()
    y, stats, variables = _run(_moe_cfg(top_k=top_k, dispatch="reference"), x)
    assert float(stats["expert_evals"]) == x.shape[0] * x.shape[1] * top_k
    if top_k == X:  # every expert, softmax weights: a dense soft mixture
        p = variables["params"]
        xf = x.reshape(-1, E)
        probs = jax.nn.softmax(xf @ p["router"], axis=-1)
        expect = sum(probs[:, g:g + 1] * (jax.nn.silu(xf @ p["w_gate"][g]) * (xf @ p["w_up"][g])) @ p["w_down"][g]
                     for g in range(X))
        assert_close(y.reshape(-1, E), expect)


def test_padding_tokens_are_not_routed():
    x = _x()
    valid = jnp.arange(12)[None, :] < jnp.array([[12], [7]])  # second row: 5 padding tokens
    cfg = _moe_cfg(top_k=1, capacity_factor=1.0)
    y, stats, variables = _run(cfg, x, valid)
    assert float(jnp.abs(y[1, 7:]).max()) == 0.0
    assert float(stats["expert_evals"]) <= 19 and float(jnp.sum(stats["moe_load"])) == 19
    # What padding tokens contain changes nothing for valid tokens (they use no capacity).
    y2, _, _ = _run(cfg, x.at[1, 7:].set(100.0), valid, variables=variables)
    assert_close(y2[valid], y[valid])


# ----------------------------------------------------------------------------- shared and zero experts


def test_shared_experts_add_an_always_on_swiglu():
    x = _x()
    cfg = _moe_cfg(num_shared_experts=2)
    y, stats, variables = _run(cfg, x)
    routed_vars = {"params": {k: v for k, v in variables["params"].items() if k != "shared"}}
    y_routed, _, _ = _run(_moe_cfg(), x, variables=routed_vars)
    shared = MLP(cfg, hidden_dim=2 * F).apply({"params": variables["params"]["shared"]}, x)
    assert_close(y, y_routed + shared)
    assert float(stats["shared_evals"]) == 2 * x.shape[0] * x.shape[1]


@pytest.mark.parametrize("mode", ["identity", "zero"])
def test_zero_experts_do_no_work_and_cost_no_flops(mode):
    x = _x()
    cfg = _moe_cfg(num_experts=2, num_zero_experts=2, top_k=2, router="sigmoid", bias_update_rate=0.1,
                   zero_expert_output=mode, route_scale=1.0, dispatch="sorted")  # (the reference runs every expert)
    _, stats, variables = _run(cfg, x)
    assert float(stats["expert_evals"]) > 0  # unbiased: real experts get work
    forced = {**variables, "moe_bias": {"bias": jnp.array([-10.0, -10.0, 10.0, 10.0])}}  # all to zero experts
    y, stats, _ = _run(cfg, x, variables=forced)
    assert float(stats["expert_evals"]) == 0 and float(stats["moe_zero_share"]) == 1.0
    assert_close(y, x if mode == "identity" else jnp.zeros_like(x))  # normalised weights sum to one
    flops = ledger_from_intermediates(cfg, {"block_0": {"moe": {k: (v,) for k, v in stats.items()}}})
    assert flops.per_layer["block_0"]["expert_computed"] == 0.0 and flops.per_layer["block_0"]["router_tokens"] > 0
    assert flops.per_layer["block_0"]["expert_ideal"] == 0.0


# ----------------------------------------------------------------------------- routers and losses


def test_sigmoid_bias_changes_selection_not_weights():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    plain = routers.route(logits, kind="sigmoid", top_k=2, route_scale=2.5)
    biased = routers.route(logits, kind="sigmoid", top_k=2, bias=jnp.array([0.0, 0.0, 1.0, 0.0]), route_scale=2.5)
    np.testing.assert_array_equal(plain.ids, [[0, 1]])
    np.testing.assert_array_equal(biased.ids, [[2, 0]])
    s = jax.nn.sigmoid(logits[0])
    assert_close(biased.weights[0], 2.5 * jnp.array([s[2], s[0]]) / (s[2] + s[0]))
    assert_close(jnp.sum(plain.weights), 2.5)


def test_softmax_router_renormalises():
    logits = jnp.array([[1.0, 0.5, -1.0]])
    r = routers.route(logits, kind="softmax", top_k=2)
    p = jax.nn.softmax(logits[0])
    assert_close(r.weights[0], jnp.array([p[0], p[1]]) / (p[0] + p[1]))
    raw = routers.route(logits, kind="softmax", top_k=2, normalize_weights=False)
    assert_close(raw.weights[0], jnp.array([p[0], p[1]]))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_indices_equals_lax_top_k_with_ties(k):
    scores = jnp.concatenate([jnp.round(jax.random.uniform(jax.random.key(k), (16, 6)) * 3) / 3,
                              jnp.array([[1.0, 1.0, 0.0, 1.0, -jnp.inf, 0.0]])])  # ties and -inf
    np.testing.assert_array_equal(routers.top_k_indices(scores, k), jax.lax.top_k(scores, k)[1])


def test_group_limited_routing_picks_inside_the_best_groups():
    scores = jnp.array([[0.9, 0.8, 0.95, 0.1]])  # group sums (top-2): 1.7 vs 1.05
    logits = jnp.log(scores / (1 - scores))  # sigmoid^-1
    r = routers.route(logits, kind="sigmoid", top_k=1, num_groups=2, top_groups=1)
    np.testing.assert_array_equal(r.ids, [[0]])  # not expert 2, the best single score
    r = routers.route(logits, kind="sigmoid", top_k=1, num_groups=2, top_groups=2)
    np.testing.assert_array_equal(r.ids, [[2]])


def test_load_balance_and_z_loss_match_hand_computation():
    probs = jnp.array([[0.7, 0.3], [0.4, 0.6]])
    ids = jnp.array([[0], [0]])
    assert float(routers.load_balance_loss(probs, ids)) == pytest.approx(2 * (1.0 * 0.55))
    ids = jnp.array([[0], [1]])
    assert float(routers.load_balance_loss(probs, ids)) == pytest.approx(2 * (0.5 * 0.55 + 0.5 * 0.45))
    assert float(routers.load_balance_loss(probs, ids, jnp.array([True, False]))) == pytest.approx(2 * 0.7)
    logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert float(routers.z_loss(logits)) == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2, rel=1e-5)
    # The layer sows them already weighted.
    x = _x()
    cfg = _moe_cfg(load_balance_weight=0.5, z_loss_weight=0.25)
    _, stats, variables = _run(cfg, x)
    lg = x.reshape(-1, E) @ variables["params"]["router"]
    lse = jax.nn.logsumexp(lg, axis=-1)
    assert float(stats["loss_moe_z"]) == pytest.approx(0.25 * float(jnp.mean(lse**2)), rel=1e-5)
    p = jax.nn.softmax(lg, -1)
    _, top = jax.lax.top_k(p, K)
    f = jnp.mean(jnp.sum(jax.nn.one_hot(top, X), axis=1), axis=0) / K
    assert float(stats["loss_moe_load_balance"]) == pytest.approx(0.5 * X * float(jnp.sum(f * p.mean(0))), rel=1e-5)


def test_bias_update_moves_load_toward_balance():
    logits = jnp.array([2.0, 0.0, 0.0, 0.0]) + jax.random.normal(jax.random.key(0), (256, 4))  # expert 0 favoured

    def step(bias, _):
        r = routers.route(logits, kind="sigmoid", top_k=1, bias=bias)
        load = routers.choice_load(r.ids, None, 4)
        return routers.bias_step(bias, load, 0.01), routers.max_mean_load(load)

    _, ratios = jax.lax.scan(step, jnp.zeros(4), None, length=100)
    assert float(ratios[0]) > 3.0 and float(ratios[-10:].max()) <= 1.3
    # Through the train hook: overloaded choices go down, underloaded ones up, per layer path.
    extra = {"moe_bias": {"block_1": {"moe": {"bias": jnp.zeros(4)}}}, "other": 1}
    inter = {"block_1": {"moe": {"moe_load": (jnp.array([10.0, 2.0, 2.0, 2.0]),)}}}
    new = update_router_bias(MoEConfig(bias_update_rate=0.1), extra, inter)
    assert_close(new["moe_bias"]["block_1"]["moe"]["bias"], jnp.array([-0.1, 0.1, 0.1, 0.1]))
    assert new["other"] == 1


def test_jitter_needs_an_rng():
    x = _x()
    cfg = _moe_cfg(jitter=0.5)
    y0, _, variables = _run(cfg, x)
    y_plain, _, _ = _run(_moe_cfg(), x, variables=variables)
    assert_close(y0, y_plain)  # no "jitter" rng: deterministic
    y1, _, _ = _run(cfg, x, variables=variables, rngs={"jitter": jax.random.key(1)})
    assert not np.allclose(np.asarray(y1), np.asarray(y0))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_experts=8, top_k=9), "top_k"),
    (dict(num_experts=6, num_groups=4), "num_groups"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(num_groups=2, top_groups=3), "top_groups"),
    (dict(num_experts=8, num_groups=4, top_groups=1, top_k=3), "top_k"),
    (dict(dispatch="ragged"), "dispatch"),
    (dict(router="relu"), "router"),
    (dict(zero_expert_output="half"), "zero_expert_output"),
    (dict(jitter=1.5), "jitter"),
])
def test_bad_settings_fail_clearly(kwargs, field):
    with pytest.raises(ConfigError, match=f"MoEConfig.{field}"):
        MoEConfig(**kwargs)


# ----------------------------------------------------------------------------- whole model


def test_transformer_train_step_updates_the_bias():
    from ling_jax.model import Transformer
    from ling_jax.train import init_state, make_train_step

    cfg = apply_overrides(get_preset("cpu-tiny"), {
        "model.moe.enabled": "true", "model.moe.router": "sigmoid", "model.moe.bias_update_rate": "0.01",
        "model.moe.num_shared_experts": "1", "model.moe.num_zero_experts": "1", "model.moe.jitter": "0.1",
        "model.moe.expert_dim": "64", "model.moe.layers": "1", "train.batch_size": "2", "train.seq_len": "16"})
    model = Transformer(cfg.model)
    state = jax.jit(lambda k: init_state(cfg, model, k))(jax.random.key(0))  # one compile, not eager MoE dispatch
    assert set(state.extra) == {"moe_bias"}
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 256)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": jnp.ones((2, 16), jnp.float32)}
    new, metrics = jax.jit(make_train_step(cfg, model))(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss_moe_load_balance"]) > 0
    before = state.extra["moe_bias"]["block_1"]["moe"]["bias"]
    after = new.extra["moe_bias"]["block_1"]["moe"]["bias"]
    assert float(jnp.abs(after - before).max()) == pytest.approx(0.01)
