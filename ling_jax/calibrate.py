"""Calibrated inference policies: the cheapest setting whose quality loss stays under a bound
with a stated probability (Learn-then-Test, Angelopoulos et al. 2021; as CALM calibrates its
early-exit threshold, Schuster et al. 2022).

A user who picks a pruning budget or an exit threshold by eye from a sweep, on the data the sweep
is reported on, gets an optimistic "within 2%" and no guarantee on new requests. Here the choice
is a hypothesis test. For a grid of settings (:mod:`ling_jax.calibrate_table`: KV budget of the
learned pruner, pruning threshold, Mixture-of-Depths threshold, early-exit threshold) and ``n``
calibration requests:

1. **Loss of a request** against the reference (the same weights with nothing skipped), in [0, 1]:

   * bits per byte (text): the relative increase of the request's continuation bits over the
     reference's, clipped to [0, 1]: ``min(max((bits - bits_ref) / bits_ref, 0), 1)``. Its mean,
     the **risk**, is the expected per-request quality loss; a request that got better counts 0
     (improvements elsewhere do not pay for a degraded request) and one that got more than twice
     as bad counts 1. ``delta = 0.02`` reads "requests lose at most 2% in bits per byte on
     average".
   * accuracy (tasks): the share of the request's scored tokens the reference predicted right
     that the setting gets wrong (0 when the reference got none right); for one answer per
     request, 1 if the reference was right and the setting wrong. Bounded like the above and
     never offset by tokens the setting gets right where the reference did not.

2. **p-value** of the null "risk > delta" for each setting from its mean loss: the exact
   binomial tail when every loss of the setting is 0 or 1, else Hoeffding-Bentkus (valid for any loss in
   [0, 1]; Bates et al. 2021).
3. **Fixed-sequence testing** along a path from the reference to the cheapest setting: settings
   ordered by computed FLOPs on the calibration requests (most first; ties by ideal FLOPs, then
   grid order). Each null is rejected while its p-value is at most ``epsilon``; the first that is
   not stops the walk. The chosen setting is the last one rejected (the reference when none is):
   with probability at least ``1 - epsilon`` over the calibration draw its true risk is at most
   ``delta`` (family-wise error control of fixed-sequence testing). The order uses the settings'
   compute on the calibration requests, never their losses.

The losses and p-values here are pure NumPy; the loss table is one batched pass per setting over
all requests. ``ling-jax calibrate --workdir W`` writes ``W/policy.json`` (:func:`write_policy`),
which ``ling-jax eval --policy`` and ``ling-jax generate --policy`` apply (:func:`load_policy`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from scipy import stats

from ling_jax.config import ConfigError, ModelConfig

POLICY_VERSION = 1
PROBE_REQUESTS = 64  # thresholds: the path is ordered by each setting's FLOPs on this many requests
Vector = Union[np.ndarray, Sequence[float]]


# ----------------------------------------------------------------------------- arguments


def min_requests(delta: float, epsilon: float) -> int:
    """Fewest requests with which any setting can pass: even a mean loss of 0 has p-value
    ``(1 - delta)^n`` (binomial and Hoeffding-Bentkus alike), which must reach ``epsilon``."""
    return math.ceil(math.log(epsilon) / math.log1p(-delta) - 1e-9)


def check_arguments(delta: float, epsilon: float, requests: int) -> None:
    """One-line errors for a risk bound or error level outside (0, 1) and for too few requests."""
    for name, value in (("delta", delta), ("epsilon", epsilon)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ConfigError(f"calibrate: --{name} must be a number in (0, 1) (e.g. 0.02 for delta, 0.1 for "
                              f"epsilon), got {value!r}")
    need = min_requests(delta, epsilon)
    if requests < need:
        raise ConfigError(f"calibrate: {requests} requests are too few: with --delta {delta:g} and --epsilon {epsilon:g} "
                          f"no setting can pass with fewer than {need} (even a loss of 0 on every request has p-value "
                          f"(1 - delta)^n > epsilon); pass --requests {need} or more")


# ----------------------------------------------------------------------------- p-values


def binomial_p_value(risk: np.ndarray, n: int, delta: float) -> np.ndarray:
    """p-value of "risk > delta" for 0/1 losses with mean ``risk`` over ``n``: P(Bin(n, delta) <= n risk)."""
    return stats.binom.cdf(np.round(np.asarray(risk, np.float64) * n), n, delta)


def _kl_bernoulli(a: np.ndarray, b: float) -> np.ndarray:
    """KL(Bern(a) || Bern(b)), with 0 log 0 = 0."""
    a = np.clip(a, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        left = np.where(a > 0, a * np.log(a / b), 0.0)
        right = np.where(a < 1, (1 - a) * np.log((1 - a) / (1 - b)), 0.0)
    return left + right


def hoeffding_bentkus_p_value(risk: np.ndarray, n: int, delta: float) -> np.ndarray:
    """p-value of "risk > delta" for losses in [0, 1] with mean ``risk`` over ``n`` (Bates et al.
    2021, Learn-then-Test): ``min(exp(-n h(min(risk, delta), delta)), e P(Bin(n, delta) <= ceil(n risk)))``."""
    risk = np.asarray(risk, np.float64)
    hoeffding = np.exp(-n * _kl_bernoulli(np.minimum(risk, delta), delta))
    bentkus = math.e * stats.binom.cdf(np.ceil(n * risk - 1e-9), n, delta)
    return np.minimum(np.minimum(hoeffding, bentkus), 1.0)


def p_values(losses: np.ndarray, delta: float) -> np.ndarray:
    """Per row of ``losses`` [K, N] (each in [0, 1]): binomial if every loss of the row is 0 or 1,
    else Hoeffding-Bentkus."""
    losses = np.asarray(losses, np.float64)
    if losses.ndim != 2 or losses.shape[1] == 0:
        raise ValueError(f"losses must be a [settings, requests] table with at least one request, got shape {losses.shape}")
    if not np.all((losses >= 0) & (losses <= 1)):
        raise ValueError("every loss must be in [0, 1]")
    risk, n = losses.mean(axis=1), losses.shape[1]
    binary = np.all((losses == 0) | (losses == 1), axis=1)
    return np.where(binary, binomial_p_value(risk, n, delta), hoeffding_bentkus_p_value(risk, n, delta))


def upper_bound(losses: np.ndarray, epsilon: float) -> np.ndarray:
    """Per row: the (1 - epsilon) upper confidence bound on the risk that the p-value gives (the
    smallest delta whose null the row would reject at ``epsilon``; 1 if none), by bisection."""
    lo, hi = np.zeros(len(losses)), np.ones(len(losses))
    for _ in range(40):
        mid = (lo + hi) / 2
        ok = np.array([p_values(row[None], d)[0] <= epsilon for row, d in zip(losses, mid)])
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
    return hi


# ----------------------------------------------------------------------------- Learn-then-Test


@dataclasses.dataclass(frozen=True)
class Selection:
    """The outcome of :func:`learn_then_test` over K settings (index 0: the reference)."""

    chosen: int  # the cheapest setting that passed along the path; 0 (the reference) if none did
    path: tuple[int, ...]  # the settings in the order they are tested (the reference is not tested)
    risk: np.ndarray  # [K] mean loss on the calibration requests
    p_value: np.ndarray  # [K] (the reference: 0, never tested)
    passed: np.ndarray  # [K] bool: null "risk > delta" rejected (the reference: True)


def path_order(cost: Vector, tiebreak: Optional[Vector] = None) -> tuple[int, ...]:
    """Settings 1..K-1 from most to least ``cost`` (computed FLOPs); equal costs by ``tiebreak``
    (ideal FLOPs), most first, then by index (the grid lists safer values first)."""
    cost = np.asarray(cost, np.float64)
    tie = np.zeros_like(cost) if tiebreak is None else np.asarray(tiebreak, np.float64)
    return tuple(sorted(range(1, len(cost)), key=lambda k: (-cost[k], -tie[k], k)))


def fixed_sequence(p_value: Callable[[int], float], path: Sequence[int], epsilon: float, k: int) -> tuple[int, np.ndarray]:
    """Walks ``path`` over ``k`` settings: rejects while ``p_value(j) <= epsilon``, stops at the
    first that is not (``p_value`` is called along the walk only, so a caller may evaluate settings
    lazily). Returns (the last rejected index, or 0; the rejected mask with index 0 set)."""
    passed = np.zeros(k, bool)
    passed[0] = True
    chosen = 0
    for j in path:
        if p_value(j) > epsilon:
            break
        passed[j], chosen = True, j
    return chosen, passed


def learn_then_test(losses: np.ndarray, cost: Vector, delta: float, epsilon: float,
                    tiebreak: Optional[Vector] = None) -> Selection:
    """Learn-then-Test over a loss table ``losses`` [K, N] (row 0: the reference, row k: setting k,
    column: request; losses in [0, 1]) with per-setting ``cost`` [K] (computed FLOPs) that orders
    the path (:func:`path_order`). See the module docstring."""
    losses = np.asarray(losses, np.float64)
    check_arguments(delta, epsilon, losses.shape[1] if losses.ndim == 2 else 0)
    if len(cost) != len(losses):
        raise ValueError(f"cost has {len(cost)} entries for {len(losses)} settings")
    p = p_values(losses, delta)
    p[0] = 0.0
    path = path_order(cost, tiebreak)
    chosen, passed = fixed_sequence(lambda j: p[j], path, epsilon, len(p))
    return Selection(chosen=chosen, path=path, risk=losses.mean(axis=1), p_value=p, passed=passed)


# ----------------------------------------------------------------------------- per-request losses


def request_losses(metric: str, reference: dict, setting: dict) -> np.ndarray:
    """Loss of each request [N] in [0, 1] against the reference (module docstring). ``reference``
    and ``setting`` hold ``bits`` [N] (bits of the scored tokens) for ``metric="bpb"``, or
    ``correct`` [N, T] (scored tokens predicted right) for ``"accuracy"``."""
    if metric == "bpb":
        ref = np.asarray(reference["bits"], np.float64)
        return np.clip((np.asarray(setting["bits"], np.float64) - ref) / np.maximum(ref, 1e-12), 0.0, 1.0)
    if metric == "accuracy":
        ref, mine = np.asarray(reference["correct"], bool), np.asarray(setting["correct"], bool)
        lost = np.sum(ref & ~mine, axis=1)
        return lost / np.maximum(np.sum(ref, axis=1), 1)
    raise ValueError(f"metric must be 'bpb' or 'accuracy', got {metric!r}")


LOSS_DEFINITION = {
    "bpb": "per request: relative increase of the continuation's bits over the reference's, clipped to [0, 1]",
    "accuracy": "per request: share of the scored tokens the reference predicted right that the setting gets wrong",
}


# ----------------------------------------------------------------------------- the policy file


def write_policy(path: str | Path, record: dict) -> None:
    from ling_jax.workdir import atomic_write

    atomic_write(Path(path), (json.dumps({"version": POLICY_VERSION, **record}, indent=1) + "\n").encode())


def read_policy(path: str | Path) -> dict:
    """A policy file written by ``ling-jax calibrate`` (one-line errors for anything else)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--policy {path}: no such file (ling-jax calibrate --workdir W writes W/policy.json)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--policy {path} is not a JSON file: {e}") from None
    missing = [k for k in ("version", "setting", "evaluation", "model", "step") if k not in record] \
        if isinstance(record, dict) else ["all"]
    if missing:
        raise ConfigError(f"--policy {path} is not a policy file written by ling-jax calibrate (missing {missing})")
    if record["version"] != POLICY_VERSION:
        raise ConfigError(f"--policy {path} has version {record['version']}, this ling-jax reads version {POLICY_VERSION}")
    return record


def load_policy(path: str | Path, model: ModelConfig, step: int) -> tuple[dict, ModelConfig]:
    """(the policy record, the inference config that applies it to ``model``), refused unless the
    policy was calibrated on this model at this checkpoint step (its guarantee is for those weights)."""
    from ling_jax.calibrate_table import policy_config

    record = read_policy(path)
    if record["model"] != json.loads(json.dumps(dataclasses.asdict(model))):
        raise ConfigError(f"--policy {path} was calibrated for another model (its recorded model config differs from "
                          "this workdir's); run ling-jax calibrate on this workdir")
    if record["step"] != step:
        raise ConfigError(f"--policy {path} was calibrated at step {record['step']}, this workdir's checkpoint is step "
                          f"{step}: the guarantee is for those weights; run ling-jax calibrate again")
    return record, policy_config(model, record["setting"], record["evaluation"])


# ----------------------------------------------------------------------------- calibrating a workdir


def calibrate(config, variables: dict, step: int, *, delta: float, epsilon: float, requests: int,
              request: Optional[tuple[int, int]] = None, grid: Sequence[str] = (), batch_size: Optional[int] = None,
              progress: bool = True) -> dict:
    """Calibrates a trained model (``config``: its :class:`~ling_jax.config.Config`, ``variables``:
    all its variable collections) on ``requests`` requests of its validation data; returns the
    policy record (:func:`write_policy`): the chosen ``setting``, its computed reduction, the risk
    estimate (mean loss on the calibration requests) and its (1 - epsilon) upper bound, and the
    tested path.

    The path is ordered by the computed and ideal FLOPs of every setting on the first
    :data:`PROBE_REQUESTS` requests; KV budgets are ordered by the budget itself (shapes fix their FLOPs: fewer slots,
    less work), so a budget past the first failure is never compiled. Settings are evaluated on all
    requests along the path only until the first that fails (the walk of :func:`learn_then_test`,
    which never looks past it)."""
    from ling_jax.calibrate_table import config_requests, empty_table, evaluation_of, fill, parse_grid, settings_of
    from ling_jax.provenance import run_record

    check_arguments(delta, epsilon, requests)
    reqs = config_requests(config, requests, request)
    evaluation = evaluation_of(config.model, reqs)
    axes = parse_grid(grid, config.model, evaluation, reqs.prompt_len)
    settings = settings_of(axes)
    table = empty_table(reqs, settings, evaluation=evaluation, batch_size=batch_size)
    probe = None
    if evaluation == "request":
        path = path_order([math.inf if s["budget"] is None else s["budget"] for s in settings])
    else:
        first = reqs.rows(np.arange(min(PROBE_REQUESTS, len(reqs))))
        probe = fill(empty_table(first, settings, evaluation=evaluation, batch_size=table.batch_size),
                     range(len(settings)), config.model, variables, first, progress=progress)
        path = path_order(probe.computed.sum(axis=1), probe.ideal.sum(axis=1))

    def p_value(j: int) -> float:
        fill(table, [j], config.model, variables, reqs)
        if progress:
            print(f"calibrate: {settings[j]}: risk {table.losses[j].mean():.4f}", flush=True)
        return float(p_values(table.losses[j:j + 1], delta)[0])

    chosen, passed = fixed_sequence(p_value, path, epsilon, len(settings))
    tested = [j for j in path if table.evaluated[j]]
    p = np.array([p_values(table.losses[j:j + 1], delta)[0] if table.evaluated[j] and j else 0.0
                  for j in range(len(settings))])

    def row(j: int) -> dict:
        done = bool(table.evaluated[j])
        reduction = table.reduction(j) if done else None if probe is None else probe.reduction(j)
        return {"setting": settings[j], "reduction_computed": reduction,
                "risk": float(table.losses[j].mean()) if done else None, "p_value": float(p[j]) if done and j else None,
                "passed": bool(passed[j]), "quality": table.quality(j) if done else None}

    k = chosen
    return {
        "setting": settings[k], "evaluation": evaluation, "model": dataclasses.asdict(config.model), "step": step,
        "delta": delta, "epsilon": epsilon, "requests": len(reqs), "metric": reqs.metric,
        "request": None if reqs.prompt_len is None else [reqs.prompt_len, reqs.inputs.shape[1] + 1 - reqs.prompt_len],
        "data": dataclasses.asdict(config.data), "loss": LOSS_DEFINITION[reqs.metric],
        "chosen_is_reference": k == 0, "risk_estimate": float(table.losses[k].mean()),
        "risk_upper_bound": float(upper_bound(table.losses[k:k + 1], epsilon)[0]), "p_value": float(p[k]),
        "reduction_computed": table.reduction(k), "quality": table.quality(k), "reference_quality": table.quality(0),
        "grid": {name: list(values) for name, values in axes.items()}, "batch_size": table.batch_size,
        "reference": row(0), "path": [row(j) | {"tested": j in tested} for j in path],
        "seconds": float(np.nansum(table.seconds) + (0.0 if probe is None else np.nansum(probe.seconds))),
        "provenance": run_record(),
    }


def evaluate_policy(config, variables: dict, record: dict, *, requests: Optional[int] = None,
                    batch_size: Optional[int] = None, progress: bool = False) -> dict:
    """The policy against its reference on ``requests`` requests (default: as many as it was
    calibrated on) of ``config``'s data, made as in calibration: risk (mean loss), quality and
    computed reduction. On the calibration requests this reproduces the recorded figures."""
    from ling_jax.calibrate_table import config_requests, loss_table

    n = record["requests"] if requests is None else requests
    reqs = config_requests(config, n, None if record["request"] is None else tuple(record["request"]))
    reference = {name: values[0] for name, values in record["grid"].items()}
    table = loss_table(config.model, variables, reqs, [reference, record["setting"]], evaluation=record["evaluation"],
                       batch_size=batch_size or record["batch_size"], progress=progress)
    return {"setting": record["setting"], "requests": n, "metric": reqs.metric, "risk": float(table.losses[1].mean()),
            "delta": record["delta"], "quality": table.quality(1), "reference_quality": table.quality(0),
            "reduction_computed": table.reduction(1),
            "calibrated": {k: record[k] for k in ("risk_estimate", "risk_upper_bound", "reduction_computed", "requests")}}


def format_path(record: dict) -> str:
    """The tested path as a table, the chosen setting marked."""
    metric = record["metric"]
    lines = [f"{'setting':<44} {'reduction':>9} {metric:>8} {'risk':>7} {'p-value':>8}  result", "-" * 88]
    for row in [{**record["reference"], "tested": None}, *record["path"]]:
        name = ", ".join(f"{k}={'off' if v is None else f'{v:g}'}" for k, v in row["setting"].items())
        result = {None: "reference", True: "pass" if row["passed"] else "FAIL (stop)", False: "not tested"}[row["tested"]]
        mark = "  <- chosen" if row["setting"] == record["setting"] else ""
        num = lambda v, spec: format("-" if v is None else format(v, spec[1:]), spec[:2])  # noqa: E731
        reduction = "-" if row["reduction_computed"] is None else f"{row['reduction_computed']:.2f}x"
        lines.append(f"{name:<44} {reduction:>9} {num(row['quality'], '>8.4f')} "
                     f"{num(row['risk'], '>7.4f')} {num(row['p_value'], '>8.3g')}  {result}{mark}")
    return "\n".join(lines)
