"""Hugging Face ``config.json`` <-> :class:`~ling_jax.config.ModelConfig`.

Supported ``model_type`` values: ``llama`` (incl. Llama 3.1 ``rope_type="llama3"``), ``mistral``
(without a sliding window), ``qwen2``, ``qwen2_moe``, ``qwen3``, ``qwen3_moe``, ``mixtral``,
``olmoe``, ``deepseek_v3`` (Multi-head Latent Attention with or without ``q_lora_rank``, YaRN with
its softmax ``mscale_all_dim``, sigmoid group-limited routing; the multi-token-prediction layers
of the released checkpoints are not read). Anything this library cannot reproduce exactly (sliding-window
layers, attention output biases, QKV clipping, partial rotary, activations other than SiLU,
dynamic/longrope RoPE, ...) raises :class:`InteropError` naming the option.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from ling_jax.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, RopeScalingConfig

SUPPORTED = ("llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
MOE_TYPES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3")


class InteropError(ConfigError):
    """A checkpoint or its config cannot be imported or exported; the message names the cause."""


def _refuse(model_type: str, what: str) -> InteropError:
    return InteropError(f"cannot import this {model_type} checkpoint: {what} is not supported by ling-jax")


def _rope(c: Mapping[str, Any], model_type: str) -> tuple[float, RopeScalingConfig]:
    """rope_theta and the scaling rule, from v4 (rope_theta + rope_scaling) or v5 (rope_parameters) keys."""
    params = dict(c.get("rope_parameters") or {})
    scaling = dict(c.get("rope_scaling") or {}) or params
    theta = c.get("rope_theta") or params.get("rope_theta") or 10_000.0
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if c.get("partial_rotary_factor", 1.0) != 1.0 or params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(model_type, "partial_rotary_factor != 1 (partial rotary embeddings)")
    original = int(scaling.get("original_max_position_embeddings") or c.get("max_position_embeddings") or 0)
    if kind == "default":
        return float(theta), RopeScalingConfig()
    if kind == "linear":
        return float(theta), RopeScalingConfig(kind="linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        return float(theta), RopeScalingConfig(kind="llama3", factor=float(scaling["factor"]), original_max_len=original,
                                               low_freq_factor=float(scaling["low_freq_factor"]),
                                               high_freq_factor=float(scaling["high_freq_factor"]))
    if kind == "yarn":
        factor = float(scaling["factor"])
        attention_factor = scaling.get("attention_factor")
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if attention_factor is None and mscale and mscale_all:
            get = lambda m: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0  # noqa: E731
            attention_factor = get(mscale) / get(mscale_all)
        return float(theta), RopeScalingConfig(
            kind="yarn", factor=factor, original_max_len=original, beta_fast=float(scaling.get("beta_fast") or 32.0),
            beta_slow=float(scaling.get("beta_slow") or 1.0), attention_factor=float(attention_factor or 0.0),
            truncate=bool(scaling.get("truncate", True)))
    raise _refuse(model_type, f"rope_type={kind!r} (supported: default, linear, llama3, yarn)")


def _check_common(c: Mapping[str, Any], model_type: str) -> None:
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _refuse(model_type, f"hidden_act={act!r} (only SiLU-gated MLPs)")
    if c.get("mlp_bias"):
        raise _refuse(model_type, "mlp_bias=true (MLP biases)")
    if c.get("pretraining_tp", 1) not in (1, None):
        raise _refuse(model_type, f"pretraining_tp={c.get('pretraining_tp')}")
    if c.get("clip_qkv") is not None:
        raise _refuse(model_type, f"clip_qkv={c.get('clip_qkv')} (QKV clipping)")
    layer_types = c.get("layer_types") or []
    sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
    if sliding:
        raise _refuse(model_type, f"layer_types {sorted(set(layer_types[i] for i in sliding))} at layers {sliding} "
                                  "(sliding-window attention layers)")
    if c.get("use_sliding_window"):
        raise _refuse(model_type, "use_sliding_window=true (sliding-window attention layers)")
    if model_type in ("mixtral", "mistral") and c.get("sliding_window") is not None:
        if int(c["sliding_window"]) < int(c.get("max_position_embeddings", 0)):
            raise _refuse(model_type, f"sliding_window={c['sliding_window']} (sliding-window attention layers)")


def moe_config_from_hf(c: Mapping[str, Any], model_type: str) -> tuple[MoEConfig, int]:
    """The MoE part of a config: (MoEConfig, dense-layer mlp_dim). ``enabled=False`` when no layer is MoE."""
    n = int(c["num_hidden_layers"])
    if model_type not in MOE_TYPES:
        return MoEConfig(), int(c["intermediate_size"])
    lb = float(c.get("router_aux_loss_coef") or 0.0)
    z = float(c.get("router_z_loss_coef") or 0.0)
    common = dict(enabled=True, top_k=int(c["num_experts_per_tok"]), load_balance_weight=lb, z_loss_weight=z)
    if model_type == "mixtral":
        moe = MoEConfig(num_experts=int(c["num_local_experts"]), expert_dim=int(c["intermediate_size"]), layers="all",
                        router="softmax", normalize_weights=True, jitter=float(c.get("router_jitter_noise") or 0.0),
                        **common)
        return moe, int(c["intermediate_size"])
    if model_type == "olmoe":
        moe = MoEConfig(num_experts=int(c["num_experts"]), expert_dim=int(c["intermediate_size"]), layers="all",
                        router="softmax", normalize_weights=bool(c.get("norm_topk_prob", False)), **common)
        return moe, int(c["intermediate_size"])
    if model_type in ("qwen2_moe", "qwen3_moe"):
        experts = int(c.get("num_experts") or c.get("num_local_experts") or 0)
        step, only = int(c.get("decoder_sparse_step", 1)), set(c.get("mlp_only_layers") or [])
        layers = [i for i in range(n) if experts > 0 and i not in only and (i + 1) % step == 0]
        f = int(c["moe_intermediate_size"])
        shared = {}
        if model_type == "qwen2_moe" and int(c.get("shared_expert_intermediate_size") or 0):
            size = int(c["shared_expert_intermediate_size"])
            if size % f:
                raise _refuse(model_type, f"shared_expert_intermediate_size={size} that is not a multiple of "
                                          f"moe_intermediate_size={f}")
            shared = dict(num_shared_experts=size // f, shared_gate=True)
        if not layers:
            return MoEConfig(), int(c["intermediate_size"])
        moe = MoEConfig(num_experts=experts, expert_dim=f, layers=",".join(map(str, layers)), router="softmax",
                        normalize_weights=bool(c.get("norm_topk_prob", False)), **shared, **common)
        return moe, int(c["intermediate_size"])
    if model_type == "deepseek_v3":
        if c.get("scoring_func", "sigmoid") != "sigmoid" or c.get("topk_method", "noaux_tc") != "noaux_tc":
            raise _refuse(model_type, f"scoring_func={c.get('scoring_func')!r} / topk_method={c.get('topk_method')!r} "
                                      "(only sigmoid scores with noaux_tc)")
        if int(c.get("moe_layer_freq", 1)) != 1:
            raise _refuse(model_type, f"moe_layer_freq={c['moe_layer_freq']}")
        first = int(c.get("first_k_dense_replace", 0))
        moe = MoEConfig(num_experts=int(c["n_routed_experts"]), expert_dim=int(c["moe_intermediate_size"]),
                        layers=f"from:{first}", router="sigmoid", normalize_weights=bool(c.get("norm_topk_prob", True)),
                        num_groups=int(c.get("n_group") or 1), top_groups=int(c.get("topk_group") or 1),
                        route_scale=float(c.get("routed_scaling_factor") or 1.0),
                        num_shared_experts=int(c.get("n_shared_experts") or 0), routing_bias=True,
                        enabled=True, top_k=int(c["num_experts_per_tok"]), load_balance_weight=0.0, z_loss_weight=0.0)
        return moe, int(c["intermediate_size"])
    return MoEConfig(), int(c["intermediate_size"])


def config_from_hf(c: Mapping[str, Any], *, max_seq_len: int | None = None, source: str = "config.json") -> ModelConfig:
    """A ModelConfig that reproduces the Hugging Face model described by config.json ``c`` (read
    from ``source``, the file errors name)."""
    model_type = c.get("model_type")
    if model_type not in SUPPORTED:
        raise InteropError(f"unsupported model_type {model_type!r} in {source}; supported: {list(SUPPORTED)}")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        value = c.get(key)
        if key in c and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise InteropError(f"{source} (model_type {model_type!r}): {key} must be a positive integer, got {value!r}")
    try:
        return _config_from_hf(c, model_type, max_seq_len)
    except KeyError as e:
        raise InteropError(f"{source} (model_type {model_type!r}) lacks the key {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:  # a null, a string or a zero where a size belongs
        raise InteropError(f"{source} (model_type {model_type!r}) has a value this conversion cannot use: {e}") from None


def _config_from_hf(c: Mapping[str, Any], model_type: str, max_seq_len: int | None) -> ModelConfig:
    _check_common(c, model_type)
    if c.get("attention_bias") and model_type not in ("qwen2", "qwen2_moe"):
        raise _refuse(model_type, "attention_bias=true (biases on the attention output projection)")
    theta, scaling = _rope(c, model_type)
    heads = int(c["num_attention_heads"])
    d_model = int(c["hidden_size"])
    head_dim = int(c.get("head_dim") or d_model // heads)
    moe, mlp_dim = moe_config_from_hf(c, model_type)
    qk_norm = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(model_type, "none")
    qkv_bias = model_type == "qwen2" or (model_type == "qwen2_moe" and bool(c.get("qkv_bias", True)))
    attention = {}
    if model_type == "deepseek_v3":
        attention = _mla_from_hf(c, model_type)
        head_dim = d_model // heads if d_model % heads == 0 else attention["mla"].qk_head_dim
    return ModelConfig(
        vocab_size=int(c["vocab_size"]), d_model=d_model, num_layers=int(c["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=0 if head_dim * heads == d_model else head_dim, mlp_dim=mlp_dim,
        max_seq_len=int(max_seq_len or c.get("max_position_embeddings") or 2048), rope_base=theta,
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        moe=moe, qkv_bias=qkv_bias, qk_norm=qk_norm, rope_scaling=scaling, **attention,
    )


def _mla_from_hf(c: Mapping[str, Any], model_type: str) -> dict:
    """``attention="mla"`` and its MLAConfig from DeepSeek's q_lora_rank / kv_lora_rank / head dims."""
    heads = int(c["num_attention_heads"])
    if int(c.get("num_key_value_heads") or heads) != heads:
        raise _refuse(model_type, f"num_key_value_heads={c['num_key_value_heads']} != num_attention_heads={heads} "
                                  "with Multi-head Latent Attention")
    params = dict(c.get("rope_parameters") or {}) | dict(c.get("rope_scaling") or {})
    mscale_all_dim = 0.0
    if (params.get("rope_type") or params.get("type") or "default") != "default":
        mscale_all_dim = float(params.get("mscale_all_dim") or 0.0)
    return dict(attention="mla", mla=MLAConfig(
        q_lora_rank=int(c.get("q_lora_rank") or 0), kv_lora_rank=int(c["kv_lora_rank"]),
        qk_nope_head_dim=int(c["qk_nope_head_dim"]), qk_rope_head_dim=int(c["qk_rope_head_dim"]),
        v_head_dim=int(c["v_head_dim"]), mscale_all_dim=mscale_all_dim))


def _mla_to_hf(cfg: ModelConfig, base: Mapping[str, Any]) -> dict:
    m, moe = cfg.mla, cfg.moe
    if cfg.attention != "mla":
        raise InteropError("exporting as deepseek_v3 needs model.attention='mla'")
    first = min(cfg.moe_layers) if cfg.moe_layers else cfg.num_layers
    if tuple(cfg.moe_layers) != tuple(range(first, cfg.num_layers)):
        raise InteropError(f"deepseek_v3 has dense layers first and MoE layers after; model.moe layers "
                           f"{list(cfg.moe_layers)} are not of that form")
    out = dict(q_lora_rank=m.q_lora_rank or None, kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
               qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, qk_head_dim=m.qk_head_dim,
               head_dim=m.qk_rope_head_dim, rope_interleave=bool(base.get("rope_interleave", True)),
               first_k_dense_replace=first, moe_layer_freq=1, scoring_func="sigmoid", topk_method="noaux_tc")
    if moe.enabled:
        out.update(n_routed_experts=moe.num_experts, moe_intermediate_size=moe.expert_dim or cfg.mlp_dim,
                   norm_topk_prob=moe.normalize_weights, n_group=moe.num_groups, topk_group=moe.top_groups,
                   routed_scaling_factor=moe.route_scale, n_shared_experts=moe.num_shared_experts)
    return out


def config_to_hf(cfg: ModelConfig, model_type: str, base: Mapping[str, Any] | None = None) -> dict:
    """config.json for ``cfg`` as a ``model_type`` model; keys of ``base`` (the imported config)
    that ling-jax does not model (token ids, ...) are kept."""
    if model_type not in SUPPORTED:
        raise InteropError(f"cannot export to model_type {model_type!r}; supported: {list(SUPPORTED)}")
    out = dict(base or {})
    for key in ("rope_parameters", "rope_scaling", "num_experts", "num_local_experts"):
        out.pop(key, None)
    out.update(model_type=model_type, architectures=[ARCHITECTURES[model_type]], vocab_size=cfg.vocab_size,
               hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim, intermediate_size=cfg.mlp_dim,
               max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_base, rms_norm_eps=cfg.norm_eps,
               tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu")
    r = cfg.rope_scaling
    if r.kind != "none":
        out["rope_scaling"] = {"rope_type": r.kind, "factor": r.factor, **(
            {"low_freq_factor": r.low_freq_factor, "high_freq_factor": r.high_freq_factor,
             "original_max_position_embeddings": r.original_max_len} if r.kind == "llama3" else {}), **(
            {"beta_fast": r.beta_fast, "beta_slow": r.beta_slow, "original_max_position_embeddings": r.original_max_len,
             "truncate": r.truncate, **({"attention_factor": r.attention_factor} if r.attention_factor else {})}
            if r.kind == "yarn" else {})}
    if model_type == "qwen2_moe":
        out["qkv_bias"] = cfg.qkv_bias
    if model_type == "deepseek_v3":
        out.update(_mla_to_hf(cfg, base or {}))
        if cfg.mla.mscale_all_dim and "rope_scaling" in out:
            out["rope_scaling"]["mscale_all_dim"] = cfg.mla.mscale_all_dim
    elif cfg.attention != "mha":
        raise InteropError(f"attention={cfg.attention!r} cannot be exported as {model_type} (only as deepseek_v3)")
    m = cfg.moe
    if model_type in MOE_TYPES:
        if not m.enabled and model_type != "qwen2_moe" and model_type != "qwen3_moe":
            raise InteropError(f"exporting as {model_type} needs model.moe.enabled")
        out.update(num_experts_per_tok=m.top_k, router_aux_loss_coef=m.load_balance_weight)
        if model_type == "mixtral":
            out.update(num_local_experts=m.num_experts, router_jitter_noise=m.jitter)
        elif model_type == "deepseek_v3":
            pass  # written by _mla_to_hf
        elif model_type == "olmoe":
            out.update(num_experts=m.num_experts, norm_topk_prob=m.normalize_weights, router_z_loss_coef=m.z_loss_weight)
        else:
            moe_layers = cfg.moe_layers
            out.update(num_experts=m.num_experts if m.enabled else 0, moe_intermediate_size=m.expert_dim or cfg.mlp_dim,
                       norm_topk_prob=m.normalize_weights, decoder_sparse_step=1,
                       mlp_only_layers=[i for i in range(cfg.num_layers) if i not in moe_layers])
            if model_type == "qwen2_moe":
                out["shared_expert_intermediate_size"] = m.num_shared_experts * (m.expert_dim or cfg.mlp_dim)
    check = config_from_hf(out, max_seq_len=cfg.max_seq_len)
    if _arch(check) != _arch(cfg):
        diff = [k for k, v in _arch(cfg).items() if _arch(check).get(k) != v]
        raise InteropError(f"this ModelConfig cannot be written as a {model_type} config.json; differing fields: {diff}")
    return out


def _arch(cfg: ModelConfig) -> dict:
    """The fields an exported config.json must reproduce (training-only settings excluded)."""
    d = dataclasses.asdict(dataclasses.replace(cfg, pruning=type(cfg.pruning)(), depth=type(cfg.depth)(),
                                               dtype="float32", remat="none", attention_impl="auto"))
    d["head_dim"] = cfg.resolved_head_dim
    if cfg.moe.enabled:
        d["moe"]["layers"] = list(cfg.moe_layers)
        d["moe"] = {k: v for k, v in d["moe"].items()
                    if k not in ("dispatch", "capacity_factor", "bias_update_rate", "z_loss_weight", "load_balance_weight", "jitter")}
    return d
