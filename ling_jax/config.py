"""Frozen, self-validating configuration dataclasses and named presets.

Every config validates itself in ``__post_init__`` and raises :class:`ConfigError` naming the
field and what is allowed. Presets are plain functions of nothing; command-line overrides go
through :func:`apply_overrides` (``model.d_model=512`` or ``--model.d_model 512``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


# ----------------------------------------------------------------------------- validation helpers


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


def _non_negative(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
            raise ConfigError(f"{type(obj).__name__}.{name} must be >= 0 and finite, got {value!r}")


def _positive_float(obj, *names: str) -> None:
    """Finite and > 0 (rejects NaN and inf, which would train to NaN)."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
            raise ConfigError(f"{type(obj).__name__}.{name} must be > 0 and finite, got {value!r}")


def _one_of(obj, name: str, allowed: Sequence[Any]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(f"{type(obj).__name__}.{name} must be one of {list(allowed)}, got {value!r}")


def _in_range(obj, name: str, lo: float, hi: float, *, lo_open=False, hi_open=False) -> None:
    value = getattr(obj, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"{type(obj).__name__}.{name} must be in {interval}, got {value!r}")


def layer_list(spec: str | Sequence[int], num_layers: int, *, field_name: str) -> tuple[int, ...]:
    """Parses a layer selection: "all", "none", "from:2", "every:2", "every:2:1" (offset), "0,3,5"."""
    if not isinstance(spec, str):
        layers = tuple(int(i) for i in spec)
    elif spec == "all":
        layers = tuple(range(num_layers))
    elif spec == "none" or spec == "":
        layers = ()
    elif spec.startswith("from:"):
        layers = tuple(range(int(spec[5:]), num_layers))
    elif spec.startswith("every:"):
        parts = [int(p) for p in spec[6:].split(":")]
        step, offset = parts[0], parts[1] if len(parts) > 1 else 0
        if step <= 0:
            raise ConfigError(f"{field_name}: step in {spec!r} must be positive")
        layers = tuple(range(offset, num_layers, step))
    else:
        try:
            layers = tuple(int(p) for p in spec.split(","))
        except ValueError:
            raise ConfigError(
                f"{field_name} must be 'all', 'none', 'from:L', 'every:N[:offset]' or a comma list "
                f"of layer indices, got {spec!r}"
            ) from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"{field_name} selects layers {bad} that do not exist (model has {num_layers} layers: 0..{num_layers - 1})")
    return tuple(sorted(set(layers)))


# ----------------------------------------------------------------------------- mechanism configs


@dataclass(frozen=True)
class PruningConfig:
    """Learned dynamic token pruning (see ``ling_jax/layers/pruning.py``).

    Each pruning layer scores every token (higher = keep). ``mode="soft"`` (training) adds the
    log keep-probability ``log sigmoid(score / temperature)`` to the attention logits of keys
    outside the sinks and the window; the temperature anneals geometrically from ``temperature``
    to ``final_temperature`` over ``anneal_steps`` and a regulariser (``loss_pruning_keep``) drives
    the mean keep probability to ``target_keep_ratio``. ``mode="hard"`` (inference) decides:
    ``inference_rule="threshold"`` keeps a token if ``sigmoid(score) >= threshold``;
    ``"budget"`` lets each query see at most ``budget`` keys: the ``num_sinks`` first tokens, its
    ``window`` most recent tokens and the highest-scoring older ones (exactly what a KV cache of
    ``budget`` slots that evicts its lowest-scoring entry holds). ``compaction`` removes pruned
    tokens from the sequence of later layers (static capacity ``budget``). ``baseline`` swaps the
    learned scorer for a training-free policy at the same budget.
    """

    enabled: bool = False
    layers: str = "from:1"  # which layers score tokens (see `layer_list`); layers above inherit the mask
    scorer: str = "linear"  # linear | lowrank
    scorer_rank: int = 16
    mode: str = "soft"  # soft (training, differentiable) | hard (inference)
    target_keep_ratio: float = 0.5
    regularizer_weight: float = 1.0
    temperature: float = 1.0  # soft-mask temperature at step 0
    final_temperature: float = 0.1  # reached after anneal_steps (toward a hard decision)
    anneal_steps: int = 0  # 0: constant temperature
    inference_rule: str = "threshold"  # threshold | budget
    threshold: float = 0.5  # threshold rule: keep if sigmoid(score) >= threshold
    budget: int = 64  # max keys per query / KV-cache slots per layer (including sinks and window)
    num_sinks: int = 1
    window: int = 8  # recent tokens always visible (>= 1: a query always sees itself)
    cascade: bool = True  # a token pruned at layer l stays pruned above (keep flags AND, log-keeps add)
    compaction: bool = False  # hard mode: drop pruned tokens from the sequence of later layers
    baseline: str = "learned"  # learned | random | window | h2o | tova | oracle
    seed: int = 0  # random baseline

    def __post_init__(self):
        _one_of(self, "scorer", ("linear", "lowrank"))
        _one_of(self, "mode", ("soft", "hard"))
        _one_of(self, "inference_rule", ("threshold", "budget"))
        _one_of(self, "baseline", ("learned", "random", "window", "h2o", "tova", "oracle"))
        _positive(self, "scorer_rank", "budget", "window")
        _non_negative(self, "num_sinks", "regularizer_weight", "anneal_steps", "seed")
        _in_range(self, "target_keep_ratio", 0.0, 1.0, lo_open=True)
        _in_range(self, "threshold", 0.0, 1.0)
        _positive_float(self, "temperature", "final_temperature")
        if self.budget < self.num_sinks + self.window:
            raise ConfigError(
                f"PruningConfig.budget ({self.budget}) must be >= num_sinks + window "
                f"({self.num_sinks} + {self.window})"
            )
        if self.baseline != "learned" and self.mode != "hard":
            raise ConfigError(f"PruningConfig.baseline={self.baseline!r} is a hard mask: set mode='hard' "
                              "(mode='soft' is for training the learned scorer)")
        if self.baseline in ("random", "window", "h2o", "tova") and self.inference_rule != "budget":
            raise ConfigError(f"PruningConfig.baseline={self.baseline!r} ranks keys under a budget: set "
                              "inference_rule='budget' (threshold works for 'learned' and 'oracle')")
        if self.compaction and self.mode != "hard":
            raise ConfigError("PruningConfig.compaction needs mode='hard' (soft masks prune nothing)")
        if self.compaction and self.baseline in ("h2o", "tova"):
            raise ConfigError(f"PruningConfig.compaction cannot be used with baseline={self.baseline!r}: "
                              "its scores come from attention during decoding (ling_jax.generate)")


@dataclass(frozen=True)
class MoEConfig:
    """Sparse top-k mixture of experts (see ``ling_jax/layers/moe.py``).

    The router picks ``top_k`` of ``num_experts + num_zero_experts`` choices per token. Zero-compute
    experts do no FFN work: the token gets ``weight * x`` (``zero_expert_output="identity"``, as in
    LongCat-Flash) or nothing (``"zero"``). ``num_shared_experts`` always-on SwiGLU experts of
    ``expert_dim`` run on every token. MoE layers are chosen by ``layers`` (`layer_list` syntax):
    "every:2:1" keeps layer 0 dense and makes every second layer from 1 on an MoE layer.
    ``capacity_factor`` 0 is dropless; > 0 caps each expert at ceil(cf * tokens * top_k /
    num_experts) assignments (first choices first, then by position; overflow contributes zero).
    ``bias_update_rate`` > 0 enables aux-loss-free balancing: a per-choice bias (collection
    ``moe_bias``) added to the scores for selection only, moved by the rate toward the mean load
    after every step. ``jitter`` > 0 multiplies the router input by U(1 - jitter, 1 + jitter)
    when the caller passes a ``"jitter"`` rng (the train step does; evaluation does not).
    """

    enabled: bool = False
    num_experts: int = 8
    top_k: int = 2
    expert_dim: int = 0  # 0: use ModelConfig.mlp_dim
    num_shared_experts: int = 0
    num_zero_experts: int = 0
    zero_expert_output: str = "identity"  # identity | zero
    layers: str = "from:0"
    router: str = "softmax"  # softmax | sigmoid
    normalize_weights: bool = True  # renormalise the top-k weights to sum to 1 (then * route_scale)
    num_groups: int = 1  # group-limited routing: groups of choices ...
    top_groups: int = 1  # ... of which the best `top_groups` stay eligible
    route_scale: float = 1.0
    capacity_factor: float = 0.0  # 0.0 = dropless
    dispatch: str = "auto"  # reference | dense | sorted | pallas | auto
    jitter: float = 0.0
    load_balance_weight: float = 0.01
    z_loss_weight: float = 0.001
    bias_update_rate: float = 0.0  # aux-loss-free balancing; 0 disables
    routing_bias: bool = False  # own the selection bias even at bias_update_rate 0 (a checkpoint's correction bias)
    shared_gate: bool = False  # scale the shared experts' output by sigmoid(x . w) per token (Qwen2-MoE)

    @property
    def has_routing_bias(self) -> bool:
        """Whether MoE layers own the per-choice selection bias (collection ``moe_bias``)."""
        return self.routing_bias or self.bias_update_rate > 0

    def __post_init__(self):
        _positive(self, "num_experts", "top_k", "num_groups", "top_groups")
        _non_negative(self, "expert_dim", "num_shared_experts", "num_zero_experts", "jitter",
                      "load_balance_weight", "z_loss_weight", "bias_update_rate", "capacity_factor")
        _one_of(self, "router", ("softmax", "sigmoid"))
        _one_of(self, "dispatch", ("reference", "dense", "sorted", "pallas", "auto"))
        _one_of(self, "zero_expert_output", ("identity", "zero"))
        if not self.jitter < 1:
            raise ConfigError(f"MoEConfig.jitter must be in [0, 1), got {self.jitter!r}")
        _positive_float(self, "route_scale")
        if self.shared_gate and not self.num_shared_experts:
            raise ConfigError("MoEConfig.shared_gate gates the shared experts: set num_shared_experts >= 1")
        total = self.num_experts + self.num_zero_experts
        if self.top_k > total:
            raise ConfigError(f"MoEConfig.top_k ({self.top_k}) must be <= num_experts + num_zero_experts ({total})")
        if total % self.num_groups:
            raise ConfigError(f"MoEConfig.num_groups ({self.num_groups}) must divide num_experts + num_zero_experts ({total})")
        if self.top_groups > self.num_groups:
            raise ConfigError(f"MoEConfig.top_groups ({self.top_groups}) must be <= num_groups ({self.num_groups})")
        eligible = self.top_groups * (total // self.num_groups)
        if self.top_k > eligible:
            raise ConfigError(
                f"MoEConfig.top_k ({self.top_k}) must be <= top_groups * choices per group "
                f"({self.top_groups} * {total // self.num_groups} = {eligible})"
            )


@dataclass(frozen=True)
class DepthConfig:
    """Adaptive depth: Mixture-of-Depths routing and early exit (see ``ling_jax/layers/depth.py``).

    ``mode="train"``: MoD routes the top ``mod_capacity`` of each sequence (compacted, non-causal)
    and every exit head is trained; ``mode="infer"``: MoD uses the causal ``mod_inference`` rule
    and tokens whose confidence exceeds the (decaying) ``exit_threshold`` stop at that layer.
    """

    mode: str = "train"  # train | infer
    mod_enabled: bool = False
    mod_layers: str = "every:2:1"
    mod_capacity: float = 0.125
    mod_inference: str = "predictor"  # predictor | threshold | topk (non-causal, as in training)
    mod_threshold: float = 0.5  # on sigmoid(router score), mod_inference="threshold"
    mod_predictor_threshold: float = 0.5  # route when sigmoid(predictor) > this, mod_inference="predictor"
    mod_weight: str = "straight_through"  # straight_through (forward scale 1) | sigmoid (scale sigmoid(score))
    predictor_dim: int = 64  # hidden width of the MoD predictor and exit classifier MLPs; 0 = linear
    aux_loss_weight: float = 1.0  # BCE weight of the MoD predictor and the exit classifier
    exit_enabled: bool = False
    exit_layers: str = "all"  # the last layer is never an exit (the final head covers it)
    exit_confidence: str = "margin"  # margin | saturation | classifier
    exit_threshold: float = 1.0  # exit when confidence > threshold; the top of the range never exits
    exit_decay: float = 0.0  # threshold(pos) = lo + (threshold - lo) * exp(-decay * pos / max_seq_len)
    exit_loss_weight: float = 1.0  # weight of the mean per-exit-layer cross-entropy
    exit_train_freeze: float = 0.0  # training: this fraction of tokens exits at a random exit (carried up)
    # inference: static capacities (fractions of the sequence) for the variable number of tokens a
    # block, exit head or final head computes; the smallest that holds the batch's count runs
    # (0: the empty bucket, nothing computed); "1.0" alone: every token in every layer, masked.
    # Without 1, a fixed capacity: tokens beyond it (the latest) skip the block, carried up.
    infer_buckets: str = "0,0.125,0.25,0.5,1.0"

    def __post_init__(self):
        _one_of(self, "mode", ("train", "infer"))
        _in_range(self, "mod_capacity", 0.0, 1.0, lo_open=True)
        _one_of(self, "mod_inference", ("predictor", "threshold", "topk"))
        _in_range(self, "mod_threshold", 0.0, 1.0)
        _in_range(self, "mod_predictor_threshold", 0.0, 1.0, lo_open=True, hi_open=True)
        _one_of(self, "mod_weight", ("straight_through", "sigmoid"))
        _one_of(self, "exit_confidence", ("margin", "saturation", "classifier"))
        _non_negative(self, "predictor_dim", "aux_loss_weight", "exit_decay", "exit_loss_weight")
        _in_range(self, "exit_train_freeze", 0.0, 1.0, hi_open=True)
        self.bucket_fractions  # validates infer_buckets
        lo, hi = self.confidence_range
        if not (isinstance(self.exit_threshold, (int, float)) and not isinstance(self.exit_threshold, bool)
                and lo <= self.exit_threshold <= hi):
            raise ConfigError(
                f"DepthConfig.exit_threshold must be in [{lo}, {hi}] for exit_confidence="
                f"{self.exit_confidence!r}, got {self.exit_threshold!r}"
            )

    @property
    def bucket_fractions(self) -> tuple[float, ...]:
        """``infer_buckets`` parsed: comma-separated fractions in [0, 1]."""
        try:
            fractions = tuple(float(f) for f in str(self.infer_buckets).split(","))
        except ValueError:
            fractions = ()
        if not fractions or not all(0.0 <= f <= 1.0 for f in fractions):
            raise ConfigError("DepthConfig.infer_buckets must be comma-separated fractions in [0, 1] "
                              f"(e.g. '0,0.125,0.25,0.5,1'; '1' alone: no skipping), got {self.infer_buckets!r}")
        return fractions

    @property
    def confidence_range(self) -> tuple[float, float]:
        """The range of the exit confidence: margin and classifier in [0, 1], saturation in [-1, 1]."""
        return (-1.0, 1.0) if self.exit_confidence == "saturation" else (0.0, 1.0)


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

    def __post_init__(self):
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
class MeshConfig:
    """Device mesh axis sizes; one may be -1 to take the remaining devices.

    ``data`` splits the batch; ``fsdp`` splits the batch and shards weights and optimizer state
    (ZeRO-3); ``tensor`` shards heads and hidden units (Megatron); ``expert`` shards MoE experts
    and splits the batch outside the MoE layers. See ``ling_jax/sharding.py`` for the rules.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def __post_init__(self):
        sizes = self.axis_sizes()
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or (value <= 0 and value != -1):
                raise ConfigError(f"MeshConfig.{name} must be a positive integer or -1, got {value!r}")
        filled = [name for name, v in sizes.items() if v == -1]
        if len(filled) > 1:
            raise ConfigError(f"MeshConfig: at most one axis may be -1 (fill the devices), got -1 for {filled}")

    def axis_sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor, "expert": self.expert}

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Concrete axis sizes for `num_devices` devices (the -1 axis takes what is left)."""
        sizes = self.axis_sizes()
        fixed = math.prod(v for v in sizes.values() if v != -1)
        product = " * ".join(f"{k}={v}" for k, v in sizes.items())
        filled = [name for name, v in sizes.items() if v == -1]
        if filled:
            if num_devices % fixed:
                raise ConfigError(f"MeshConfig: the fixed axes ({product}) multiply to {fixed}, which does not "
                                  f"divide the {num_devices} devices, so MeshConfig.{filled[0]}=-1 cannot fill them")
            sizes[filled[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ConfigError(f"MeshConfig: axis sizes {product} multiply to {fixed}, but there are {num_devices} "
                              "devices; the product must equal the device count (or set one axis to -1)")
        return sizes

    def check_fits(self, model: "ModelConfig", batch_size: int, sizes: Mapping[str, int] | None = None) -> None:
        """Raises ConfigError if the model or batch cannot be split evenly over the mesh axes.

        ``sizes`` defaults to the configured sizes; an axis still at -1 is not checked.
        """
        sizes = dict(sizes or self.axis_sizes())
        known = lambda name: sizes[name] if sizes[name] > 0 else 1  # noqa: E731
        checks = [("tensor", "ModelConfig.num_heads", model.num_heads),
                  ("tensor", "ModelConfig.num_kv_heads", model.num_kv_heads),
                  ("tensor", "ModelConfig.mlp_dim", model.mlp_dim),
                  ("tensor", "ModelConfig.vocab_size", model.vocab_size),
                  ("fsdp", "ModelConfig.d_model", model.d_model)]
        if model.moe.enabled:
            checks += [("expert", "ModelConfig.moe.num_experts", model.moe.num_experts),
                       # the router's columns (real + zero-compute experts) are split over `expert` too
                       ("expert", "ModelConfig.moe.num_experts + num_zero_experts",
                        model.moe.num_experts + model.moe.num_zero_experts),
                       ("tensor", "ModelConfig.moe.expert_dim", model.moe.expert_dim or model.mlp_dim)]
        for axis, what, value in checks:
            if value % known(axis):
                raise ConfigError(f"MeshConfig.{axis} ({known(axis)}) must divide {what} ({value})")
        batch_shards = known("data") * known("fsdp") * known("expert")
        if batch_size % batch_shards:
            raise ConfigError(f"TrainConfig.batch_size ({batch_size}) must be divisible by the batch shards "
                              f"MeshConfig.data * fsdp * expert = {batch_shards}")


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


# ----------------------------------------------------------------------------- presets


def _cpu_tiny() -> Config:
    """Seconds on a laptop: the test-suite preset."""
    return Config(
        model=ModelConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=192, max_seq_len=128),
        train=TrainConfig(batch_size=8, seq_len=64, steps=50, learning_rate=3e-3, warmup_steps=5,
                          checkpoint_every=25, eval_batches=2, log_every=5),
        preset="cpu-tiny",
    )


def _cpu_small() -> Config:
    """Dense, a few minutes on 2 CPU cores (the main job adds learned pruning: cpu-small-pruned)."""
    return Config(
        model=ModelConfig(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384, max_seq_len=256),
        train=TrainConfig(batch_size=16, seq_len=128, steps=400, learning_rate=3e-3, warmup_steps=30,
                          checkpoint_every=200, eval_batches=16, log_every=20),
        preset="cpu-small",
    )


def _cpu_small_pruned() -> Config:
    """The README main job: ``cpu-small`` trained with learned token pruning (soft mask annealed to
    a hard decision, keep ratio driven to 0.25 from layer 1 up), then swept at inference."""
    base = _cpu_small()
    pruning = PruningConfig(enabled=True, layers="from:1", mode="soft", target_keep_ratio=0.25, num_sinks=1,
                            window=8, budget=64, anneal_steps=base.train.steps, temperature=1.0,
                            final_temperature=0.1)
    return dataclasses.replace(base, model=dataclasses.replace(base.model, pruning=pruning),
                               preset="cpu-small-pruned")


def _cpu_base() -> Config:
    """About 30 minutes on 2 CPU cores (1.7M params, 4.9M training tokens)."""
    return Config(
        model=ModelConfig(d_model=192, num_layers=4, num_heads=6, num_kv_heads=2, mlp_dim=512, max_seq_len=256),
        train=TrainConfig(batch_size=16, seq_len=256, steps=1200, learning_rate=3e-3, warmup_steps=60,
                          checkpoint_every=200, eval_batches=32, log_every=25),
        preset="cpu-base",
    )


def _tpu_base() -> Config:
    """One TPU host (e.g. v5e-8 / v4-8): ~150M params, bf16 compute, FSDP over the host's chips.

    Not run here; sized so params + AdamW state + activations fit comfortably in 8 x 16 GB.
    """
    return Config(
        model=ModelConfig(d_model=1024, num_layers=12, num_heads=16, num_kv_heads=4, mlp_dim=2816,
                          max_seq_len=2048, dtype="bfloat16", remat="block", attention_impl="auto"),
        train=TrainConfig(batch_size=256, seq_len=2048, steps=20_000, learning_rate=1e-3, warmup_steps=1000,
                          checkpoint_every=1000, eval_batches=32, log_every=50),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, expert=1),
        preset="tpu-base",
    )


PRESETS: dict[str, Callable[[], Config]] = {
    "cpu-tiny": _cpu_tiny,
    "cpu-small": _cpu_small,
    "cpu-small-pruned": _cpu_small_pruned,
    "cpu-base": _cpu_base,
    "tpu-base": _tpu_base,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
    return PRESETS[name]()


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
        out[key.strip()] = value.strip()
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
