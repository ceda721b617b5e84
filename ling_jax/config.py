"""The run configuration: :class:`ModelConfig`, :class:`TrainConfig`, :class:`DataConfig` composed
into :class:`Config`, and the override logic.

Every config validates itself in ``__post_init__`` and raises :class:`ConfigError` naming the
field and what is allowed. The mechanism configs live beside their layers
(``layers/pruning_config.py``, ``layers/moe_config.py``, ``layers/depth_config.py``), ``MeshConfig``
beside sharding (``sharding_config.py``) and the named presets in :mod:`ling_jax.presets`; all are
re-exported here. Command-line overrides go through :func:`apply_overrides` (``model.d_model=512``
or ``--model.d_model 512``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ling_jax.config_base import (ConfigError, _in_range, _non_negative, _one_of, _positive, _positive_float,
                                  layer_list)
from ling_jax.layers.depth_config import DepthConfig
from ling_jax.layers.moe_config import MoEConfig
from ling_jax.layers.pruning_config import PruningConfig
from ling_jax.sharding_config import MeshConfig

# Re-exported: the mechanism configs live beside their layers, MeshConfig beside sharding, the
# presets in ling_jax.presets; `from ling_jax.config import PruningConfig` keeps working.
__all__ = ["ConfigError", "layer_list", "PruningConfig", "MoEConfig", "DepthConfig", "RopeScalingConfig",
           "ModelConfig", "TrainConfig", "DataConfig", "MeshConfig", "Config", "PRESETS", "get_preset",
           "apply_overrides", "to_dict", "from_dict"]


def __getattr__(name: str):
    # presets.py builds Config objects, so it imports this module; resolve its names lazily.
    if name in ("PRESETS", "get_preset"):
        from ling_jax import presets

        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- model / train / data


ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScalingConfig:
    """Rotary frequency scaling for long context (see ``ling_jax.layers.basics.rope_frequencies``).

    ``kind="linear"`` divides every frequency by ``factor``; ``"llama3"`` (Llama 3.1) divides the
    low frequencies (wavelength above ``original_max_len / low_freq_factor``) by ``factor``, keeps
    the high ones (below ``original_max_len / high_freq_factor``) and interpolates in between;
    ``"yarn"`` blends interpolated and original frequencies over the dimensions between the
    ``beta_fast`` and ``beta_slow`` rotation counts and scales cos/sin by ``attention_factor``
    (0: ``0.1 ln(factor) + 1``). Formulas as in Hugging Face transformers' rope utilities.
    """

    kind: str = "none"  # none | linear | llama3 | yarn
    factor: float = 1.0
    original_max_len: int = 0  # llama3 / yarn: the context length the model was pretrained at
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float = 0.0  # yarn: cos/sin scale; 0 = 0.1 * ln(factor) + 1
    truncate: bool = True  # yarn: round the correction range to whole dimensions

    def __post_init__(self):
        _one_of(self, "kind", ROPE_SCALINGS)
        _non_negative(self, "original_max_len", "attention_factor")
        for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"RopeScalingConfig.{name} must be > 0, got {value!r}")
        if self.kind in ("llama3", "yarn") and self.original_max_len <= 0:
            raise ConfigError(f"RopeScalingConfig.original_max_len must be a positive integer for kind={self.kind!r}")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError(f"RopeScalingConfig.high_freq_factor ({self.high_freq_factor}) must be > "
                              f"low_freq_factor ({self.low_freq_factor}) for kind='llama3'")


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3; ``ModelConfig.attention="mla"``, see
    ``ling_jax.layers.mla``): queries through a rank-``q_lora_rank`` bottleneck (0: one plain
    projection), keys and values up-projected from a shared rank-``kv_lora_rank`` latent, each head's
    query/key split into ``qk_nope_head_dim`` dims without RoPE and ``qk_rope_head_dim`` rotary dims
    (the key's rotary part shared by all heads), values of ``v_head_dim``. The softmax scale is
    ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``, times ``(0.1 * mscale_all_dim * ln(factor) + 1) ** 2``
    when ``mscale_all_dim > 0`` and ``ModelConfig.rope_scaling`` has a ``factor > 1`` (DeepSeek's YaRN)."""

    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    mscale_all_dim: float = 0.0

    def __post_init__(self):
        _non_negative(self, "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"MLAConfig.{name} must be an integer, got {getattr(self, name)!r}")
        _non_negative(self, "mscale_all_dim")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0: d_model // num_heads
    mlp_dim: int = 384
    max_seq_len: int = 256
    rope_base: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dtype: str = "float32"  # compute dtype; params are always float32
    remat: str = "none"  # none | block
    attention_impl: str = "auto"  # reference | xla | pallas | auto
    pruning: PruningConfig = field(default_factory=PruningConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    # Pretrained-architecture knobs (ling_jax/interop): all off by default.
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    qk_norm: str = "none"  # none | head (RMSNorm per head before RoPE: Qwen3) | full (over all heads: OLMoE)
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    attention: str = "mha"  # mha (grouped-query) | mla (multi-head latent attention, DeepSeek-V3; dims in ``mla``)
    mla: MLAConfig = field(default_factory=MLAConfig)

    def __post_init__(self):
        _positive(self, "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "max_seq_len")
        _one_of(self, "qk_norm", ("none", "head", "full"))
        _non_negative(self, "head_dim")
        _one_of(self, "dtype", ("float32", "bfloat16", "float16"))
        _one_of(self, "remat", ("none", "block"))
        _one_of(self, "attention_impl", ("reference", "xla", "pallas", "auto"))
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"ModelConfig.num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim == 0 and self.d_model % self.num_heads:
            raise ConfigError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}) "
                "unless head_dim is set"
            )
        if self.resolved_head_dim % 2:
            raise ConfigError(f"ModelConfig head_dim ({self.resolved_head_dim}) must be even for rotary embeddings")
        _positive_float(self, "rope_base", "norm_eps")
        self._check_attention()
        # Resolve layer selections now so a bad one fails at construction time.
        self.pruning_layers, self.moe_layers, self.mod_layers, self.exit_layers  # noqa: B018

    def _check_attention(self) -> None:
        _one_of(self, "attention", ("mha", "mla"))
        m = self.mla
        if self.attention == "mha":
            if m != MLAConfig():
                raise ConfigError("ModelConfig.mla is set but ModelConfig.attention is 'mha': set attention='mla' "
                                  "to use multi-head latent attention")
            return
        for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if getattr(m, name) <= 0:
                raise ConfigError(f"ModelConfig.mla.{name} must be a positive integer with attention='mla', "
                                  f"got {getattr(m, name)!r}")
        if m.qk_rope_head_dim % 2:
            raise ConfigError(f"ModelConfig.mla.qk_rope_head_dim ({m.qk_rope_head_dim}) must be even for rotary embeddings")
        if self.num_kv_heads != self.num_heads:
            raise ConfigError(f"attention='mla' gives every head its own keys and values: ModelConfig.num_kv_heads "
                              f"({self.num_kv_heads}) must equal num_heads ({self.num_heads})")
        for name, off in (("qkv_bias", False), ("qk_norm", "none")):
            if getattr(self, name) != off:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r} is not supported with attention='mla' "
                                  f"(allowed: {off!r})")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def pruning_layers(self) -> tuple[int, ...]:
        if not self.pruning.enabled:
            return ()
        return layer_list(self.pruning.layers, self.num_layers, field_name="ModelConfig.pruning.layers")

    @property
    def moe_layers(self) -> tuple[int, ...]:
        if not self.moe.enabled:
            return ()
        return layer_list(self.moe.layers, self.num_layers, field_name="ModelConfig.moe.layers")

    @property
    def mod_layers(self) -> tuple[int, ...]:
        if not self.depth.mod_enabled:
            return ()
        return layer_list(self.depth.mod_layers, self.num_layers, field_name="ModelConfig.depth.mod_layers")

    @property
    def exit_layers(self) -> tuple[int, ...]:
        if not self.depth.exit_enabled:
            return ()
        return layer_list(self.depth.exit_layers, self.num_layers, field_name="ModelConfig.depth.exit_layers")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16
    seq_len: int = 128
    steps: int = 200
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    beta2: float = 0.95
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # learning rate of the pruning scorers / the rest: new small modules on a trained model (a
    # retrofit) need larger steps than the weights they sit on (Adam moves a weight ~lr per step)
    scorer_lr_scale: float = 1.0

    def __post_init__(self):
        _positive_float(self, "scorer_lr_scale")
        _positive(self, "batch_size", "seq_len", "steps", "log_every", "eval_batches", "checkpoint_every", "keep_checkpoints")
        _non_negative(self, "warmup_steps", "weight_decay", "grad_clip", "eval_every", "seed")
        _in_range(self, "min_lr_ratio", 0.0, 1.0)
        _in_range(self, "beta2", 0.0, 1.0, hi_open=True)
        _positive_float(self, "learning_rate")


TASK_NAMES = ("text", "mqar", "needle", "multihop")


@dataclass(frozen=True)
class DataConfig:
    task: str = "text"  # text | mqar | needle | multihop
    path: str = ""  # text: a file or directory; "" = the Python standard library sources
    validation_fraction: float = 0.05
    task_options: str = ""  # synthetic task knobs, "num_pairs=4,filler_fraction=0.9"
    tokenizer: str = ""  # text: a Hugging Face tokenizer.json (or its directory); "" = bytes (ling_jax/data/subword.py)

    def __post_init__(self):
        _one_of(self, "task", TASK_NAMES)
        if self.tokenizer and self.task != "text":
            raise ConfigError(f"DataConfig.tokenizer applies to task='text' only, got task={self.task!r}")
        _in_range(self, "validation_fraction", 0.0, 0.5, lo_open=True)
        self.task_kwargs()  # noqa: B018  (parse now so a bad string fails at construction)

    def task_kwargs(self) -> dict[str, str]:
        """Parses `task_options` into {name: raw string}; the task config coerces and validates."""
        out = {}
        for part in filter(None, (p.strip() for p in self.task_options.split(","))):
            if "=" not in part:
                raise ConfigError(f"DataConfig.task_options entries look like name=value, got {part!r}")
            key, value = part.split("=", 1)
            out[key.strip()] = value.strip()
        return out


@dataclass(frozen=True)
class Config:
    """Everything one run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    preset: str = ""

    def __post_init__(self):
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"TrainConfig.seq_len ({self.train.seq_len}) is larger than the model supports "
                f"(ModelConfig.max_seq_len = {self.model.max_seq_len})"
            )
        self.mesh.check_fits(self.model, self.train.batch_size)  # axes at -1 are checked when the mesh is built


# ----------------------------------------------------------------------------- overrides


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    """A command-line string parsed as the field's declared type, or a Python value checked
    against it (an int is a valid float; a bool is not an int)."""
    kind = _TYPES.get(annotation, annotation) if isinstance(annotation, str) else annotation
    if kind not in _TYPES.values():
        return value
    if not isinstance(value, str):
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise ConfigError(f"override {path}: expected {kind.__name__}, got {value!r} ({type(value).__name__})")
        return value
    try:
        if kind is bool:
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
    except ValueError:
        allowed = " (true/false/1/0/yes/no)" if kind is bool else ""
        raise ConfigError(f"override {path}: cannot parse {value!r} as {kind.__name__}{allowed}") from None
    return value


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """Command-line overrides as {dotted name: string}: ``section.field=value``, ``--section.field=value``
    or ``--section.field value`` (the CLI's form); anything else is an error naming the item."""
    out, i = {}, 0
    items = list(items)
    while i < len(items):
        item = items[i]
        dashed = item.startswith("--")
        key = item[2:] if dashed else item
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif dashed:
            if i + 1 >= len(items):
                raise ConfigError(f"override --{key} needs a value")
            value, i = items[i + 1], i + 2
        else:
            raise ConfigError(f"unexpected argument {item!r}; overrides look like --model.d_model 512 "
                              "or model.d_model=512")
        if "." not in key:
            raise ConfigError(f"unknown option --{key}; overrides look like --section.field VALUE "
                              f"(sections: {', '.join(f.name for f in dataclasses.fields(Config) if f.name != 'preset')})")
        out[key.strip()] = value.strip()  # the same spelling given twice: the last wins, as with argparse
    return out


def _record_path(obj: Any, parts: list[str], value: Any, full: str, changes: dict) -> None:
    """Checks one override against the config tree (field name, value type) and records it in
    ``changes``, a nested dict mirroring the dataclasses. Nothing is built or validated yet."""
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"unknown override key {full!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    name = parts[0]
    if name not in fields:
        raise ConfigError(
            f"unknown override key {full!r}: {type(obj).__name__} has no field {name!r}; "
            f"allowed: {sorted(n for n in fields if n != 'preset')}"
        )
    if len(parts) == 1:
        if dataclasses.is_dataclass(getattr(obj, name)):
            raise ConfigError(f"override {full!r} names a config group; set one of its fields, e.g. {full}.<field>")
        changes[name] = _coerce(value, fields[name].type, full)
    else:
        _record_path(getattr(obj, name), parts[1:], value, full, changes.setdefault(name, {}))


def _rebuild(obj: Any, changes: Mapping[str, Any]) -> Any:
    """``obj`` with all recorded changes: each touched dataclass is rebuilt (so validated) once,
    innermost first, with every override that concerns it already in place."""
    new = {name: _rebuild(getattr(obj, name), value) if dataclasses.is_dataclass(getattr(obj, name)) else value
           for name, value in changes.items()}
    return dataclasses.replace(obj, **new)


def apply_overrides(config: Any, overrides: Mapping[str, Any] | Sequence[str]) -> Any:
    """Applies ``{"model.d_model": "512"}`` / ``{"model.d_model": 512}`` or ``["model.d_model=512", ...]``
    overrides: the one override mechanism of the CLI and the experiment grids. ``config`` is a
    :class:`Config` or any config dataclass inside one (``ModelConfig``: ``{"pruning.threshold": 0.3}``).

    All overrides are applied together and validated once, so settings that are only valid in
    combination (``model.num_layers`` with a layer list, a pruning baseline with the mode it needs)
    can be given in any order. Unknown keys and unparsable values fail before anything is built.
    """
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    changes: dict = {}
    for key, value in overrides.items():
        _record_path(config, key.split("."), value, key, changes)
    return _rebuild(config, changes)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def from_dict(data: Mapping[str, Any]) -> Config:
    """Inverse of :func:`to_dict` (used to check a workdir's saved config)."""

    def build(cls, values):
        kwargs = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                v = build(hint, v)
            elif isinstance(v, list):
                v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
            kwargs[f.name] = v
        return cls(**kwargs)

    return build(Config, data)
