"""Configuration of learned token pruning (:class:`PruningConfig`), beside ``pruning.py``; re-exported by
:mod:`ling_jax.config`."""

from __future__ import annotations

from dataclasses import dataclass

from ling_jax.config_base import ConfigError, _in_range, _non_negative, _one_of, _positive, _positive_float, layer_list


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
    tokens from the sequence of later layers (static capacity ``budget``); ``compaction_start="this_layer"`` starts it inside the pruning layer
    (after its pruner, before its attention). ``baseline`` swaps the
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
    # next_layer: the pruning layer computes every token, later layers the kept ones; this_layer: the
    # pruning layer already computes queries, attention output and feed-forward for the kept tokens
    # only (every token still gives keys and values there), so a dropped token's own output comes
    # from its state before that layer: what a server needs, which reads no dropped token's output
    compaction_start: str = "next_layer"
    baseline: str = "learned"  # learned | random | window | h2o | tova | snapkv | oracle
    seed: int = 0  # random baseline

    def __post_init__(self):
        _one_of(self, "scorer", ("linear", "lowrank"))
        _one_of(self, "mode", ("soft", "hard"))
        _one_of(self, "inference_rule", ("threshold", "budget"))
        _one_of(self, "compaction_start", ("next_layer", "this_layer"))
        _one_of(self, "baseline", ("learned", "random", "window", "h2o", "tova", "snapkv", "oracle"))
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
        if self.baseline in ("random", "window", "h2o", "tova", "snapkv") and self.inference_rule != "budget":
            raise ConfigError(f"PruningConfig.baseline={self.baseline!r} ranks keys under a budget: set "
                              "inference_rule='budget' (threshold works for 'learned' and 'oracle')")
        if self.compaction and self.mode != "hard":
            raise ConfigError("PruningConfig.compaction needs mode='hard' (soft masks prune nothing)")
        if self.compaction_start == "this_layer" and not self.compaction:
            raise ConfigError("PruningConfig.compaction_start='this_layer' needs compaction=true")
