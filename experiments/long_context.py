"""Long-context evidence: prompt -> prune -> continue, at matched KV budgets, with an oracle ceiling.

    python experiments/long_context.py --preset long        # 2 CPU cores; resumes where it stopped

Each example is a **request** (:mod:`ling_jax.request_eval`): a prompt of ``P`` tokens prefilled
with a pruning method on, which leaves a KV cache of ``budget`` slots per layer, then a
continuation teacher-forced through that cache. Quality is measured on the continuation only;
work is the ledger's ``computed`` FLOPs of the whole request (prefill + continuation) against the
dense model on the same request, with the KV-cache bytes and the measured wall time beside it.

Tasks (sparse information vs dense information):

* ``needle``: a haystack of ``P`` tokens holding needles "MARK key value"; the continuation is the
  query "MARK key" and its answer (accuracy on the answer). Three distractor levels: ``vocab``
  (one needle, filler from its own ids), ``code`` (one needle in real source bytes, whose letters
  share ids with keys) and ``distractors`` (``needles`` needles, one asked). The query sits in the
  continuation, so every method decides what to keep before it sees the question.
* ``code``: ``P`` bytes of real source files (the corpus's validation split), continued by the
  next ``C`` bytes (bits per byte of the true continuation).

Methods, all deciding at the first layer (``pruning.layers="0"``) under the budget rule, with
compaction starting in that layer (``compaction_start="this_layer"``: dropped prompt tokens do no
further work); every method holds ``budget`` keys per layer:

``learned``          the learned scorer, retrofitted onto the dense model (fine-tuned with the soft mask)
``learned-scratch``  the learned scorer trained with the model from step 0 (first seeds only)
``window``           sinks + the most recent keys (StreamingLLM)
``h2o`` / ``tova`` / ``snapkv``  attention received in the first layer (all prompt queries / the
                     last one / the last window, max-pooled), :mod:`ling_jax.layers.pruning_baselines`
``random``           random keys besides sinks and window
``oracle``           the task's evidence tokens first (needle only): the **oracle ceiling** is the
                     oracle at the smallest budget that holds all evidence
``oracle@1``         the oracle deciding at layer 1 instead: the ceiling of any method that reads
                     one layer of context before it decides

Models: the ``long`` preset (8 layers, d_model 64), trained short-first (``phases``: short
sequences, then longer, then the full request length) per task and seed. Results: ``experiments/results/<preset>/
long_context.jsonl`` (one line per point, resumable), ``.csv``, ``.meta.json`` (command, git
revision, config, checkpoints, wall time), ``long_context.summary.json`` (the README block reads
it: ``experiments/report.py``) and the Pareto figures under ``experiments/results/figures/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

NAME = "long_context"
LEVELS = {"needle": ("vocab", "code", "distractors"), "code": ("source",)}
HEURISTICS = ("window", "h2o", "tova", "snapkv", "random")
WITHIN = 0.02  # "within 2% of the dense model's quality"
SCORER_LR_SCALE = 30.0  # retrofit: Adam moves a weight ~lr per step; a fresh scorer must move by O(1)


@dataclasses.dataclass(frozen=True)
class LongSizes:
    """One preset of this experiment."""

    base: str  # ling_jax preset of the model
    model: Mapping[str, Any]  # ModelConfig overrides on top of it
    prompt: int  # P
    continuation: int  # C of the code task (the needle's is its 3-token query + answer)
    # curriculum per task: phases of (sequence length, batch, steps); a length of 0 means the full
    # request (P + 2 for the needle, P + C for code); each phase starts from the previous one's weights
    phases: Mapping[str, tuple[tuple[int, int, int], ...]]
    # soft-mask fine-tuning of the dense model (the learned scorer): (length, batch, steps); the
    # scorer of the first layer reads single tokens, so short sequences teach it as well as long ones
    retrofit: tuple[int, int, int]
    seeds: int
    scratch_seeds: int  # seeds that also train the scorer from scratch
    eval_batches: int
    eval_batch: int
    budgets: Mapping[str, tuple[int, ...]]  # task -> KV slots per layer
    needles: int  # needles of the distractor level (and of training)
    keys: int = 32  # needle keys and values drawn from this many ids each
    window: int = 8
    num_sinks: int = 1
    keep_ratio: float = 0.05  # soft-mask target keep ratio of the learned scorer
    learning_rate: float = 3e-3


SIZES: dict[str, LongSizes] = {
    # The test suite's: seconds.
    "smoke": LongSizes(base="cpu-tiny", model=dict(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64,
                                                   max_seq_len=160),
                       prompt=96, continuation=8, phases={"needle": ((0, 2, 2),), "code": ((0, 2, 2),)},
                       retrofit=(0, 2, 1), seeds=1, scratch_seeds=1, eval_batches=1, eval_batch=2,
                       budgets={"needle": (12,), "code": (16,)}, needles=2, keys=8),
    # 2 CPU cores, about an hour (measured time in the README).
    "long": LongSizes(base="long", model={}, prompt=1024, continuation=64,
                      phases={"needle": ((64, 32, 800), (256, 16, 60), (0, 4, 16)), "code": ((256, 16, 150), (0, 4, 16))},
                      retrofit=(256, 16, 100), seeds=3, scratch_seeds=1, keys=16,
                      eval_batches=2, eval_batch=16, budgets={"needle": (12, 32, 64), "code": (32, 128, 512)},
                      needles=2),
    # One accelerator each; documented, not run here.
    "long-gpu": LongSizes(base="long-gpu", model={}, prompt=8192, continuation=64,
                          phases={"needle": ((256, 256, 2000), (1024, 64, 1000), (0, 16, 500)),
                                  "code": ((1024, 64, 3000), (0, 16, 1000))},
                          retrofit=(1024, 64, 500), seeds=3, scratch_seeds=3,
                          eval_batches=8, eval_batch=16,
                          budgets={"needle": (12, 32, 64, 128, 256, 512), "code": (64, 128, 256, 512, 1024)},
                          needles=16, keep_ratio=0.02, learning_rate=1e-3),
    "long-tpu": LongSizes(base="long-tpu", model={}, prompt=16384, continuation=64,
                          phases={"needle": ((256, 512, 2000), (2048, 128, 1000), (0, 32, 1000)),
                                  "code": ((2048, 128, 4000), (0, 32, 2000))},
                          retrofit=(2048, 128, 1000), seeds=3,
                          scratch_seeds=3, eval_batches=8, eval_batch=32,
                          budgets={"needle": (12, 64, 128, 256, 512, 1024), "code": (128, 256, 512, 1024, 2048)},
                          needles=32, keep_ratio=0.01, learning_rate=1e-3),
}


# ----------------------------------------------------------------------------- training


def request_len(s: LongSizes, task: str) -> int:
    """Training sequence length of the full request: the needle's haystack is P tokens and its
    query "MARK key" follows; code is P + C bytes."""
    return s.prompt + 2 if task == "needle" else s.prompt + s.continuation


def train_config(s: LongSizes, task: str, seed: int, phase: int | str, pruned: bool):
    """The Config of one training phase: index ``phase`` of the task's curriculum, or
    ``"retrofit"`` (soft-mask pruning on the dense model's weights, full length)."""
    from ling_jax.config import apply_overrides, get_preset

    length, batch, steps = s.retrofit if phase == "retrofit" else s.phases[task][phase]
    length = length or request_len(s, task)
    first = phase == 0
    flat: dict[str, Any] = {f"model.{k}": v for k, v in s.model.items()}
    flat.update({"model.max_seq_len": max(request_len(s, task), s.model.get("max_seq_len", 0)),
                 "train.seq_len": length, "train.batch_size": batch, "train.steps": steps, "train.seed": seed,
                 "train.learning_rate": s.learning_rate if first else s.learning_rate / 3,
                 "train.warmup_steps": max(1, min(30, steps // 10)), "train.checkpoint_every": steps,
                 "train.eval_batches": 1, "train.log_every": max(1, steps // 10),
                 "data.task": "needle" if task == "needle" else "text",
                 "data.task_options": f"num_needles={s.needles},num_keys={s.keys},num_values={s.keys},filler=mixed"
                 if task == "needle" else ""})
    if phase == "retrofit":  # the new scorers learn at SCORER_LR_SCALE x the rate of the weights under them
        flat["train.scorer_lr_scale"] = SCORER_LR_SCALE
    if pruned:
        flat.update({"model.pruning.enabled": True, "model.pruning.layers": "0", "model.pruning.mode": "soft",
                     "model.pruning.target_keep_ratio": s.keep_ratio, "model.pruning.num_sinks": s.num_sinks,
                     "model.pruning.window": s.window, "model.pruning.anneal_steps": steps,
                     "model.pruning.final_temperature": 0.1})
    return apply_overrides(get_preset(s.base), flat)


def train_model(s: LongSizes, task: str, seed: int, variant: str, root: Path, progress: bool, meta: common.RunMeta):
    """``dense`` (the curriculum), ``scratch`` (the same with the soft mask from step 0) or
    ``learned`` (the dense model retrofitted): a :class:`ling_jax.runs.Trained`."""
    from ling_jax.runs import init_workdir

    run = root / "runs" / f"long_context-{s.base}" / task / variant / f"seed{seed}"
    if variant == "learned":
        dense = train_model(s, task, seed, "dense", root, progress, meta)
        cfg = train_config(s, task, seed, "retrofit", pruned=True)
        if not (run / "retrofit" / "config.json").exists():
            init_workdir(cfg, run / "retrofit", dense.variables, allow_new=True)
        return meta.read(common.train_or_load(cfg, run / "retrofit", progress=progress))
    pruned = variant == "scratch"
    trained = None
    for i in range(len(s.phases[task])):
        cfg, workdir = train_config(s, task, seed, i, pruned), run / f"phase{i}"
        if trained is not None and not (workdir / "config.json").exists():
            init_workdir(cfg, workdir, trained.variables)
        trained = meta.read(common.train_or_load(cfg, workdir, progress=progress))
    return trained


# ----------------------------------------------------------------------------- requests


@dataclasses.dataclass
class Requests:
    """Evaluation requests of one (task, level): prompts, continuations, what is scored."""

    prompt: np.ndarray  # [N, P] int32
    continuation: np.ndarray  # [N, C] int32
    scored: np.ndarray  # [N, C] float32: 1 where the continuation token is scored
    oracle: Optional[np.ndarray]  # [N, P] bool: the evidence tokens (None: no oracle)

    def batches(self, size: int):
        for i in range(0, len(self.prompt), size):
            yield (self.prompt[i:i + size], self.continuation[i:i + size], self.scored[i:i + size],
                   None if self.oracle is None else self.oracle[i:i + size])


EVAL_SEED = 90_001  # one set of requests for every model seed: the spread is over models


def make_requests(s: LongSizes, task: str, level: str) -> Requests:
    n = s.eval_batches * s.eval_batch
    if task == "needle":
        from ling_jax.data.tasks import make_batch, make_task

        options = {"vocab": dict(num_needles=1, filler="vocab"), "code": dict(num_needles=1, filler="code"),
                   "distractors": dict(num_needles=s.needles, filler="vocab")}[level]
        options.update(num_keys=s.keys, num_values=s.keys)
        batch = make_batch(make_task("needle", **options), seed=EVAL_SEED, step=0, batch_size=n, seq_len=s.prompt + 2)
        seq = np.concatenate([batch.inputs, batch.targets[:, -1:]], axis=1)  # [N, P + 3]
        scored = np.zeros((n, 3), np.float32)
        scored[:, 2] = 1.0  # the answer after "MARK key"
        return Requests(seq[:, :s.prompt].astype(np.int32), seq[:, s.prompt:].astype(np.int32), scored,
                        batch.oracle_mask[:, :s.prompt].astype(bool))
    from ling_jax.data.corpus import load_corpus
    from ling_jax.request_eval import text_requests

    prompt, continuation = text_requests(load_corpus(None, "validation"), n, s.prompt, s.continuation)
    return Requests(prompt, continuation, np.ones((n, s.continuation), np.float32), None)


def method_config(model, method: str, budget: int, s: LongSizes):
    """The inference config of ``method`` at ``budget`` KV slots per layer
    (:func:`ling_jax.request_eval.pruning_method`; ``oracle@1`` decides at layer 1)."""
    from ling_jax.request_eval import pruning_method

    name, layers = {"oracle@1": ("oracle", "1"), "learned-scratch": ("learned", "0")}.get(method, (method, "0"))
    return pruning_method(model, name, budget, num_sinks=s.num_sinks, window=s.window, layers=layers)


def evaluate_point(cfg, variables, requests: Requests, s: LongSizes, task: str) -> dict:
    """Quality, work and time of one config over the requests (:func:`ling_jax.request_eval.evaluate_requests`)."""
    from ling_jax.request_eval import evaluate_requests

    return evaluate_requests(cfg, variables, requests.prompt, requests.continuation, requests.scored,
                             metric="accuracy" if task == "needle" else "bpb", oracle=requests.oracle,
                             batch_size=s.eval_batch)


def relative_loss(task: str, quality: float, dense: float) -> float:
    """Relative quality loss against dense: accuracy lost (needle) or bits per byte gained (code)."""
    if task == "needle":
        return (dense - quality) / dense if dense > 0 else float("nan")
    return (quality - dense) / dense


METHODS = ("learned", "learned-scratch") + HEURISTICS + ("oracle", "oracle@1")


def methods_for(task: str, seed: int, s: LongSizes, only: Sequence[str] = METHODS) -> list[str]:
    out = ["learned"] + (["learned-scratch"] if seed < s.scratch_seeds and task == "needle" else []) + list(HEURISTICS)
    out += ["oracle", "oracle@1"] if task == "needle" else []
    return [m for m in out if m in only]


# ----------------------------------------------------------------------------- summary


def summarize(records: Sequence[Mapping], s: LongSizes) -> dict:
    """Headline per (task, level): the largest computed reduction within 2% of dense (mean over
    seeds) for the learned scorer and the best baseline, the oracle ceiling, the learned scorer's
    advantage over the best baseline per budget (mean and spread over seeds), and where the work
    of the best learned point goes."""
    out: dict[str, Any] = {"levels": [], "within": WITHIN}
    for task, levels in LEVELS.items():
        for level in levels:
            rs = [r for r in records if r["task"] == task and r["level"] == level]
            if not rs:
                continue
            dense = [r for r in rs if r["method"] == "dense"]
            agg = common.aggregate([r for r in rs if r["method"] != "dense"], ["method", "budget"],
                                   ["quality", "rel_loss", "trf_computed", "trf_ideal", "kv_fraction", "time_fraction"])
            row: dict[str, Any] = {"task": task, "level": level, "metric": "accuracy" if task == "needle" else "bpb",
                                   "dense_quality_mean": common.mean_std(r["quality"] for r in dense)[0],
                                   "dense_quality_std": common.mean_std(r["quality"] for r in dense)[1],
                                   "seeds": len(dense), "points": agg}

            def best(method_names, rows=agg):
                ok = [a for a in rows if a["method"] in method_names and a["rel_loss_mean"] <= WITHIN]
                return max(ok, key=lambda a: a["trf_computed_mean"]) if ok else None

            for name, methods in (("learned", ("learned",)), ("learned_scratch", ("learned-scratch",)),
                                  ("baseline", HEURISTICS)):
                b = best(methods)
                row[f"best_{name}"] = None if b is None else {k: b[k] for k in ("method", "budget", "trf_computed_mean",
                                                                                 "trf_computed_std", "rel_loss_mean",
                                                                                 "rel_loss_std", "kv_fraction_mean",
                                                                                 "time_fraction_mean")}
            oracle = [a for a in agg if a["method"] == "oracle"]
            if oracle:
                floor = min(a["budget"] for a in oracle)
                o = next(a for a in oracle if a["budget"] == floor)
                o1 = [a for a in agg if a["method"] == "oracle@1" and a["budget"] == floor]
                row["oracle_ceiling"] = {"budget": floor, "trf_computed": o["trf_computed_mean"],
                                         "rel_loss": o["rel_loss_mean"],
                                         "trf_computed_at_layer1": o1[0]["trf_computed_mean"] if o1 else None,
                                         "work": _work_shares(rs, "oracle", floor)}
            row["advantage"] = _advantage(rs, task)
            lead = row["best_learned"] or max((a for a in agg if a["method"] == "learned"),
                                              key=lambda a: a["trf_computed_mean"], default=None)
            if lead is not None:
                row["work_of_best_learned"] = _work_shares(rs, "learned", lead["budget"])
            out["levels"].append(row)
    target = [lv for lv in out["levels"] if lv["task"] == "needle" and lv["best_learned"]]
    top = max(target, key=lambda lv: lv["best_learned"]["trf_computed_mean"], default=None)
    out["headline_trf_within_2pct"] = top["best_learned"]["trf_computed_mean"] if top else 1.0
    out["headline_level"] = f"{top['task']}/{top['level']}" if top else None
    out["target_10x_met"] = bool(top and top["best_learned"]["trf_computed_mean"] >= 10.0)
    ceilings = [lv["oracle_ceiling"] for lv in out["levels"] if lv.get("oracle_ceiling")]
    # the oracle at the evidence's budget within 2% at 10x or more: the ledger leaves room for the target
    out["ceiling_allows_10x"] = bool(ceilings) and all(c["trf_computed"] >= 10.0 and c["rel_loss"] <= WITHIN
                                                      for c in ceilings)
    out["min_oracle_ceiling"] = min((c["trf_computed"] for c in ceilings), default=None)
    return out


def _advantage(rs: Sequence[Mapping], task: str) -> list[dict]:
    """Per budget: learned quality minus the best baseline's (the baseline best on the seed mean),
    per seed, then mean and sample std over seeds (higher = the learned scorer is better)."""
    sign = 1.0 if task == "needle" else -1.0  # bpb: lower is better
    rows = []
    for budget in sorted({r["budget"] for r in rs if r["method"] == "learned"}):
        at = [r for r in rs if r["budget"] == budget]
        learned = {r["seed"]: r["quality"] for r in at if r["method"] == "learned"}
        means = {m: np.mean([r["quality"] for r in at if r["method"] == m]) for m in HEURISTICS
                 if any(r["method"] == m for r in at)}
        if not means or not learned:
            continue
        best = max(means, key=lambda m: sign * means[m])
        base = {r["seed"]: r["quality"] for r in at if r["method"] == best}
        diffs = [sign * (learned[k] - base[k]) for k in learned if k in base]
        m, sd, n = common.mean_std(diffs)
        rows.append({"budget": budget, "best_baseline": best, "advantage_mean": m, "advantage_std": sd, "seeds": n,
                     "learned_mean": float(np.mean(list(learned.values()))), "baseline_mean": float(means[best])})
    return rows


def _work_shares(rs: Sequence[Mapping], method: str, budget: int) -> dict[str, float]:
    """Share of the request's computed FLOPs by ledger term (mean over seeds), largest first."""
    pts = [r for r in rs if r["method"] == method and r["budget"] == budget]
    total: dict[str, float] = {}
    for r in pts:
        whole = sum(r["terms"].values())
        for k, v in r["terms"].items():
            total[k] = total.get(k, 0.0) + v / whole / len(pts)
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------- main


def _preset_layers(base: str) -> int:
    from ling_jax.config import get_preset

    return get_preset(base).model.num_layers


def run(s: LongSizes, preset: str, root: Path, tasks: Sequence[str], seeds: int, progress: bool,
        meta: common.RunMeta, methods: Sequence[str] = METHODS) -> list[dict]:
    import jax

    jsonl, csv, _ = common.results_paths(root, preset, NAME)
    results = common.ResultsFile(jsonl, ["task", "level", "seed", "method", "budget"])
    requests_of = {task: {level: make_requests(s, task, level) for level in LEVELS[task]} for task in tasks}
    for seed in range(seeds):  # seed-major: an interrupted run has whole seeds of every task
        for task in tasks:
            requests = requests_of[task]
            models = {"dense": train_model(s, task, seed, "dense", root, progress, meta),
                      "learned": train_model(s, task, seed, "learned", root, progress, meta)}
            if seed < s.scratch_seeds and task == "needle" and "learned-scratch" in methods:
                models["learned-scratch"] = train_model(s, task, seed, "scratch", root, progress, meta)
            points = [(level, m, b) for level in LEVELS[task] for m in ["dense"] + methods_for(task, seed, s, methods)
                      for b in ([s.prompt] if m == "dense" else s.budgets[task])]
            todo = [p for p in points if not results.done(task=task, level=p[0], seed=seed, method=p[1], budget=p[2])]
            bar = common.progress_bar(len(todo), f"{task} seed {seed}", not progress)
            dense_of = {r["level"]: r for r in results.records()
                        if r["task"] == task and r["seed"] == seed and r["method"] == "dense"}
            for level, method, budget in todo:
                trained = models["dense" if method not in models else method]
                cfg = method_config(trained.model, method, budget, s)
                point = evaluate_point(cfg, jax.device_put(trained.variables), requests[level], s, task)
                if method == "dense":
                    dense_of[level] = {**point, "budget": budget}
                d = dense_of[level]
                results.add({"task": task, "level": level, "seed": seed, "method": method, "budget": budget,
                             "prompt": s.prompt, "quality": point["quality"], "dense_quality": d["quality"],
                             "rel_loss": 0.0 if method == "dense" else relative_loss(task, point["quality"], d["quality"]),
                             "trf_computed": d["computed_flops"] / point["computed_flops"],
                             "trf_ideal": d["ideal_flops"] / point["ideal_flops"],
                             "computed_flops": point["computed_flops"], "ideal_flops": point["ideal_flops"],
                             "kv_bytes_per_request": point["kv_bytes_per_request"],
                             "kv_fraction": point["kv_bytes_per_request"] / d["kv_bytes_per_request"],
                             "time_fraction": point["seconds"] / d["seconds"], "seconds": point["seconds"],
                             "terms": point["terms"]})
                bar.update(1)
                meta.write()
            bar.close()
    records = results.records()
    common.write_csv([{k: v for k, v in r.items() if k != "terms"} for r in records], csv)
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="long", choices=sorted(SIZES))
    p.add_argument("--results", type=Path, default=common.RESULTS_ROOT)
    p.add_argument("--tasks", default="needle,code", help="comma list of: needle, code")
    p.add_argument("--seeds", type=int, default=None, help="override the preset's number of seeds")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all): " + ", ".join(METHODS))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    if sorted(set(methods) - set(METHODS)):
        p.error(f"--methods: unknown {sorted(set(methods) - set(METHODS))}; allowed: {list(METHODS)}")
    tasks = [t for t in a.tasks.split(",") if t]
    bad = [t for t in tasks if t not in LEVELS]
    if bad:
        p.error(f"--tasks: unknown {bad}; allowed: {sorted(LEVELS)}")
    s = SIZES[a.preset]
    seeds = a.seeds or s.seeds
    common.setup_jax(a.results)
    _, _, meta_path = common.results_paths(a.results, a.preset, NAME)
    meta = common.RunMeta(meta_path, script="long_context.py", preset=a.preset, argv=sys.argv[1:] if argv is None else argv)
    meta.fields.update({"sizes": {k: (dict(v) if isinstance(v, Mapping) else v)
                                  for k, v in dataclasses.asdict(s).items()}, "tasks": tasks, "seeds": seeds})
    records = run(s, a.preset, a.results, tasks, seeds, not a.no_progress, meta, methods)
    summary = summarize(records, s)
    prov = meta.provenance.fields()
    summary.update({"preset": a.preset, "prompt": s.prompt, "continuation": s.continuation, "layers": None,
                    "command": prov["command"], "git_revision": prov["git_revision"],
                    "wall_s": round(meta.base_wall + prov["wall_s"], 1), "sizes": meta.fields["sizes"],
                    "load_average_1min_end": os.getloadavg()[0], "cpu_count": os.cpu_count()})
    if records:
        summary["layers"] = SIZES[a.preset].model.get("num_layers") or _preset_layers(s.base)
    summary_path = a.results / a.preset / f"{NAME}.summary.json"
    import json

    from ling_jax.workdir import atomic_write

    atomic_write(summary_path, (json.dumps(summary, indent=1, sort_keys=True, default=float) + "\n").encode())
    from experiments.plots import long_context_fronts

    long_context_fronts(records, a.results / "figures", a.preset)  # also drawn by report.py
    meta.write({"summary": str(summary_path.relative_to(a.results))}, finished=True)
    for lv in summary["levels"]:
        b = lv["best_learned"]
        o = lv.get("oracle_ceiling")
        print(f"{lv['task']}/{lv['level']}: dense {lv['metric']} {lv['dense_quality_mean']:.3f}; learned "
              + (f"{b['trf_computed_mean']:.1f}x within 2% (budget {b['budget']})" if b else "nothing within 2%")
              + (f"; oracle ceiling {o['trf_computed']:.1f}x" if o else ""))
    print(f"largest computed reduction within 2% (learned, sparse task): {summary['headline_trf_within_2pct']:.2f}x "
          f"({summary['headline_level']}); 10x target {'met' if summary['target_10x_met'] else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
