"""Device-mesh configuration (:class:`MeshConfig`), beside :mod:`ling_jax.sharding`; re-exported by
:mod:`ling_jax.config`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from ling_jax.config_base import ConfigError

if TYPE_CHECKING:
    from ling_jax.config import ModelConfig


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
