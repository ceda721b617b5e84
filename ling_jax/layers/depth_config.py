"""Configuration of adaptive depth (Mixture-of-Depths and early exit, :class:`DepthConfig`), beside
``depth.py``; re-exported by :mod:`ling_jax.config`."""

from __future__ import annotations

from dataclasses import dataclass

from ling_jax.config_base import ConfigError, _in_range, _non_negative, _one_of


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
