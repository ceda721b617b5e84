"""Validity of calibrated policies (issue 29): does Learn-then-Test keep the quality loss of the
chosen setting under delta on new requests, at least 1 - epsilon of the time?

One model trained with learned token pruning **and** early exit (``cpu-small-pruned`` plus exit
heads after every block but the last; a random half of the tokens exits at a random head in
training). Its loss table (:mod:`ling_jax.calibrate_table`, ``"forward"`` evaluation: one compiled
program for the whole threshold grid, one request per batch so that each request's exit buckets
are its own) holds every grid setting (pruning threshold x threshold on the learned exit
classifier's confidence) on every one of ``--requests`` text requests from the validation split
(prompts of 96 bytes, continuations of 32 scored). Then ``--splits`` random splits of the requests into a
calibration half and a test half; per split:

* Learn-then-Test on the calibration half (:func:`ling_jax.calibrate.learn_then_test`: the path
  ordered by the calibration half's computed FLOPs, Hoeffding-Bentkus p-values) picks a setting;
* its **test loss** is its mean per-request loss on the test half; a split **violates** when the
  test loss exceeds delta;
* the **oracle** is the setting with the largest computed reduction on the test half among those
  whose test loss is at most delta (what a choice made on the test half itself would get).

With ``--main-job W`` (a workdir of the README's main job, ``ling-jax train --preset
cpu-small-pruned``) it also runs ``ling-jax calibrate --workdir W`` as a user does, timed, and
``ling-jax eval --policy W/policy.json`` on the result (the round trip).

Reported: the violation rate with its Clopper-Pearson 95% interval (target: at most epsilon), the
mean computed reduction of the chosen settings on the test halves beside the oracle's, the same
on each mechanism's own path (the other axes at their reference value), and the whole table's
risk and reduction per setting. Splits are pure resampling of one table.

    python experiments/calibration.py --workdir $TMPDIR/calibration      # trains ~5 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from ling_jax.calibrate import learn_then_test  # noqa: E402
from ling_jax.calibrate_table import LossTable, Requests, loss_table, parse_grid, settings_of, text_requests  # noqa: E402
from ling_jax.config import Config, DepthConfig, get_preset  # noqa: E402
from ling_jax.provenance import Provenance  # noqa: E402
from ling_jax.runs import train_or_load  # noqa: E402

DEFAULT_GRID = ("prune_threshold=0,0.3,0.5", "exit_threshold=1,0.9995,0.999,0.998,0.995,0.99,0.98,0.97,0.95,0.9")
EXIT_CONFIDENCE = "classifier"  # the learned exit classifier (trained whatever the confidence; depth_quality.py)


def model_config(steps: int) -> Config:
    """The main job's preset (learned pruning from layer 1) with early-exit heads."""
    base = get_preset("cpu-small-pruned")
    depth = DepthConfig(exit_enabled=True, exit_layers="all", exit_train_freeze=0.5)
    pruning = dataclasses.replace(base.model.pruning, anneal_steps=steps)
    train = dataclasses.replace(base.train, steps=steps, checkpoint_every=steps)
    return dataclasses.replace(base, model=dataclasses.replace(base.model, depth=depth, pruning=pruning), train=train,
                               preset="cpu-small-pruned")


def requests_of(config: Config, count: int, prompt: int, continuation: int) -> Requests:
    from ling_jax.data.corpus import load_corpus

    data = load_corpus(config.data.path or None, "validation", config.data.validation_fraction)
    return text_requests(data, count, prompt, continuation)


_ARRAYS = ("losses", "bits", "correct", "tokens", "computed", "ideal", "dense", "seconds")


def cached_table(workdir: Path, key: dict, make) -> tuple[LossTable, float]:
    """The loss table of ``key`` from ``workdir/calibration_table.npz`` if it holds that one, else
    ``make()`` (saved there); with the seconds making it took."""
    path = workdir / "calibration_table.npz"
    if path.exists():
        with np.load(path) as z:
            if json.loads(str(z["key"])) == json.loads(json.dumps(key)):
                table = LossTable(settings=key["settings"], evaluation="forward", metric="bpb",
                                  batch_size=key["batch_size"], **{k: z[k] for k in _ARRAYS})
                print(f"loss table read from {path}", flush=True)
                return table, float(z["make_seconds"])
    start = time.perf_counter()
    table = make()
    seconds = time.perf_counter() - start
    np.savez(path, key=json.dumps(key), make_seconds=seconds, **{k: getattr(table, k) for k in _ARRAYS})
    return table, seconds


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def splits(table, delta: float, epsilon: float, count: int, seed: int) -> list[dict]:
    """Per random split: the setting Learn-then-Test picks on the calibration half and the oracle's on the test half."""
    rng = np.random.default_rng(seed)
    n = table.losses.shape[1]
    out = []
    for _ in range(count):
        order = rng.permutation(n)
        cal, test = order[:n // 2], order[n // 2:]
        sel = learn_then_test(table.losses[:, cal], table.computed[:, cal].sum(axis=1), delta, epsilon,
                              table.ideal[:, cal].sum(axis=1))
        k = sel.chosen
        test_risk = table.losses[:, test].mean(axis=1)
        ok = np.flatnonzero(test_risk <= delta)
        oracle = max(ok, key=lambda j: table.reduction(j, test))
        out.append({"chosen": int(k), "calibration_risk": float(sel.risk[k]), "test_risk": float(test_risk[k]),
                    "violation": bool(test_risk[k] > delta), "reduction": table.reduction(k, test),
                    "oracle": int(oracle), "oracle_reduction": table.reduction(oracle, test),
                    "oracle_test_risk": float(test_risk[oracle])})
    return out


def _cli(*args: str) -> tuple[list[str], float]:
    """Runs ``python -m ling_jax.cli ARGS`` as a user does: (stdout lines, wall seconds)."""
    import subprocess

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ling_jax.cli", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode:
        raise SystemExit(f"ling-jax {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout.splitlines(), time.perf_counter() - start


def main_job(workdir: Path, delta: float, epsilon: float) -> dict:
    """``ling-jax calibrate`` on the main job's workdir, timed, and ``eval --policy`` of its file."""
    import os

    load = os.getloadavg()[0]
    lines, wall = _cli("calibrate", "--workdir", str(workdir), "--delta", str(delta), "--epsilon", str(epsilon),
                       "--no-progress")
    record = json.loads((workdir / "policy.json").read_text())
    again, eval_wall = _cli("eval", "--workdir", str(workdir), "--policy", str(workdir / "policy.json"))
    print("\n".join(lines[:-1]), flush=True)
    return {"command": f"ling-jax calibrate --workdir runs/main --delta {delta:g} --epsilon {epsilon:g}",
            "wall_s": wall, "load_average_1min_start": load, "load_average_1min_end": os.getloadavg()[0],
            "policy": {k: v for k, v in record.items() if k not in ("model", "data", "provenance")},
            "eval_policy": json.loads(again[-1]), "eval_wall_s": eval_wall}


def restrict(table: LossTable, rows: list[int]) -> LossTable:
    """The table of settings ``rows`` only (the reference, row 0, first)."""
    per_row = ("losses", "bits", "correct", "computed", "ideal", "seconds")
    return dataclasses.replace(table, settings=[table.settings[k] for k in rows],
                               **{name: getattr(table, name)[rows] for name in per_row})


def summary(rows: list[dict]) -> dict:
    violations = sum(r["violation"] for r in rows)
    lo, hi = clopper_pearson(violations, len(rows))
    return {"violations": int(violations), "violation_rate": violations / len(rows), "violation_interval95": [lo, hi],
            "mean_reduction": float(np.mean([r["reduction"] for r in rows])),
            "mean_oracle_reduction": float(np.mean([r["oracle_reduction"] for r in rows])),
            "mean_calibration_risk": float(np.mean([r["calibration_risk"] for r in rows])),
            "mean_test_risk": float(np.mean([r["test_risk"] for r in rows])),
            "max_test_risk": float(np.max([r["test_risk"] for r in rows])),
            "reference_chosen": int(sum(r["chosen"] == 0 for r in rows))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="the model's workdir (trained here unless already trained)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--request", default="96:32", metavar="P:C")
    p.add_argument("--splits", type=int, default=200)
    p.add_argument("--delta", type=float, default=0.02)
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--grid", action="append", default=None, metavar="NAME=V1,V2,...")
    p.add_argument("--batch-size", type=int, default=1, help="requests per batch (1: each request's own exit buckets)")
    p.add_argument("--exit-confidence", default=EXIT_CONFIDENCE, choices=["margin", "classifier", "saturation"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="experiments/results/calibration.json")
    p.add_argument("--main-job", metavar="W", help="also time ling-jax calibrate on this main-job workdir")
    args = p.parse_args(argv)
    prov = Provenance("experiments/calibration.py", argv)
    workdir = Path(args.workdir)

    config = model_config(args.steps)
    print(f"training or loading {workdir} ({args.steps} steps of cpu-small-pruned + early exit)", flush=True)
    trained = train_or_load(config, workdir, progress=True)
    cost_file = workdir / "calibration_train_seconds.json"
    if trained.info["train_seconds"] is not None:
        cost_file.write_text(json.dumps({"train_seconds": trained.info["train_seconds"]}))
    train_seconds = json.loads(cost_file.read_text())["train_seconds"] if cost_file.exists() else None

    prompt, continuation = (int(v) for v in args.request.split(":"))
    reqs = requests_of(config, args.requests, prompt, continuation)
    model = dataclasses.replace(config.model, depth=dataclasses.replace(config.model.depth,
                                                                        exit_confidence=args.exit_confidence))
    grid = parse_grid(args.grid or DEFAULT_GRID, model, "forward", prompt)
    settings = settings_of(grid)
    print(f"loss table: {len(settings)} settings x {len(reqs)} requests", flush=True)
    key = {"step": trained.info["step"], "settings": settings, "requests": len(reqs), "request": args.request,
           "batch_size": args.batch_size, "exit_confidence": args.exit_confidence}
    table, table_seconds = cached_table(workdir, key, lambda: loss_table(
        model, trained.variables, reqs, settings, evaluation="forward", batch_size=args.batch_size))
    print(f"loss table in {table_seconds:.0f} s", flush=True)

    rows = splits(table, args.delta, args.epsilon, args.splits, args.seed)
    chosen = np.array([r["chosen"] for r in rows])
    # one mechanism at a time: the settings whose other axes keep their reference value, same splits
    one_axis = {}
    for name, values in grid.items():
        keep = [k for k, st in enumerate(settings) if all(st[o] == grid[o][0] for o in grid if o != name)]
        one_axis[name] = {"settings": len(keep),
                          **summary(splits(restrict(table, keep), args.delta, args.epsilon, args.splits, args.seed))}
    per_setting = [{"setting": s, "risk": float(table.losses[k].mean()), "reduction_computed": table.reduction(k),
                    "reduction_ideal": float(table.dense.sum() / table.ideal[k].sum()), "bpb": table.quality(k),
                    "chosen_in_splits": int(np.sum(chosen == k))} for k, s in enumerate(settings)]
    result = {
        "delta": args.delta, "epsilon": args.epsilon, "requests": len(reqs), "prompt": prompt, "continuation": continuation,
        "splits": len(rows), "calibration_requests": len(reqs) // 2, "test_requests": len(reqs) - len(reqs) // 2,
        "grid": {k: list(v) for k, v in grid.items()}, "settings": len(settings), "batch_size": args.batch_size,
        "exit_confidence": args.exit_confidence,
        "steps": trained.info["step"], "train_seconds": train_seconds, "table_seconds": table_seconds,
        **summary(rows), "one_axis": one_axis,
        "reference_bpb": table.quality(0), "per_setting": per_setting, "per_split": rows,
    }
    if args.main_job:
        result["main_job"] = main_job(Path(args.main_job), args.delta, args.epsilon)
        print(f"main job: calibrate {result['main_job']['wall_s']:.0f} s", flush=True)
    lo, hi = result["violation_interval95"]
    print(f"violation rate {result['violation_rate']:.3f} (95% interval {lo:.3f}-{hi:.3f}; target <= {args.epsilon}); "
          f"mean computed reduction {result['mean_reduction']:.3f}x vs oracle {result['mean_oracle_reduction']:.3f}x")
    if args.json:
        prov.write(args.json, result, config=config,
                   checkpoints=[workdir] + ([Path(args.main_job)] if args.main_job else []))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
