"""Learned token pruning: threshold and budget sweeps against heuristic baselines, per task, over seeds.

For each task (MQAR with filler, needle retrieval, multi-hop, the code corpus "text") and seed it
trains (or loads from ``<results>/runs/``) a dense model and a model with learned pruning (soft
mask, keep-ratio regulariser, annealed temperature), then evaluates:

* ``learned`` (its own weights): the hard threshold rule at each threshold, the budget rule at
  each budget, and the budget rule with compaction (later layers run on the kept tokens only);
* every heuristic baseline at the same budgets on the dense weights (training-free use):
  ``random``, ``window`` (sinks + recent), ``h2o`` and ``tova`` (attention scores, evaluated through
  the KV cache token by token), and ``oracle`` (the task's answer-carrying tokens; tasks only);
* the dense model itself (the quality reference; token reduction factor 1).

Every point records keep ratio, token reduction factor from the ledger, quality (accuracy; bits
per byte for text), relative quality loss against the same seed's dense model, and prefill time
relative to dense (decode time too, where the preset asks for it). Points already in the results
file are skipped, so an interrupted run resumes.

    python experiments/sweep_pruning.py --preset cpu     # ~20 min on 2 CPU cores
    python experiments/sweep_pruning.py --preset smoke --results /tmp/r   # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import common as C  # noqa: E402
from ling_jax.sweep import BASELINES, evaluate_point, point_config  # noqa: E402

NAME = "sweep_pruning"
KEY = ("task", "seed", "weights", "method", "rule", "value", "compaction")
# Decode cost depends only on how a policy scores its cache: a learned score, a fixed priority
# (random / window / oracle cost the same) or attention-updated scores (h2o / tova cost the same).
DECODE_TIMED = ("learned", "window", "h2o")
TASKS = {"smoke": ("mqar",), "cpu": C.TASKS, "tpu": C.TASKS}


@dataclasses.dataclass(frozen=True)
class Sweep:
    thresholds: tuple[float, ...]
    budgets: tuple[int, ...]
    baselines: tuple[str, ...]
    window: int
    num_sinks: int
    target_keep_ratio: float
    layers: str
    decode_timing: bool  # decode time relative to dense at the budget points of seed 0 (DECODE_TIMED methods)
    decode_tokens: int = 8
    decode_methods: tuple[str, ...] = DECODE_TIMED


SWEEPS = {
    # smoke: one baseline per code path (a parallel priority, decode-time attention scores)
    "smoke": Sweep(thresholds=(0.5,), budgets=(12,), baselines=("window", "h2o"), window=4, num_sinks=1,
                   target_keep_ratio=0.5, layers="all", decode_timing=True, decode_tokens=2,
                   decode_methods=("learned",)),
    "cpu": Sweep(thresholds=(0.1, 0.3, 0.5, 0.7, 0.9), budgets=(8, 16, 32), baselines=BASELINES, window=4,
                 num_sinks=1, target_keep_ratio=0.25, layers="all", decode_timing=True, decode_tokens=8),
    "tpu": Sweep(thresholds=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9), budgets=(64, 128, 256, 512, 1024),
                 baselines=BASELINES, window=64, num_sinks=4, target_keep_ratio=0.1, layers="all",
                 decode_timing=True, decode_tokens=64),
}


def pruning_overrides(sw: Sweep, steps: int) -> dict:
    """Training overrides of the learned-pruning variant."""
    return {"model.pruning.enabled": True, "model.pruning.layers": sw.layers, "model.pruning.mode": "soft",
            "model.pruning.target_keep_ratio": sw.target_keep_ratio, "model.pruning.window": sw.window,
            "model.pruning.num_sinks": sw.num_sinks, "model.pruning.budget": max(sw.budgets),
            "model.pruning.anneal_steps": steps, "model.pruning.temperature": 1.0,
            "model.pruning.final_temperature": 0.1}


def plan(tasks, seeds, sw: Sweep) -> list[dict]:
    """Every point of the sweep, in evaluation order."""
    points = []
    for task in tasks:
        for seed in range(seeds):
            add = lambda **p: points.append({"task": task, "seed": seed, "compaction": False, "value": None, **p})  # noqa: E731
            add(weights="dense", method="dense", rule="none")
            add(weights="learned", method="learned", rule="keep_all")
            for thr in sw.thresholds:
                add(weights="learned", method="learned", rule="threshold", value=thr)
            for b in sw.budgets:
                add(weights="learned", method="learned", rule="budget", value=b)
                add(weights="learned", method="learned", rule="budget", value=b, compaction=True)
                for base in sw.baselines:
                    if base == "oracle" and task == "text":
                        continue  # plain text has no answer-carrying tokens
                    add(weights="dense", method=base, rule="budget", value=b)
            if "oracle" in sw.baselines and task != "text":
                add(weights="dense", method="oracle", rule="threshold")
    return points


def inference_model(point: dict, trained: dict[str, C.Trained], sw: Sweep):
    """(model config, variables) of one point: ``learned`` points are inference configs of the
    learned model (:func:`ling_jax.sweep.point_config`), baselines run on the dense weights."""
    method, rule, value = point["method"], point["rule"], point["value"]
    if method == "dense":
        return trained["dense"].model, trained["dense"].variables
    if method == "learned":
        return point_config(trained["learned"].model, rule, value, compaction=point["compaction"]), trained["learned"].variables
    dense = trained["dense"]
    base = C.with_model(dense.model, {"pruning.enabled": True, "pruning.layers": sw.layers, "pruning.window": sw.window,
                                      "pruning.num_sinks": sw.num_sinks, "pruning.budget": max(sw.budgets)})
    return point_config(base, rule, value, baseline=method), dense.variables


def run_point(point, trained, batches, metric, sw: Sweep, sz: C.Sizes, reference: dict) -> dict:
    cfg, variables = inference_model(point, trained, sw)
    result = evaluate_point(cfg, variables, batches, metric)
    result["trf"] = result["trf_ideal"]
    dense = trained["dense"]
    if "trf_from" not in result:  # a parallel forward pass (decoded baselines have no prefill to time)
        result.update(C.time_relative(cfg, variables, dense.variables, batches[0], repeats=sz.time_repeats))
    if (sw.decode_timing and point["seed"] == 0 and point["rule"] == "budget" and not point["compaction"]
            and point["method"] in sw.decode_methods):
        result.update(C.time_decode_relative(cfg, variables, dense.variables, batches[0],
                                             new_tokens=sw.decode_tokens, repeats=sz.time_repeats))
    ref = reference.get((point["task"], point["seed"]))
    if ref is not None:
        result["dense_quality"] = ref
        result["rel_loss"] = C.relative_loss(result["quality"], ref, metric)
    return {**point, "metric": metric, **result}


def keep_map(task: str, trained: C.Trained, batch: dict, threshold: float) -> dict:
    """Which tokens each pruning layer keeps (threshold rule) for the first example of a batch."""
    import jax
    import numpy as np

    from ling_jax.layers.pruning import TokenPruner
    from ling_jax.model import Transformer

    cfg = point_config(trained.model, "threshold", threshold)
    tokens = jax.numpy.asarray(batch["inputs"][:1])

    @jax.jit
    def keep_flags(variables, tokens):  # {block: [1, T] cascaded keep flags of its pruner}
        _, state = Transformer(cfg).apply(variables, tokens, mutable=["intermediates"],
                                          capture_intermediates=lambda mdl, name: isinstance(mdl, TokenPruner))
        return {block: sub["pruner"]["__call__"][0][1].prune_keep for block, sub in state["intermediates"].items()
                if "pruner" in sub}

    layers = {int(block.split("_")[1]): np.asarray(keep[0]).astype(int).tolist()
              for block, keep in jax.device_get(keep_flags(trained.variables, tokens)).items()}
    return {"task": task, "threshold": threshold, "tokens": np.asarray(batch["inputs"][0]).tolist(),
            "oracle": np.asarray(batch["oracle_mask"][0]).astype(int).tolist(),
            "loss_mask": np.asarray(batch["loss_mask"][0]).astype(int).tolist(),
            "num_sinks": cfg.pruning.num_sinks, "window": cfg.pruning.window,
            "layers": {str(k): v for k, v in sorted(layers.items())}}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    C.common_args(parser)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    sw, sz = SWEEPS[args.preset], C.sizes(args.preset)
    seeds = args.seeds or sz.seeds
    tasks = C.selected_tasks(args, TASKS[args.preset])
    C.setup_jax(args.results)
    jsonl, csv_path, meta_path = C.results_paths(args.results, args.preset, NAME)
    results = C.ResultsFile(jsonl, KEY)
    meta = C.RunMeta(meta_path, script=f"{NAME}.py", preset=args.preset, argv=argv)
    meta.write({"seeds": seeds, "tasks": tasks, "sweep": dataclasses.asdict(sw), "sizes": dataclasses.asdict(sz)})
    points = plan(tasks, seeds, sw)
    todo = [p for p in points if not results.done(**p)]
    C.log(f"{NAME}: {len(points)} points, {len(points) - len(todo)} already done")
    pictures = Path(args.results) / args.preset / "pictures"
    bar = C.progress_bar(len(todo), NAME, args.no_progress)
    for task in tasks:
        for seed in range(seeds):
            mine = [p for p in todo if p["task"] == task and p["seed"] == seed]
            picture = pictures / f"keep_{task}.json"
            if not mine and (seed != 0 or picture.exists()):
                continue
            metric = C.metric_of(task)
            trained = {}
            for variant, over in (("dense", {}), ("learned", pruning_overrides(sw, sz.train["steps"]))):
                cfg = C.make_config(args.preset, task, seed, over)
                run = C.run_dir_for(args.results, args.preset, task, variant, seed)
                trained[variant] = meta.read(C.train_or_load(cfg, run, sharded=sz.sharded, progress=not args.no_progress))
            batches = C.eval_batches(trained["dense"].config, sz.eval_batch_size)
            reference = {(r["task"], r["seed"]): r["quality"] for r in results.records() if r["method"] == "dense"}
            for point in mine:
                bar.set_description(f"{task} s{seed} {point['method']} {point['rule']} {point['value']}")
                record = run_point(point, trained, batches, metric, sw, sz, reference)
                results.add(record)
                if point["method"] == "dense":
                    reference[(task, seed)] = record["quality"]
                bar.update(1)
                meta.write()
            if seed == 0 and not picture.exists():
                picture.parent.mkdir(parents=True, exist_ok=True)
                picture.write_text(json.dumps(keep_map(task, trained["learned"], batches[0], 0.5)) + "\n")
    bar.close()
    records = results.records()
    C.write_csv(records, csv_path)
    summary = C.aggregate(records, ("task", "weights", "method", "rule", "value", "compaction"),
                          ("quality", "rel_loss", "trf", "keep_ratio", "prefill_rel", "decode_rel"))
    C.write_csv(summary, csv_path.with_name(f"{NAME}_summary.csv"))
    meta.write(finished=True)
    for task in tasks:
        best = best_within(records, task, "learned", 0.02)
        C.log(f"{task}: learned pruning, largest token reduction factor within 2% loss: {best}")
    return records


def best_within(records, task: str, method: str, tolerance: float) -> dict:
    """Per seed, the largest token reduction factor of ``method`` with relative loss <= tolerance."""
    per_seed = {}
    for r in records:
        if r["task"] != task or r["method"] != method or r.get("rel_loss") is None or r.get("trf") is None:
            continue
        if r["rel_loss"] <= tolerance:
            per_seed[r["seed"]] = max(per_seed.get(r["seed"], 0.0), r["trf"])
    seeds = sorted({r["seed"] for r in records if r["task"] == task})
    values = [per_seed.get(s) for s in seeds]
    m, s, n = C.mean_std(v for v in values if v is not None)
    return {"mean": m, "std": s, "seeds_reaching": n, "seeds": len(seeds)}


if __name__ == "__main__":
    main()
