"""Pruning sweep of a trained model: how much attention work each inference rule skips, and what
it costs in quality, on held-out batches.

For a model trained with learned pruning (``model.pruning.enabled``, soft mask), the sweep
evaluates the same weights under:

* ``keep_all``: hard mode with threshold 0 (nothing pruned): the reference quality;
* ``threshold``: keep a token where ``sigmoid(score) >= t``, for each ``t``;
* ``budget``: each query sees at most ``b`` keys (sinks, recent window, highest-scoring older
  tokens), for each ``b``; ``budget+compact`` also removes the tokens pruned at a layer from the
  sequence of every later layer (prefill compaction: far less work, but on a language-modelling
  loss the removed positions skip the later layers' processing of their own prediction too);
* training-free baselines at the same budgets (default: ``window``, sinks + recent window as in
  StreamingLLM), which ignore the learned scores.

Each row holds the keep ratio, the ledger's token reduction factor in its two kinds
(``token_reduction``: *computed*, FLOPs the dense model's compiled program executes / FLOPs this
variant's program executes; ``token_reduction_ideal``: dense causal FLOPs / FLOPs an ideal sparse
kernel would execute), the quality (bits per byte or accuracy) and the relative loss vs
``keep_all``. ``ling-jax train`` runs it after training whenever pruning is enabled; ``ling-jax
sweep --workdir W`` runs it on a finished workdir. The full multi-seed study with every baseline
and measured wall times is ``experiments/sweep_pruning.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from tqdm.auto import tqdm

from ling_jax.config import ConfigError, ModelConfig
from ling_jax.evaluation import evaluate, relative_loss

DEFAULT_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
BASELINES = ("random", "window", "h2o", "tova", "oracle")
_TEACHER_FORCED = ("h2o", "tova")  # read attention while decoding: evaluated through the KV cache


def default_budgets(cfg: ModelConfig, seq_len: int) -> tuple[int, ...]:
    """Keys per query at 1/8, 1/4 and 1/2 of the sequence, at least sinks + window + 1."""
    floor = cfg.pruning.num_sinks + cfg.pruning.window + 1
    return tuple(sorted({max(seq_len // d, floor) for d in (8, 4, 2) if max(seq_len // d, floor) < seq_len}))


def sweep_variants(
    cfg: ModelConfig,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    budgets: Sequence[int] = (),
    baselines: Sequence[str] = ("window",),
) -> list[tuple[str, Optional[float], ModelConfig]]:
    """(rule, value, inference config) of every point, the keep-all reference first."""
    if not cfg.pruning.enabled:
        raise ConfigError("a pruning sweep needs a model trained with pruning: model.pruning.enabled=true "
                          "(e.g. --preset cpu-small-pruned)")
    for name in baselines:
        if name not in BASELINES:
            raise ConfigError(f"pruning sweep baseline must be one of {BASELINES}, got {name!r}")
    for t in thresholds:
        if not 0.0 <= t <= 1.0:
            raise ConfigError(f"pruning sweep threshold must be in [0, 1], got {t!r}")
    out = [("keep_all", None, point_config(cfg, "keep_all"))]
    out += [("threshold", float(t), point_config(cfg, "threshold", t)) for t in thresholds]
    for b in budgets:
        out.append(("budget", int(b), point_config(cfg, "budget", b)))
        out.append(("budget+compact", int(b), point_config(cfg, "budget", b, compaction=True)))
        out += [(name, int(b), point_config(cfg, "budget", b, baseline=name)) for name in baselines]
    return out


def point_config(cfg: ModelConfig, rule: str, value: Optional[float] = None, *, compaction: bool = False,
                 baseline: str = "learned") -> ModelConfig:
    """The hard-mode inference config of one sweep point of ``cfg`` (pruning enabled): ``rule``
    ``"keep_all"`` (threshold 0: nothing pruned), ``"threshold"`` (keep if sigmoid(score) >= value;
    None: the config's threshold) or ``"budget"`` (``value`` keys per query, ``compaction``);
    ``baseline`` swaps the learned scorer for a training-free policy (``BASELINES``).
    PruningConfig validates each combination (e.g. budget >= sinks + window)."""
    if rule == "keep_all":
        fields = dict(inference_rule="threshold", threshold=0.0)
    elif rule == "threshold":
        fields = dict(inference_rule="threshold", **({} if value is None else {"threshold": float(value)}))
    elif rule == "budget":
        fields = dict(inference_rule="budget", budget=int(value))
    else:
        raise ConfigError(f"sweep point rule must be one of ['keep_all', 'threshold', 'budget'], got {rule!r}")
    pruning = dataclasses.replace(cfg.pruning, mode="hard", baseline=baseline, compaction=compaction, **fields)
    return dataclasses.replace(cfg, pruning=pruning)


def evaluate_point(vcfg: ModelConfig, variables: dict, batches: Sequence[dict], metric: str) -> dict:
    """:func:`ling_jax.evaluation.evaluate` of one sweep point. H2O and TOVA read attention while
    decoding, so they are evaluated through the KV cache, which has no ledger: their FLOP figures
    are those of the window policy at the same budget (a budget-b cache shows each query b keys)."""
    decode = vcfg.pruning.enabled and vcfg.pruning.baseline in _TEACHER_FORCED
    r = evaluate(vcfg, variables, batches, metric, decode=decode)
    if decode:
        window = dataclasses.replace(vcfg, pruning=dataclasses.replace(vcfg.pruning, baseline="window"))
        flops = evaluate(window, variables, batches, metric)
        r.update({k: flops[k] for k in ("trf_computed", "trf_ideal", "flops_dense", "flops_computed", "flops_ideal",
                                        "keep_ratio", "pair_ratio", "layers_per_token")})
        r["trf_from"] = "window policy at the same budget (same keys per query)"
    return r


def pruning_sweep(
    cfg: ModelConfig,
    variables: dict,
    batches: Sequence[dict],
    metric: str,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    budgets: Optional[Sequence[int]] = None,
    baselines: Sequence[str] = ("window",),
    progress: bool = True,
) -> list[dict]:
    """Evaluates every variant of :func:`sweep_variants` on ``batches`` (dicts of Batch fields).

    ``budgets=None``: :func:`default_budgets` of the batches' sequence length. Rows: ``rule``,
    ``value``, ``keep_ratio``, ``token_reduction`` (computed), ``token_reduction_ideal``, ``quality`` (``metric``: "bpb" or
    "accuracy"), ``rel_loss`` (positive = worse than ``keep_all``).
    """
    if not batches:
        raise ValueError("pruning_sweep needs at least one evaluation batch")
    if budgets is None:
        budgets = default_budgets(cfg, int(batches[0]["inputs"].shape[1]))
    rows: list[dict] = []
    variants = sweep_variants(cfg, thresholds, budgets, baselines)
    for rule, value, vcfg in tqdm(variants, desc="pruning sweep", disable=not progress, leave=False):
        r = evaluate_point(vcfg, variables, batches, metric)
        reference = rows[0]["quality"] if rows else r["quality"]
        rows.append({"rule": rule, "value": value, "keep_ratio": r["keep_ratio"], "token_reduction": r["trf_computed"],
                     "token_reduction_ideal": r["trf_ideal"], "quality": r["quality"],
                     "rel_loss": relative_loss(r["quality"], reference, metric)})
    return rows


def format_table(rows: Sequence[dict], metric: str) -> str:
    """Plain-text table of sweep rows."""
    head = (f"{'rule':<15} {'value':>6} {'keep ratio':>10} {'reduction computed':>18} {'reduction ideal':>15} "
            f"{metric:>9} {'rel. loss':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:g}"
        lines.append(f"{r['rule']:<15} {value:>6} {r['keep_ratio']:>10.3f} {r['token_reduction']:>17.2f}x "
                     f"{r.get('token_reduction_ideal', float('nan')):>14.2f}x {r['quality']:>9.3f} {100 * r['rel_loss']:>+8.1f}%")
    return "\n".join(lines)


def best_within(rows: Sequence[dict], tolerance: float = 0.02) -> Optional[dict]:
    """The row with the largest computed token reduction whose relative loss is at most ``tolerance``;
    only rows that compute less than dense (factor > 1) count (None if there is none)."""
    ok = [r for r in rows if r["rel_loss"] <= tolerance and r["rule"] != "keep_all" and r["token_reduction"] > 1.0]
    return max(ok, key=lambda r: r["token_reduction"]) if ok else None
