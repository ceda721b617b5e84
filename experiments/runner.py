"""A resumable ablation loop shared by ``ablate_moe.py``, ``ablate_depth.py`` and ``combined.py``.

An ablation is a list of :class:`Variant` s: each is trained once per (task, seed) (cached under
``<results>/runs/``, shared between scripts when the name and config agree) and evaluated at one
or more inference *points* (model overrides applied after training, e.g. an exit threshold).
Each (task, seed, variant, point) becomes one JSON line; finished points are skipped on restart.
The variant named ``dense`` must come first: it is the quality reference (relative loss) and the
timing reference (prefill time relative to dense) of its task and seed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from experiments import common as C

KEY = ("task", "seed", "variant", "point")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    train: Mapping[str, Any]  # dotted Config overrides of the training run ({"model.moe.enabled": True})
    points: tuple[tuple[str, Mapping[str, Any]], ...] = (("trained", {}),)  # (label, ModelConfig overrides)
    run_name: Optional[str] = None  # cache directory name (default: name)


PictureFn = Callable[[str, dict, list, Path], None]  # (task, trained by variant, eval batches, pictures dir)


def run_ablation(name: str, args, argv: Sequence[str], variants: Sequence[Variant], tasks: Sequence[str],
                 seeds: int, *, means: Sequence[str] = (), picture: Optional[PictureFn] = None,
                 picture_files: Callable[[str], Sequence[str]] = lambda task: (), extra_meta: Mapping = ()) -> list[dict]:
    """Trains/loads every variant, evaluates every point, appends records; returns all records."""
    if not variants or variants[0].name != "dense":
        raise ValueError("the first variant must be 'dense' (the quality and timing reference)")
    sz = C.sizes(args.preset)
    C.setup_jax(args.results)
    jsonl, csv_path, meta_path = C.results_paths(args.results, args.preset, name)
    results = C.ResultsFile(jsonl, KEY)
    meta = C.RunMeta(meta_path, script=f"{name}.py", preset=args.preset, argv=argv)
    meta.write({"seeds": seeds, "tasks": list(tasks), "sizes": dataclasses.asdict(sz),
                "variants": [{"name": v.name, "train": dict(v.train), "points": [[l, dict(o)] for l, o in v.points]}
                             for v in variants], **dict(extra_meta)})
    pictures = Path(args.results) / args.preset / "pictures"
    plan = [{"task": t, "seed": s, "variant": v.name, "point": label}
            for t in tasks for s in range(seeds) for v in variants for label, _ in v.points]
    todo = [p for p in plan if not results.done(**p)]
    C.log(f"{name}: {len(plan)} points, {len(plan) - len(todo)} already done")
    bar = C.progress_bar(len(todo), name, args.no_progress)
    for task in tasks:
        metric = C.metric_of(task)
        for seed in range(seeds):
            mine = [p for p in todo if p["task"] == task and p["seed"] == seed]
            want_picture = picture is not None and seed == 0 and not all(
                (pictures / f).exists() for f in picture_files(task))
            if not mine and not want_picture:
                continue
            trained: dict[str, C.Trained] = {}

            def get(v: Variant) -> C.Trained:
                if v.name not in trained:
                    cfg = C.make_config(args.preset, task, seed, v.train)
                    run = C.run_dir_for(args.results, args.preset, task, v.run_name or v.name, seed)
                    trained[v.name] = meta.read(C.train_or_load(cfg, run, sharded=sz.sharded,
                                                                progress=not args.no_progress))
                return trained[v.name]

            dense = get(variants[0])
            batches = C.eval_batches(dense.config, sz.eval_batch_size)
            reference = next((r["quality"] for r in results.records()
                              if r["task"] == task and r["seed"] == seed and r["variant"] == "dense"), None)
            for v in variants:
                for label, over in v.points:
                    if results.done(task=task, seed=seed, variant=v.name, point=label):
                        continue
                    bar.set_description(f"{name} {task} s{seed} {v.name} {label}")
                    t = get(v)
                    cfg = C.with_model(t.model, over) if over else t.model
                    rec = C.evaluate(cfg, t.variables, batches, metric, means=means)
                    rec.update(C.time_relative(cfg, t.variables, dense.variables, batches[0], repeats=sz.time_repeats))
                    if v.name == "dense" and reference is None:
                        reference = rec["quality"]
                    rec["dense_quality"] = reference
                    rec["rel_loss"] = C.relative_loss(rec["quality"], reference, metric) if reference else None
                    results.add({"task": task, "seed": seed, "variant": v.name, "point": label, "metric": metric,
                                 "train_overrides": json.dumps(dict(v.train), sort_keys=True),
                                 "point_overrides": json.dumps(dict(over), sort_keys=True),
                                 "train_seconds": t.info["train_seconds"], **rec})
                    bar.update(1)
                    meta.write()
            if want_picture:
                pictures.mkdir(parents=True, exist_ok=True)
                picture(task, {v.name: get(v) for v in variants}, batches, pictures)
    bar.close()
    records = results.records()
    C.write_csv(records, csv_path)
    summary = C.aggregate(records, ("task", "variant", "point"),
                          ("quality", "rel_loss", "trf", "layers_per_token", "prefill_rel", *means))
    C.write_csv(summary, csv_path.with_name(f"{name}_summary.csv"))
    meta.write(finished=True)
    return records


def parse(description: str, argv=None):
    import argparse

    parser = argparse.ArgumentParser(allow_abbrev=False, description=description)
    C.common_args(parser)
    args = parser.parse_args(argv)
    return args, (sys.argv[1:] if argv is None else list(argv))


def best_point(records: Sequence[Mapping], task: str, tolerance: float = 0.02) -> Optional[dict]:
    """The (variant, point) with the largest mean token reduction factor within ``tolerance`` mean relative loss."""
    agg = C.aggregate([r for r in records if r["task"] == task], ("variant", "point"), ("trf", "rel_loss", "quality"))
    ok = [a for a in agg if a["rel_loss_mean"] == a["rel_loss_mean"] and a["rel_loss_mean"] <= tolerance]
    return max(ok, key=lambda a: a["trf_mean"]) if ok else None
