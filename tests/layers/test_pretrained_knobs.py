"""Tests of the pretrained-architecture knobs (all off by default): q/k/v biases, QK RMSNorm
(per head and over the full projection), RoPE scaling (linear, llama3, yarn), the shared-expert
sigmoid gate, a routing correction bias at bias_update_rate 0, and numpy parameters given to an
unjitted apply with dispatch="sorted". Each is checked reference (impl="reference" / per-expert
loop) against the fast path, forward and gradients, plus an independent formula where one exists."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.config import ConfigError, ModelConfig, MoEConfig, RopeScalingConfig
from ling_jax.layers.basics import apply_rope, rope_frequencies
from ling_jax.layers.moe import BIAS_COLLECTION, MoE
from ling_jax.model import Transformer
from ling_jax.testing import assert_close

pytestmark = pytest.mark.fast_xla  # tiny programs compared with each other: see tests/conftest.py

BASE = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48, max_seq_len=32)
TOKENS = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)


def _perturb(params, seed=1):
    """Every parameter moved off its init (biases and norm scales start at 0 / 1)."""
    leaves, tree = jax.tree_util.tree_flatten(nn.meta.unbox(params))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _reference_vs_fast(cfg: ModelConfig):
    """Forward and gradient of the model with attention impl reference vs xla."""
    model_ref = Transformer(dataclasses.replace(cfg, attention_impl="reference"))
    model_fast = Transformer(dataclasses.replace(cfg, attention_impl="xla"))
    params = _perturb(model_ref.init(jax.random.key(0), TOKENS)["params"])

    def loss(model):
        return lambda p: jnp.mean(model.apply({"params": p}, TOKENS) ** 2)

    out_ref, out_fast = model_ref.apply({"params": params}, TOKENS), model_fast.apply({"params": params}, TOKENS)
    assert_close(out_fast, out_ref)
    assert_close(jax.grad(loss(model_fast))(params), jax.grad(loss(model_ref))(params), kind="grad")
    return params, out_ref


def test_defaults_add_no_parameters():
    params = jax.eval_shape(Transformer(BASE).init, jax.random.key(0), TOKENS)["params"]  # names only: nothing run
    assert set(params["block_0"]["attn"]) == {"wq", "wk", "wv", "wo"}


@pytest.mark.parametrize("qk_norm", ["none", "head", "full"])
def test_qkv_bias_and_qk_norm_reference_vs_fast(qk_norm):
    cfg = dataclasses.replace(BASE, qkv_bias=True, qk_norm=qk_norm)
    params, out = _reference_vs_fast(cfg)
    attn = params["block_0"]["attn"]
    assert attn["bq"].shape == (4, 8) and attn["bk"].shape == (2, 8) and attn["bv"].shape == (2, 8)
    if qk_norm != "none":
        want = {"head": (8,), "full": (4, 8)}[qk_norm]
        assert attn["q_norm"]["scale"].shape == want
        assert attn["k_norm"]["scale"].shape == {"head": (8,), "full": (2, 8)}[qk_norm]
    # the knobs change the function: the same weights without biases give other logits
    plain = {**params, **{f"block_{i}": {**params[f"block_{i}"], "attn": {k: params[f"block_{i}"]["attn"][k]
             for k in ("wq", "wk", "wv", "wo")}} for i in range(2)}}
    other = Transformer(BASE).apply({"params": plain}, TOKENS)
    assert float(jnp.max(jnp.abs(other - out))) > 1e-3


def test_qk_norm_matches_numpy_formula():
    """head: normalise each head's D values; full: normalise all H*D values of a token together."""
    from ling_jax.layers.attention import QKNorm

    x_dev = jax.random.normal(jax.random.key(3), (2, 5, 4, 8)) * 3.0  # layers take jax.Array
    x = np.asarray(x_dev)
    scale_h, scale_f = np.linspace(0.5, 1.5, 8), np.linspace(0.5, 1.5, 32).reshape(4, 8)
    got_h = QKNorm(1e-6).apply({"params": {"scale": scale_h}}, x_dev)
    got_f = QKNorm(1e-6, full=True).apply({"params": {"scale": scale_f}}, x_dev)
    want_h = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale_h
    flat = x.reshape(2, 5, 32)
    want_f = (flat / np.sqrt(np.mean(flat**2, axis=-1, keepdims=True) + 1e-6)).reshape(x.shape) * scale_f
    assert_close(got_h, want_h)
    assert_close(got_f, want_f)


def _llama3_loop(d, base, factor, low, high, old_len):
    """Meta's reference loop for Llama 3.1 frequency scaling."""
    out = []
    for i in range(0, d, 2):
        freq = 1.0 / base ** (i / d)
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(freq)
        elif wavelen > old_len / low:
            out.append(freq / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def _yarn_loop(d, base, factor, old_len, beta_fast=32.0, beta_slow=1.0):
    dim = lambda rot: d * math.log(old_len / (rot * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
    lo, hi = max(math.floor(dim(beta_fast)), 0), min(math.ceil(dim(beta_slow)), d - 1)
    out = []
    for j in range(d // 2):
        freq = 1.0 / base ** (2 * j / d)
        ramp = min(max((j - lo) / (hi - lo), 0.0), 1.0)  # 0: extrapolate (keep), 1: interpolate
        out.append(freq * (1 - ramp) + freq / factor * ramp)
    return np.array(out), 0.1 * math.log(factor) + 1.0


def test_rope_frequencies_match_reference_formulas():
    d, base = 64, 500_000.0
    l3 = RopeScalingConfig(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=64)
    got, scale = rope_frequencies(d, base, l3)
    np.testing.assert_allclose(got, _llama3_loop(d, base, 8.0, 1.0, 4.0, 64), rtol=1e-6)
    assert scale == 1.0
    # all three regimes (kept, divided, smoothed) occur at this size
    plain, _ = rope_frequencies(d, base)
    ratio = plain / got
    assert np.any(np.isclose(ratio, 1.0)) and np.any(np.isclose(ratio, 8.0)) and np.any((ratio > 1.01) & (ratio < 7.99))
    yarn = RopeScalingConfig(kind="yarn", factor=4.0, original_max_len=64)
    got, scale = rope_frequencies(d, 10_000.0, yarn)
    want, want_scale = _yarn_loop(d, 10_000.0, 4.0, 64)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert scale == pytest.approx(want_scale)
    lin, _ = rope_frequencies(d, base, RopeScalingConfig(kind="linear", factor=2.0))
    np.testing.assert_allclose(lin, plain / 2, rtol=1e-6)
    # the unscaled path equals the scaling function with kind="none"
    x = jax.random.normal(jax.random.key(0), (1, 6, 2, d))
    pos = jnp.arange(6)[None]
    assert_close(apply_rope(x, pos, base), apply_rope(x, pos, base, RopeScalingConfig()))


@pytest.mark.parametrize("scaling", [RopeScalingConfig(kind="llama3", factor=8.0, original_max_len=16),
                                     RopeScalingConfig(kind="yarn", factor=4.0, original_max_len=16)])
def test_rope_scaling_reference_vs_fast(scaling):
    cfg = dataclasses.replace(BASE, rope_scaling=scaling)
    params, out = _reference_vs_fast(cfg)
    plain = Transformer(BASE).apply({"params": params}, TOKENS)
    assert float(jnp.max(jnp.abs(plain - out))) > 1e-4  # scaling changes the function


def test_bad_knob_values_are_named():
    with pytest.raises(ConfigError, match="qk_norm"):
        dataclasses.replace(BASE, qk_norm="per_head")
    with pytest.raises(ConfigError, match="RopeScalingConfig.kind"):
        RopeScalingConfig(kind="dynamic")
    with pytest.raises(ConfigError, match="original_max_len"):
        RopeScalingConfig(kind="llama3", factor=8.0)
    with pytest.raises(ConfigError, match="shared_gate"):
        MoEConfig(enabled=True, shared_gate=True)


# ----------------------------------------------------------------------------- MoE knobs

MOE_BASE = dataclasses.replace(BASE, moe=MoEConfig(enabled=True, num_experts=4, top_k=2, expert_dim=16,
                                                   load_balance_weight=0.0, z_loss_weight=0.0))
X_IN = jax.random.normal(jax.random.key(5), (2, 6, 32))


def _moe(cfg, **moe):
    return MoE(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe)))


def _moe_reference_vs_sorted(cfg, variables):
    out = {}
    grads = {}
    for impl in ("reference", "sorted"):
        layer = _moe(cfg, dispatch=impl)
        out[impl] = jax.jit(layer.apply)(variables, X_IN)  # one compile, not an eager dispatch per op
        loss = lambda p, x: jnp.sum(jnp.sin(layer.apply({**variables, "params": p}, x)))  # noqa: B023,E731
        grads[impl] = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], X_IN)
    assert_close(out["sorted"], out["reference"])
    assert_close(grads["sorted"], grads["reference"], kind="grad")
    return out["reference"]


def test_shared_gate_reference_vs_fast_and_formula():
    cfg = dataclasses.replace(MOE_BASE, moe=dataclasses.replace(MOE_BASE.moe, num_shared_experts=1, shared_gate=True))
    variables = {"params": _perturb(_moe(cfg).init(jax.random.key(0), X_IN)["params"])}
    assert variables["params"]["shared_gate"].shape == (32,)
    gated = _moe_reference_vs_sorted(cfg, variables)
    ungated_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, shared_gate=False))
    p = {k: v for k, v in variables["params"].items() if k != "shared_gate"}
    ungated = _moe(ungated_cfg, dispatch="reference").apply({"params": p}, X_IN)
    routed = _moe(dataclasses.replace(ungated_cfg, moe=dataclasses.replace(ungated_cfg.moe, num_shared_experts=0)),
                  dispatch="reference").apply({"params": {k: v for k, v in p.items() if k != "shared"}}, X_IN)
    gate = jax.nn.sigmoid(X_IN @ variables["params"]["shared_gate"])[..., None]  # [B, T, 1]
    assert_close(gated, routed + gate * (ungated - routed))


def test_routing_bias_is_state_at_rate_zero_and_steers_selection():
    cfg = dataclasses.replace(MOE_BASE, moe=dataclasses.replace(MOE_BASE.moe, router="sigmoid", routing_bias=True))
    init = _moe(cfg).init(jax.random.key(0), X_IN)
    assert init[BIAS_COLLECTION]["bias"].shape == (4,)
    params = _perturb(init["params"])
    bias = jnp.array([0.0, 0.0, 5.0, 5.0])  # experts 2 and 3 always win the selection
    variables = {"params": params, BIAS_COLLECTION: {"bias": bias}}
    out = _moe_reference_vs_sorted(cfg, variables)
    _, state = _moe(cfg, dispatch="reference").apply(variables, X_IN, mutable=["intermediates"])
    load = np.asarray(state["intermediates"]["moe_load"][0])
    np.testing.assert_array_equal(load, [0, 0, 12, 12])
    unbiased = _moe(cfg, dispatch="reference").apply({"params": params, BIAS_COLLECTION: {"bias": jnp.zeros(4)}}, X_IN)
    assert float(jnp.max(jnp.abs(unbiased - out))) > 1e-4
    # without routing_bias (and rate 0) the layer has no such state
    assert BIAS_COLLECTION not in _moe(MOE_BASE).init(jax.random.key(0), X_IN)


@pytest.mark.parametrize("impl", ["sorted", "dense", "reference"])
def test_numpy_params_unjitted_apply(impl):
    layer = _moe(MOE_BASE, dispatch=impl)
    params = _perturb(layer.init(jax.random.key(0), X_IN)["params"])
    np_params = jax.tree_util.tree_map(np.asarray, params)
    assert_close(layer.apply({"params": np_params}, X_IN), layer.apply({"params": params}, X_IN))
