"""Configuration of sparse mixture-of-experts layers (:class:`MoEConfig`), beside ``moe.py``; re-exported by
:mod:`ling_jax.config`."""

from __future__ import annotations

from dataclasses import dataclass

from ling_jax.config_base import ConfigError, _non_negative, _one_of, _positive, _positive_float, layer_list


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
