"""Hugging Face import/export against tiny checkpoints made by tests/interop/make_fixtures.py
(transformers 5.x, float32, random weights): logits (and DeepSeek-V3's MLA and MoE layers alone) match
the saved reference within 2e-6 of its largest magnitude for every family (``assert_close``'s
"external" kind), the round trip import -> export -> import is exact, and bad inputs fail clearly."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")

from ling_jax.config import ModelConfig, RopeScalingConfig  # noqa: E402
from ling_jax.interop.hf import (  # noqa: E402
    load_hf, map_tensors, moe_rules, read_tensors, save_hf, variables_from_tensors,
)
from ling_jax.interop.hf_config import InteropError, moe_config_from_hf  # noqa: E402
from ling_jax.layers.attention import AttentionMask  # noqa: E402
from ling_jax.layers.mla import MLA  # noqa: E402
from ling_jax.layers.moe import MoE  # noqa: E402
from ling_jax.model import Transformer  # noqa: E402
from ling_jax.testing import assert_close  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
FAMILIES = ["llama", "llama31", "qwen2", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "deepseek_v3_yarn"]
EXPECTED_KNOBS = {  # what each family must switch on (so the test fails if the importer drops one)
    "llama31": lambda c: c.rope_scaling.kind == "llama3" and c.rope_scaling.factor == 8.0,
    "qwen2": lambda c: c.qkv_bias and c.tie_embeddings,
    "qwen2_moe": lambda c: c.qkv_bias and c.moe.shared_gate and c.moe.num_shared_experts == 2 and c.moe_layers == (1,),
    "qwen3_moe": lambda c: c.qk_norm == "head" and c.resolved_head_dim == 16 and c.moe.normalize_weights,
    "mixtral": lambda c: c.moe.enabled and c.moe.normalize_weights and c.moe_layers == (0, 1),
    "olmoe": lambda c: c.qk_norm == "full" and not c.moe.normalize_weights,
    "deepseek_v3": lambda c: c.attention == "mla" and c.mla.q_lora_rank == 16 and c.moe.router == "sigmoid"
    and c.moe_layers == (1,),
    "deepseek_v3_yarn": lambda c: c.attention == "mla" and c.mla.q_lora_rank == 0 and c.mla.v_head_dim == 12
    and c.rope_scaling.kind == "yarn" and c.mla.mscale_all_dim == 0.7,
}


def _logits(cfg, variables, ids):
    return np.asarray(Transformer(cfg).apply(variables, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
    cfg, variables, _ = load_hf(FIXTURES / family)
    assert EXPECTED_KNOBS.get(family, lambda c: True)(cfg)
    ids = np.load(FIXTURES / family / "input_ids.npy")
    ref = np.load(FIXTURES / family / "logits.npy")
    assert_close(_logits(cfg, variables, ids), ref, dtype=np.float32, kind="external")


def test_llama31_rope_scaling_matters():
    cfg, variables, _ = load_hf(FIXTURES / "llama31")
    ids = np.load(FIXTURES / "llama31" / "input_ids.npy")
    unscaled = _logits(dataclasses.replace(cfg, rope_scaling=RopeScalingConfig()), variables, ids)
    assert np.max(np.abs(unscaled - np.load(FIXTURES / "llama31" / "logits.npy"))) > 1e-3


def test_qwen2_moe_shared_gate_matters():
    cfg, variables, _ = load_hf(FIXTURES / "qwen2_moe")
    ids = np.load(FIXTURES / "qwen2_moe" / "input_ids.npy")
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    params["block_1"]["moe"]["shared_gate"] = np.full_like(params["block_1"]["moe"]["shared_gate"], 0.0)
    half = _logits(cfg, {"params": params}, ids)  # gate 0.5 everywhere instead of sigmoid(x . w)
    assert np.max(np.abs(half - np.load(FIXTURES / "qwen2_moe" / "logits.npy"))) > 1e-3


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v3_yarn"])
def test_deepseek_v3_mla_layer_matches_transformers(family):
    """One MLA layer alone (input and output saved from the Hugging Face model); with the YaRN
    softmax mscale or the rotary layout wrong it does not match, nor with the latent norms at the
    config's rms_norm_eps (DeepSeek fixes them at 1e-6)."""
    cfg, variables, hf_cfg = load_hf(FIXTURES / family)
    assert cfg.norm_eps != 1e-6  # so the latent norms' own epsilon matters here
    x, want = jnp.asarray(np.load(FIXTURES / family / "attn_in.npy")), np.load(FIXTURES / family / "attn_out.npy")
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])  # layers take jax.Array

    def attn(cfg, params):
        return np.asarray(MLA(cfg).apply({"params": params}, x, AttentionMask.causal_self(positions)))

    assert_close(attn(cfg, variables["params"]["block_0"]["attn"]), want, dtype=np.float32, kind="external")
    flipped = variables_from_tensors(cfg, "deepseek_v3", read_tensors(FIXTURES / family),
                                     hf_config={**hf_cfg, "rope_interleave": not hf_cfg["rope_interleave"]})
    assert np.max(np.abs(attn(cfg, flipped["params"]["block_0"]["attn"]) - want)) > 1e-3
    if cfg.mla.mscale_all_dim:
        plain = dataclasses.replace(cfg, mla=dataclasses.replace(cfg.mla, mscale_all_dim=0.0))
        assert np.max(np.abs(attn(plain, variables["params"]["block_0"]["attn"]) - want)) > 1e-3


def test_deepseek_v3_refusals(tmp_path):
    path = _copy("deepseek_v3", tmp_path)
    _edit_config(path, num_key_value_heads=2)
    with pytest.raises(InteropError, match="num_key_value_heads=2 != num_attention_heads=4"):
        load_hf(path)
    _edit_config(path, num_key_value_heads=4, attention_bias=True)
    with pytest.raises(InteropError, match="attention_bias"):
        load_hf(path)
    cfg, variables, _ = load_hf(FIXTURES / "llama")
    with pytest.raises(InteropError, match="needs model.attention='mla'"):
        save_hf(tmp_path / "out", cfg, variables, "deepseek_v3")


def test_deepseek_v3_routing_matches():
    path = FIXTURES / "deepseek_v3"
    hf_cfg = json.loads((path / "config.json").read_text())
    moe, mlp_dim = moe_config_from_hf(hf_cfg, "deepseek_v3")
    assert (moe.router, moe.num_groups, moe.top_groups, moe.route_scale, moe.routing_bias) == ("sigmoid", 4, 2, 2.5, True)
    cfg = ModelConfig(vocab_size=hf_cfg["vocab_size"], d_model=hf_cfg["hidden_size"], num_layers=2, num_heads=4,
                      num_kv_heads=4, mlp_dim=mlp_dim, moe=dataclasses.replace(moe, dispatch="sorted"))
    variables = map_tensors(moe_rules(cfg, "deepseek_v3", "model.layers.1.mlp", ()), read_tensors(path))
    assert np.any(variables["moe_bias"]["bias"] != 0)  # the checkpoint's correction bias, at bias_update_rate 0
    x, want = jnp.asarray(np.load(path / "moe_in.npy")), np.load(path / "moe_out.npy")  # layers take jax.Array
    got = MoE(cfg).apply(variables, x)  # numpy params, unjitted, sorted dispatch
    assert_close(got, want, dtype=np.float32, kind="external")
    no_bias = MoE(cfg).apply({**variables, "moe_bias": {"bias": np.zeros(8, np.float32)}}, x)
    assert np.max(np.abs(np.asarray(no_bias) - want)) > 1e-4  # the bias changes which experts run


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact(family, tmp_path):
    cfg, variables, hf_cfg = load_hf(FIXTURES / family)
    shard = 30_000 if family == "qwen2" else None
    save_hf(tmp_path, cfg, variables, hf_cfg["model_type"], base_config=hf_cfg, max_shard_bytes=shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == (family == "qwen2")
    cfg2, variables2, _ = load_hf(tmp_path)
    assert cfg2 == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables2, variables)
    original, exported = read_tensors(FIXTURES / family), read_tensors(tmp_path)
    assert sorted(original) == sorted(exported)
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)


# ----------------------------------------------------------------------------- bad input


def _copy(family: str, tmp_path: pathlib.Path) -> pathlib.Path:
    target = tmp_path / family
    shutil.copytree(FIXTURES / family, target)
    return target


def _edit_config(path: pathlib.Path, **changes) -> None:
    c = json.loads((path / "config.json").read_text())
    c.update(changes)
    (path / "config.json").write_text(json.dumps(c))


def test_directory_without_config_json(tmp_path):
    with pytest.raises(InteropError, match="no config.json"):
        load_hf(tmp_path)
    with pytest.raises(InteropError, match="not a directory"):
        load_hf(tmp_path / "nowhere")


def test_missing_and_extra_and_mismatched_tensors(tmp_path):
    from safetensors.numpy import save_file

    path = _copy("llama", tmp_path)
    tensors = read_tensors(path)
    dropped = dict(tensors)
    dropped.pop("model.layers.1.self_attn.k_proj.weight")
    save_file(dropped, str(path / "model.safetensors"))
    with pytest.raises(InteropError, match=r"missing 1 tensor.*layers\.1\.self_attn\.k_proj\.weight"):
        load_hf(path)
    save_file({**tensors, "model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)}, str(path / "model.safetensors"))
    with pytest.raises(InteropError, match=r"does not use.*o_proj\.bias"):
        load_hf(path)
    save_file(tensors, str(path / "model.safetensors"))
    _edit_config(path, intermediate_size=48)
    with pytest.raises(InteropError, match=r"mlp\.gate_proj\.weight has shape \(64, 32\)"):
        load_hf(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(InteropError, match="no \\*.safetensors"):
        load_hf(path)


@pytest.mark.parametrize("changes, match", [
    (dict(model_type="gpt2"), "unsupported model_type 'gpt2'"),
    (dict(use_sliding_window=True), "sliding-window"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "sliding-window attention layers"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope_type='dynamic'"),
])
def test_unsupported_architectures_and_options(tmp_path, changes, match):
    path = _copy("llama", tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(InteropError, match=match):
        load_hf(path)


def test_bfloat16_checkpoints_are_read(tmp_path):
    import ml_dtypes
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = _copy("llama", tmp_path)
    tensors = read_tensors(path)
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}, str(path / "model.safetensors"))
    with safe_open(str(path / "model.safetensors"), "np") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
    _, variables, _ = load_hf(path)
    want = tensors["model.norm.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(variables["params"]["final_norm"]["scale"], want)


# ----------------------------------------------------------------------------- live (optional)


def test_live_against_transformers(tmp_path):
    """A fresh random Qwen3-MoE built by transformers now (skipped where it is not installed)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path)
    ids = np.arange(20, dtype=np.int64).reshape(1, 20) % 64
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    lcfg, variables, _ = load_hf(tmp_path)
    assert_close(_logits(lcfg, variables, ids.astype(np.int32)), want, dtype=np.float32, kind="external")


def test_config_keys_of_both_transformers_generations():
    """v4 configs (rope_theta + rope_scaling with "type"/"rope_type", Qwen2-MoE without qkv_bias)
    and v5 configs (rope_parameters) map to the same ModelConfig; the config survives to_dict/from_dict."""
    from ling_jax.config import Config, TrainConfig, from_dict, to_dict
    from ling_jax.interop.hf_config import config_from_hf

    v5 = json.loads((FIXTURES / "llama31" / "config.json").read_text())
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=500_000.0, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    assert config_from_hf(v4) == config_from_hf(v5)
    yarn = config_from_hf({**v4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                                                  "original_max_position_embeddings": 16}})
    want = (0.1 * math.log(4.0) + 1.0) / (0.05 * math.log(4.0) + 1.0)
    assert yarn.rope_scaling.kind == "yarn" and yarn.rope_scaling.attention_factor == pytest.approx(want)
    assert config_from_hf({**v4, "rope_scaling": {"type": "linear", "factor": 2.0}}).rope_scaling.factor == 2.0
    q = json.loads((FIXTURES / "qwen2_moe" / "config.json").read_text())
    q.pop("qkv_bias")
    assert config_from_hf(q).qkv_bias  # Qwen2-MoE always had q/k/v biases before the key existed
    cfg = Config(model=config_from_hf(v5), train=TrainConfig(seq_len=32))
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg
