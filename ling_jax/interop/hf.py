"""Hugging Face model directories (``config.json`` + ``*.safetensors``) <-> ling-jax parameters.

:func:`load_hf` reads a directory (one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``) with the ``safetensors`` package's numpy API (bfloat16 tensors,
which numpy cannot name, are read from the file's header offsets) into ``(ModelConfig, variables)``
with ``variables = {"params": ..., "moe_bias": ...}`` as ``Transformer(config).apply`` takes them.
:func:`save_hf` writes the same layout back; ``load_hf(save_hf(load_hf(d)))`` is exact.

Every tensor is accounted for: a missing tensor, one of the wrong shape, or one that ling-jax
would not use raises :class:`~ling_jax.interop.hf_config.InteropError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import struct
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ling_jax.config import ModelConfig
from ling_jax.interop.hf_config import InteropError, config_from_hf, config_to_hf

INDEX = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older exports include; recomputed from the config


def _require_safetensors():
    try:
        import safetensors.numpy  # noqa: F401
    except ImportError:
        raise InteropError("reading Hugging Face checkpoints needs the safetensors package: "
                           "pip install 'ling-jax[hf]'") from None


# ----------------------------------------------------------------------------- reading


def read_hf_config(path: str | pathlib.Path) -> dict:
    path = pathlib.Path(path)
    if not path.is_dir():
        raise InteropError(f"{path} is not a directory (expected a Hugging Face model directory with config.json)")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise InteropError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InteropError(f"{cfg_path} is not valid JSON: {e}") from None


def _bf16_tensor(file: pathlib.Path, name: str) -> np.ndarray:
    """A BF16 tensor as float32, read through the safetensors header (numpy has no bfloat16)."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        info = header[name]
        start, end = info["data_offsets"]
        f.seek(8 + size + start)
        raw = np.frombuffer(f.read(end - start), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def read_tensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of a model directory as float32 numpy arrays (sharded or single file)."""
    _require_safetensors()
    from safetensors import SafetensorError, safe_open

    path = pathlib.Path(path)
    if (path / INDEX).exists():
        try:
            weight_map = json.loads((path / INDEX).read_text()).get("weight_map", {})
        except json.JSONDecodeError as e:
            raise InteropError(f"{path / INDEX} is not valid JSON: {e}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise InteropError(f"{path / INDEX} lists shard files that do not exist: {missing}")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise InteropError(f"{path} has no *.safetensors files (pytorch_model.bin checkpoints are not read: "
                               "convert them to safetensors first)")
    out: dict[str, np.ndarray] = {}
    for name in files:
        file = path / name
        try:
            with safe_open(str(file), framework="np") as f:
                for key in f.keys():
                    dtype = f.get_slice(key).get_dtype()
                    value = _bf16_tensor(file, key) if dtype == "BF16" else f.get_tensor(key)
                    if not np.issubdtype(value.dtype, np.floating):
                        raise InteropError(f"tensor {key} in {name} has dtype {dtype}; "
                                           "expected a floating-point weight")
                    out[key] = np.asarray(value, np.float32)
        except SafetensorError as e:  # a truncated or damaged file: its header does not describe its bytes
            raise InteropError(f"{file} is not a readable safetensors file (truncated or damaged?): {e}") from None
    return out


# ----------------------------------------------------------------------------- the name map


@dataclasses.dataclass(frozen=True)
class Rule:
    """Hugging Face tensors ``hf`` <-> one ling-jax leaf at ``path`` (in collection ``collection``)."""

    path: tuple[str, ...]
    hf: tuple[str, ...]
    to_ling: Callable[[Sequence[np.ndarray]], np.ndarray]
    to_hf: Callable[[np.ndarray], Sequence[np.ndarray]]
    collection: str = "params"


def _linear(path, name, shape):
    """HF Linear weight [out, in] <-> ling [in, *out_shape]."""
    return Rule(path, (name,), lambda t: t[0].T.reshape(shape), lambda a: [a.reshape(shape[0], -1).T])


def _linear_out(path, name, shape):
    """HF o_proj / down weight [out, in] <-> ling [*in_shape, out] (e.g. wo [H, D, E])."""
    return Rule(path, (name,), lambda t: t[0].T.reshape(shape), lambda a: [a.reshape(-1, shape[-1]).T])


def _same(path, name, shape, collection="params", hf_shape=None):
    """Same values, HF shape ``hf_shape`` (default: flat) <-> ling ``shape``."""
    hf_shape = (int(np.prod(shape)),) if hf_shape is None else hf_shape
    return Rule(path, (name,), lambda t: t[0].reshape(shape), lambda a: [a.reshape(hf_shape)], collection)


def _stacked(path, names, transpose_shape):
    """Per-expert [out, in] weights <-> ling [X, in, out]."""
    return Rule(path, tuple(names), lambda t: np.stack([w.T for w in t]).reshape(transpose_shape),
                lambda a: [w.T for w in a])


def _expert_names(model_type: str, prefix: str, j: int) -> tuple[str, str, str]:
    if model_type == "mixtral":
        return tuple(f"{prefix}.experts.{j}.{w}.weight" for w in ("w1", "w3", "w2"))
    return tuple(f"{prefix}.experts.{j}.{w}_proj.weight" for w in ("gate", "up", "down"))


def moe_rules(cfg: ModelConfig, model_type: str, hf_prefix: str, path: tuple[str, ...]) -> list[Rule]:
    """Rules of one MoE layer (router, experts, shared experts and gate, correction bias)."""
    m, e = cfg.moe, cfg.d_model
    f, x = m.expert_dim or cfg.mlp_dim, m.num_experts
    gate = f"{hf_prefix}.gate"
    rules = [_linear(path + ("router",), f"{gate}.weight", (e, x))]
    names = [_expert_names(model_type, hf_prefix, j) for j in range(x)]
    rules += [_stacked(path + ("w_gate",), [n[0] for n in names], (x, e, f)),
              _stacked(path + ("w_up",), [n[1] for n in names], (x, e, f)),
              _stacked(path + ("w_down",), [n[2] for n in names], (x, f, e))]
    if m.num_shared_experts:
        shared = f"{hf_prefix}.shared_expert" if model_type == "qwen2_moe" else f"{hf_prefix}.shared_experts"
        fs = m.num_shared_experts * f
        rules += [_linear(path + ("shared", "w_gate"), f"{shared}.gate_proj.weight", (e, fs)),
                  _linear(path + ("shared", "w_up"), f"{shared}.up_proj.weight", (e, fs)),
                  _linear_out(path + ("shared", "w_down"), f"{shared}.down_proj.weight", (fs, e))]
    if m.shared_gate:
        rules.append(Rule(path + ("shared_gate",), (f"{hf_prefix}.shared_expert_gate.weight",),
                          lambda t: t[0].reshape(e), lambda a: [a.reshape(1, e)]))
    if m.routing_bias:
        rules.append(_same(path + ("bias",), f"{gate}.e_score_correction_bias", (x,), collection="moe_bias"))
    return rules


def _rope_permutation(n: int, rope: int, interleaved: bool) -> np.ndarray:
    """Order of the last axis (``n`` entries, the rotary ones last): DeepSeek's interleaved rotary
    pairs ``(x0, x1), (x2, x3), ...`` -> ling-jax's rotate-half halves ``(x0, x2, ...), (x1, x3, ...)``.
    The same permutation of query and key leaves every dot product, so the logits, unchanged."""
    order = np.arange(n)
    if interleaved:
        start = n - rope
        order[start:] = start + np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)])
    return order


def _permuted_linear(path, name, shape, order):
    """HF Linear [out, in] <-> ling [in, *out_shape] with the last ling axis reordered by ``order``."""
    inverse = np.argsort(order)
    return Rule(path, (name,), lambda t: t[0].T.reshape(shape)[..., order],
                lambda a: [np.asarray(a)[..., inverse].reshape(shape[0], -1).T])


def mla_rules(cfg: ModelConfig, a: str, path: tuple[str, ...], interleaved: bool) -> list[Rule]:
    """Rules of one DeepSeek-V3 attention layer (``a``: its ``self_attn`` prefix), :class:`ling_jax.layers.mla.MLA`."""
    m, e, h = cfg.mla, cfg.d_model, cfg.num_heads
    q_order = _rope_permutation(m.qk_head_dim, m.qk_rope_head_dim, interleaved)
    kv_order = _rope_permutation(m.kv_lora_rank + m.qk_rope_head_dim, m.qk_rope_head_dim, interleaved)
    rules = [_permuted_linear(path + ("wkv_a",), f"{a}.kv_a_proj_with_mqa.weight", (e, m.kv_lora_rank + m.qk_rope_head_dim),
                              kv_order),
             _same(path + ("kv_a_norm", "scale"), f"{a}.kv_a_layernorm.weight", (m.kv_lora_rank,)),
             _linear(path + ("wkv_b",), f"{a}.kv_b_proj.weight", (m.kv_lora_rank, h, m.qk_nope_head_dim + m.v_head_dim)),
             _linear_out(path + ("wo",), f"{a}.o_proj.weight", (h, m.v_head_dim, e))]
    if m.q_lora_rank:
        rules += [_linear(path + ("wq_a",), f"{a}.q_a_proj.weight", (e, m.q_lora_rank)),
                  _same(path + ("q_a_norm", "scale"), f"{a}.q_a_layernorm.weight", (m.q_lora_rank,)),
                  _permuted_linear(path + ("wq_b",), f"{a}.q_b_proj.weight", (m.q_lora_rank, h, m.qk_head_dim), q_order)]
    else:
        rules.append(_permuted_linear(path + ("wq",), f"{a}.q_proj.weight", (e, h, m.qk_head_dim), q_order))
    return rules


def rules_for(cfg: ModelConfig, model_type: str, hf_config: Mapping[str, Any] | None = None) -> list[Rule]:
    """The complete tensor map of a model. ``hf_config`` (the checkpoint's config.json) tells the
    layout of DeepSeek's rotary weights (``rope_interleave``, default true)."""
    e, h, hkv, d = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    rules = [_same(("embed", "embedding"), "model.embed_tokens.weight", (cfg.vocab_size, e),
                   hf_shape=(cfg.vocab_size, e)),
             _same(("final_norm", "scale"), "model.norm.weight", (e,))]
    if not cfg.tie_embeddings:
        rules.append(_linear(("head",), "lm_head.weight", (e, cfg.vocab_size)))
    moe_prefix = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    for i in range(cfg.num_layers):
        p, b = f"model.layers.{i}", f"block_{i}"
        a = f"{p}.self_attn"
        rules += [_same((b, "attn_norm", "scale"), f"{p}.input_layernorm.weight", (e,)),
                  _same((b, "mlp_norm", "scale"), f"{p}.post_attention_layernorm.weight", (e,))]
        if cfg.attention == "mla":
            rules += mla_rules(cfg, a, (b, "attn"), bool((hf_config or {}).get("rope_interleave", True)))
        else:
            rules += [_linear((b, "attn", "wq"), f"{a}.q_proj.weight", (e, h, d)),
                      _linear((b, "attn", "wk"), f"{a}.k_proj.weight", (e, hkv, d)),
                      _linear((b, "attn", "wv"), f"{a}.v_proj.weight", (e, hkv, d)),
                      _linear_out((b, "attn", "wo"), f"{a}.o_proj.weight", (h, d, e))]
        if cfg.qkv_bias:
            rules += [_same((b, "attn", f"b{n}"), f"{a}.{n}_proj.bias", (heads, d))
                      for n, heads in (("q", h), ("k", hkv), ("v", hkv))]
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"
            rules += [_same((b, "attn", f"{n}_norm", "scale"), f"{a}.{n}_norm.weight", (heads, d) if full else (d,))
                      for n, heads in (("q", h), ("k", hkv))]
        if i in cfg.moe_layers:
            rules += moe_rules(cfg, model_type, f"{p}.{moe_prefix}", (b, "moe"))
        else:
            rules += [_linear((b, "mlp", "w_gate"), f"{p}.mlp.gate_proj.weight", (e, cfg.mlp_dim)),
                      _linear((b, "mlp", "w_up"), f"{p}.mlp.up_proj.weight", (e, cfg.mlp_dim)),
                      _linear_out((b, "mlp", "w_down"), f"{p}.mlp.down_proj.weight", (cfg.mlp_dim, e))]
    return rules


# ----------------------------------------------------------------------------- fused expert layout


def _unfuse_experts(tensors: dict[str, np.ndarray], model_type: str) -> dict[str, np.ndarray]:
    """transformers >= 5 in-memory layout ``experts.gate_up_proj [X, 2F, E]`` / ``experts.down_proj
    [X, E, F]`` -> the per-expert names the released checkpoints use."""
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".experts.gate_up_proj")]:
        prefix = key[: -len(".gate_up_proj")]
        gate_up, down = out.pop(key), out.pop(f"{prefix}.down_proj", None)
        if down is None:
            raise InteropError(f"checkpoint has {key} but not {prefix}.down_proj")
        f = gate_up.shape[1] // 2
        for j in range(gate_up.shape[0]):
            names = _expert_names(model_type, prefix[: -len(".experts")], j)
            out[names[0]], out[names[1]], out[names[2]] = gate_up[j, :f], gate_up[j, f:], down[j]
    return out


# ----------------------------------------------------------------------------- load / save


def _set(tree: dict, path: Sequence[str], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: Sequence[str]):
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            raise InteropError(f"variables have no entry {'/'.join(path)} (needed for this config)")
        tree = tree[key]
    return tree


def map_tensors(rules: Sequence[Rule], tensors: Mapping[str, np.ndarray]) -> dict:
    """Applies ``rules`` to named tensors: ``{collection: tree}``; a shape that does not fit is an error."""
    variables: dict = {}
    for r in rules:
        parts = [tensors[n] for n in r.hf]
        try:
            value = r.to_ling(parts)
        except ValueError:
            value = None
        if value is None or [p.shape for p in parts] != [np.shape(t) for t in r.to_hf(value)]:
            raise InteropError(f"tensor {r.hf[0]} has shape {parts[0].shape}, which does not match the config "
                               f"(ling-jax {'/'.join(r.path)}; check config.json against the weights)")
        _set(variables.setdefault(r.collection, {}), r.path, np.ascontiguousarray(value, np.float32))
    return variables


def variables_from_tensors(cfg: ModelConfig, model_type: str, tensors: Mapping[str, np.ndarray],
                           rules: Sequence[Rule] | None = None, hf_config: Mapping[str, Any] | None = None) -> dict:
    """Maps named HF tensors to ``{"params": ..., "moe_bias": ...}``, checking names and shapes."""
    tensors = _unfuse_experts(dict(tensors), model_type)
    rules = rules_for(cfg, model_type, hf_config) if rules is None else rules
    needed = {n for r in rules for n in r.hf}
    missing = sorted(needed - set(tensors))
    if missing:
        raise InteropError(f"checkpoint is missing {len(missing)} tensor(s) this {model_type} config needs: "
                           f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    unused = sorted(k for k in set(tensors) - needed if not k.endswith(IGNORED_SUFFIXES))
    if unused:
        raise InteropError(f"checkpoint has {len(unused)} tensor(s) that this {model_type} config does not use "
                           f"(an unsupported option, or a config.json that does not match the weights): "
                           f"{unused[:8]}{' ...' if len(unused) > 8 else ''}")
    variables = map_tensors(rules, tensors)
    _check_against_model(cfg, variables)
    return variables


def _check_against_model(cfg: ModelConfig, variables: dict) -> None:
    """The mapped tree must equal the model's own parameter tree, leaf for leaf and shape for shape."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from ling_jax.model import Transformer

    shapes = jax.eval_shape(lambda: nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))))
    for collection in set(shapes) | set(variables):
        want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(shapes.get(collection, {}))}
        got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(variables.get(collection, {}))}
        if want != got:
            diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            raise InteropError(f"imported {collection} do not match the ling-jax model at {diff[:6]} "
                               f"(model: {[want.get(k) for k in diff[:6]]}, imported: {[got.get(k) for k in diff[:6]]})")


def load_hf(path: str | pathlib.Path, *, max_seq_len: int | None = None) -> tuple[ModelConfig, dict, dict]:
    """``(ModelConfig, variables, hf_config)`` of a Hugging Face model directory."""
    hf_cfg = read_hf_config(path)
    cfg = config_from_hf(hf_cfg, max_seq_len=max_seq_len, source=str(pathlib.Path(path) / "config.json"))
    variables = variables_from_tensors(cfg, hf_cfg["model_type"], read_tensors(path), hf_config=hf_cfg)
    return cfg, variables, hf_cfg


def tensors_from_variables(cfg: ModelConfig, model_type: str, variables: Mapping,
                           hf_config: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    out = {}
    for r in rules_for(cfg, model_type, hf_config):
        value = np.asarray(_get(variables.get(r.collection, {}), r.path), np.float32)
        for name, t in zip(r.hf, r.to_hf(value)):
            out[name] = np.ascontiguousarray(t, np.float32)
    return out


def save_hf(path: str | pathlib.Path, cfg: ModelConfig, variables: Mapping, model_type: str, *,
            base_config: Mapping[str, Any] | None = None, max_shard_bytes: int | None = None) -> pathlib.Path:
    """Writes config.json and model.safetensors (or shards + index when ``max_shard_bytes`` is set)."""
    _require_safetensors()
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_cfg = config_to_hf(cfg, model_type, base_config)
    tensors = tensors_from_variables(cfg, model_type, {k: dict(v) for k, v in variables.items()}, hf_cfg)
    names = sorted(tensors)
    shards, current, size = [], [], 0
    for n in names:
        nbytes = tensors[n].nbytes
        if current and max_shard_bytes and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(n)
        size += nbytes
    shards.append(current)
    for old in list(path.glob("*.safetensors")) + [path / INDEX]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file({n: tensors[n] for n in shards[0]}, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in shard}, str(path / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
        total = sum(t.nbytes for t in tensors.values())
        (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    return path
