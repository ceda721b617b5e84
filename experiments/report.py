"""Renders every figure in the README from the results files alone.

Two kinds of generated region: the experiments' results section between ``<!-- results:start -->``
and ``<!-- results:end -->`` (from ``experiments/results/<preset>/*.jsonl``), and one block per
hand-written figure (foundation, mechanisms, kernels, main job, retrofit, ...) between
``<!-- report:NAME:start -->`` and ``<!-- report:NAME:end -->`` (``experiments/report_blocks.py``,
from the JSON files under ``experiments/results/``). The rest of the README is left untouched. Each
region names its files and the command that made them.

    python experiments/report.py                 # write every region, redraw the figures
    python experiments/report.py --check         # exit 1 if a region is stale, a results file is
                                                 # missing or has no provenance, a measured number sits
                                                 # outside the regions, or a command names an absolute path
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import common as C  # noqa: E402
from experiments import report_blocks as B  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"
REPO = Path(__file__).resolve().parent.parent
TOL = 0.02
SCRIPTS = ("sweep_pruning", "ablate_moe", "ablate_depth", "combined")
BASELINE_ORDER = ("random", "window", "h2o", "tova", "oracle")


# ----------------------------------------------------------------------------- formatting


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def fq(x, metric: str) -> str:
    return "n/a" if not _finite(x) else (f"{x:.3f}" if metric == "bpb" else f"{x:.3f}")


def fpm(m, s, fmt="{:.3f}") -> str:
    if not _finite(m):
        return "n/a"
    return fmt.format(m) + (f" ± {fmt.format(s)}" if _finite(s) and s > 0 else "")


def fpct(x) -> str:
    return "n/a" if not _finite(x) else f"{x:+.1%}"


def ftrf(x) -> str:
    return "n/a" if not _finite(x) else f"{x:.2f}×"


def frel(x) -> str:
    return "n/a" if not _finite(x) else f"{x:.2f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _rel(path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _meta(root: Path, preset: str, name: str) -> dict:
    p = root / preset / f"{name}.meta.json"
    return json.loads(p.read_text()) if p.exists() else {}


def source_line(root: Path, preset: str, name: str) -> str:
    meta = _meta(root, preset, name)
    jsonl = _rel(root / preset / f"{name}.jsonl")
    cmd = meta.get("command", f"python experiments/{name}.py --preset {preset}")
    wall = meta.get("wall_s")
    how = f"{wall / 60:.1f} min wall" if _finite(wall) else "wall time not recorded"
    inv = meta.get("invocations")
    inv_s = f" over {inv} invocation{'s' if inv != 1 else ''}" if inv else ""
    state = " (interrupted or still running: incomplete)" if meta.get("finished") is False else ""
    notes = f" Note: {meta['notes']}" if meta.get("notes") else ""
    return (f"Source: `{jsonl}` (all points; `{name}.csv`, per-setting mean/std in `{name}_summary.csv`), made by "
            f"`{cmd}` ({how}{inv_s}, {meta.get('backend', '?')} backend, {meta.get('cpu_count', '?')} CPUs visible)"
            f"{state}.{notes}")


def chance(task: str, options: str) -> Optional[float]:
    """Accuracy of uniform guessing over the possible answers (None for text)."""
    from ling_jax.data import tasks as T

    kw = dict(p.split("=", 1) for p in options.split(",") if "=" in p)
    if task in ("mqar", "needle"):
        return 1.0 / int(kw.get("num_values", T.VALUE_SIZE))
    if task == "multihop":
        return 1.0 / int(kw.get("num_nodes", 16))
    return None


# ----------------------------------------------------------------------------- pruning sweep


def best_within(records, task: str, method: str, *, budget_only: bool = False) -> dict:
    """Per seed, the largest token reduction factor with relative loss <= TOL; mean/std over seeds."""
    seeds = sorted({r["seed"] for r in records if r["task"] == task})
    per_seed: dict[int, tuple[float, str]] = {}
    for r in records:
        if r["task"] != task or r["method"] != method or not _finite(r.get("rel_loss")) or not _finite(r.get("trf")):
            continue
        if budget_only and r["rule"] != "budget":
            continue
        if r["rel_loss"] <= TOL and r["trf"] > max(per_seed.get(r["seed"], (1.0, ""))[0], 1.0):
            per_seed[r["seed"]] = (r["trf"], _point_name(r))
    m, s, n = C.mean_std(v[0] for v in per_seed.values())
    where = sorted({v[1] for v in per_seed.values()})
    return {"mean": m, "std": s, "n": n, "seeds": len(seeds), "where": where}


def _point_name(r: Mapping) -> str:
    if r["rule"] == "threshold":
        return f"threshold {r['value']}" if r["value"] is not None else "oracle mask"
    if r["rule"] == "budget":
        return f"budget {r['value']}" + (" + compaction" if r.get("compaction") else "")
    return r["rule"]


def fbest(b: dict) -> str:
    if b["n"] == 0:
        return f"none (0/{b['seeds']} seeds)"
    return f"{fpm(b['mean'], b['std'], '{:.2f}')}× ({b['n']}/{b['seeds']} seeds; {', '.join(b['where'])})"


def verdict(records, task: str, budget: int, baseline: str, metric: str) -> tuple[str, float, float, int]:
    """Learned (budget rule, no compaction) vs a baseline at the same budget, paired over seeds."""
    sign = -1.0 if metric == "bpb" else 1.0

    def q(method):
        return {r["seed"]: r["quality"] for r in records if r["task"] == task and r["method"] == method
                and r["rule"] == "budget" and r["value"] == budget and not r.get("compaction") and _finite(r.get("quality"))}

    a, b = q("learned"), q(baseline)
    diffs = [sign * (a[s] - b[s]) for s in sorted(set(a) & set(b))]
    m, sd, n = C.mean_std(diffs)
    if n == 0:
        return "n/a", m, sd, n
    sem = sd / math.sqrt(n) if n > 1 else 0.0
    if abs(m) <= 2 * sem or m == 0:
        return "tie", m, sd, n
    return ("beats" if m > 0 else "loses to"), m, sd, n


def pruning_section(root: Path, preset: str, figures: Path) -> list[str]:
    records = C.with_reduction(C.read_jsonl(root / preset / "sweep_pruning.jsonl"), "computed")
    meta = _meta(root, preset, "sweep_pruning")
    out = ["### Learned token pruning vs heuristic baselines", ""]
    if not records:
        return out + [f"Not run yet for preset `{preset}` (`python experiments/sweep_pruning.py --preset {preset}`).", ""]
    options = meta.get("sizes", {}).get("task_options", {})
    tasks = [t for t in C.TASKS if any(r["task"] == t for r in records)]
    out += [source_line(root, preset, "sweep_pruning"), ""]
    sw = meta.get("sweep", {})
    if sw:
        out += [f"Learned pruning is trained with a soft mask on layers `{sw.get('layers')}` (keep-ratio target "
                f"{sw.get('target_keep_ratio')}, {sw.get('num_sinks')} sink, window {sw.get('window')}), then evaluated "
                "with hard masks: the threshold rule (keep a token if its keep probability ≥ threshold), the budget rule "
                "(each query sees at most `budget` keys: sinks, its window and the best-scored older keys) and the budget "
                "rule with compaction (later layers run on the kept tokens only). Baselines run on the dense model's weights "
                "at the same budgets on the same layers; H2O and TOVA run through the KV cache token by token and take their "
                "FLOPs from the window policy at the same budget (the same number of keys per query). Quality is accuracy on "
                "the answer tokens (bits per byte for `text`; lower is better); relative loss is against the dense model of "
                "the same seed.", ""]
    # headline table
    rows = []
    for task in tasks:
        rs = [r for r in records if r["task"] == task]
        metric = rs[0]["metric"]
        dense = C.mean_std(r["quality"] for r in rs if r["method"] == "dense")
        ch = chance(task, options.get(task, ""))
        dense_s = fpm(dense[0], dense[1]) + (f" (chance {ch:.3f})" if ch else " bpb")
        best_b = max(((b, best_within(records, task, b)) for b in BASELINE_ORDER if any(r["method"] == b for r in rs)),
                     key=lambda x: (x[1]["mean"] if _finite(x[1]["mean"]) else -1.0), default=(None, None))
        rows.append([f"`{task}`", metric, dense_s, fbest(best_within(records, task, "learned")),
                     f"{best_b[0]}: {fbest(best_b[1])}" if best_b[0] and best_b[1]["n"] else "none within 2%"])
    out += ["**Largest token reduction factor within 2% relative quality loss** (per seed, the largest factor above 1 "
            "among the points within 2% of that seed's dense model; mean ± std over the seeds that reach one):", ""]
    out += table(["task", "metric", "dense quality", "learned pruning", "best baseline"], rows) + [""]
    per_seed = []
    near = []
    for t in tasks:
        dense = sorted((r["seed"], r["quality"]) for r in records if r["task"] == t and r["method"] == "dense")
        per_seed.append(f"`{t}` " + " / ".join(f"{q:.3f}" for _, q in dense))
        ch = chance(t, options.get(t, ""))
        weak = [s for s, q in dense if ch and q < ch + 0.1]
        if weak:
            near.append(f"`{t}` (seed{'s' if len(weak) > 1 else ''} {', '.join(map(str, weak))})")
    out += ["Dense model quality per seed (seed 0 / 1 / ...): " + "; ".join(per_seed) + ".", ""]
    if near:
        out += [f"Caution: the dense model is within 10 points of chance accuracy on {', '.join(near)}; for such a "
                "seed, staying within 2% of it says little about retrieval.", ""]
    # per task detail
    for task in tasks:
        rs = [r for r in records if r["task"] == task]
        metric = rs[0]["metric"]
        agg = C.aggregate(rs, ("weights", "method", "rule", "value", "compaction"),
                          ("quality", "rel_loss", "trf", "keep_ratio", "prefill_rel", "decode_rel"))
        nseeds = len({r["seed"] for r in rs})
        out += [f"#### `{task}` ({metric}, {nseeds} seed{'s' if nseeds != 1 else ''})", ""]
        budgets = sorted({a["value"] for a in agg if a["rule"] == "budget"})
        methods = [("learned", False), ("learned", True)] + [(b, False) for b in BASELINE_ORDER
                                                             if any(a["method"] == b for a in agg)]
        head = ["budget"] + [("learned + compaction" if c else m) for m, c in methods]
        body = []
        for b in budgets:
            row = [str(b)]
            for m, c in methods:
                a = next((a for a in agg if a["method"] == m and a["rule"] == "budget" and a["value"] == b
                          and bool(a["compaction"]) == c), None)
                row.append("—" if a is None else f"{fpm(a['quality_mean'], a['quality_std'])} ({ftrf(a['trf_mean'])})")
            body.append(row)
        out += ["Budget sweep, quality mean ± std (token reduction factor):", ""] + table(head, body) + [""]
        lines = []
        for base in BASELINE_ORDER:
            per = []
            for b in budgets:
                v, m, sd, n = verdict(records, task, b, base, metric)
                if v != "n/a":
                    per.append(f"{v} at {b} ({m:+.3f})")
            if per:
                lines.append(f"- learned vs `{base}`: " + "; ".join(per))
        if lines:
            out += ["Learned (budget rule) against each baseline at the same budget: mean paired quality difference "
                    "over seeds, positive = learned better; \"tie\" when within two standard errors:", ""] + lines + [""]
        thr = sorted((a for a in agg if a["method"] == "learned" and a["rule"] in ("threshold", "keep_all")),
                     key=lambda a: -1 if a["value"] is None else a["value"])
        body = [[("keep all" if a["rule"] == "keep_all" else str(a["value"])), frel(a["keep_ratio_mean"]),
                 fpm(a["trf_mean"], a["trf_std"], "{:.3f}"), fpm(a["quality_mean"], a["quality_std"]),
                 fpct(a["rel_loss_mean"]), frel(a["prefill_rel_mean"])] for a in thr]
        timing = [a for a in agg if a["rule"] == "budget" and _finite(a.get("decode_rel_mean")) and not a["compaction"]]
        out += ["Learned threshold sweep (no compaction):", ""]
        out += table(["threshold", "keep ratio", "token reduction", "quality", "rel. loss", "prefill time / dense"], body)
        out += [""]
        if timing:
            body = [[a["method"], str(a["value"]), frel(a["prefill_rel_mean"]), frel(a["decode_rel_mean"])]
                    for a in sorted(timing, key=lambda a: (a["method"], a["value"]))]
            out += ["Measured time relative to dense (same run, dense and variant alternating, median of repeats; seed 0 "
                    "for decode; tiny models on a machine shared with other jobs, so expect tens of percent of noise; on "
                    "CPU a masked key costs as much as a visible one, so only compaction and the smaller KV cache can save "
                    "time):", ""]
            out += table(["method", "budget", "prefill / dense", "decode per token / dense"], body) + [""]
        fig = figures / f"pareto_{task}.png"
        out += [f"![Pareto front, {task}]({_rel(fig)})", ""]
    for task in tasks:
        fig = figures / f"keep_{task}.png"
        if (root / preset / "pictures" / f"keep_{task}.json").exists():
            out += [f"![tokens kept per layer, {task}]({_rel(fig)})", ""]
    return out


# ----------------------------------------------------------------------------- ablations


def ablation_best(agg: Sequence[Mapping]) -> Optional[Mapping]:
    """The non-dense (variant, point) with the largest mean token reduction within TOL mean relative loss."""
    ok = [a for a in agg if a["variant"] != "dense" and _finite(a["rel_loss_mean"]) and a["rel_loss_mean"] <= TOL
          and _finite(a["trf_mean"]) and a["trf_mean"] > 1.0]
    return max(ok, key=lambda a: a["trf_mean"]) if ok else None


def headline_section(root: Path, preset: str, kind: str = "computed") -> list[str]:
    """Per task, the largest token reduction factor (of ``kind``) within 2% loss for each mechanism,
    and the answer."""
    sweep = C.with_reduction(C.read_jsonl(root / preset / "sweep_pruning.jsonl"), kind)
    ablations = {name: C.with_reduction(C.read_jsonl(root / preset / f"{name}.jsonl"), kind)
                 for name in ("ablate_moe", "ablate_depth", "combined")}
    if not sweep and not any(ablations.values()):
        return []
    if kind == "computed":
        out = ["### Is a 10× cut at under 2% quality loss real?", "",
               "Largest *computed* token reduction factor (dense FLOPs / FLOPs the compiled program executes) within "
               "2% relative quality loss of the dense model, per task and mechanism (pruning: per seed, then mean ± "
               "std over seeds; the other columns: mean over the seeds of each setting, from the MoE / depth ablations "
               "and the single-mechanism variants of the combined run; \"—\" = not run; \"none\" = no setting both "
               "computes less than dense and stays within 2%):", ""]
    else:
        out = ["The same question with the *ideal* factor (dense causal FLOPs / what an ideal sparse kernel would "
               "execute: attention at visible pairs only, experts at their assignments), for comparison; no program "
               "here runs at these figures:", ""]
    best_overall: tuple[float, str] = (float("nan"), "")
    rows = []
    for task in C.TASKS:
        row = [f"`{task}`"]
        have = False
        if any(r["task"] == task for r in sweep):
            have = True
            b = best_within(sweep, task, "learned")
            row.append(fbest(b))
            if _finite(b["mean"]) and not b["mean"] <= best_overall[0]:
                best_overall = (b["mean"], f"learned pruning on `{task}`, {', '.join(b['where'])}")
            bases = [(name, best_within(sweep, task, name)) for name in BASELINE_ORDER]
            bases = [(n, x) for n, x in bases if x["n"]]
            top = max(bases, key=lambda x: x[1]["mean"], default=None)
            row.append(f"{top[0]}: {fpm(top[1]['mean'], top[1]['std'], '{:.2f}')}× ({top[1]['n']}/{top[1]['seeds']} seeds)"
                       if top else "none")
        else:
            row += ["—", "—"]
        combined = [r for r in ablations["combined"] if r["task"] == task]
        # MoE / depth alone come from their ablation, and from the combined run's single-mechanism
        # variants (which cover every task); the combined column is the all-in-one model only.
        columns = (("ablate_moe", ablations["ablate_moe"], ("moe",)),
                   ("ablate_depth", ablations["ablate_depth"], ("mod", "exit")),
                   ("combined", [], ("combined",)))
        for name, rs, from_combined in columns:
            mine = [r for r in rs if r["task"] == task] + [r for r in combined if r["variant"] in from_combined]
            if not mine:
                row.append("—")
                continue
            have = True
            best = ablation_best(C.aggregate(mine, ("variant", "point"), ("trf", "rel_loss")))
            if best is None:
                row.append("none")
                continue
            row.append(f"{ftrf(best['trf_mean'])} (`{best['variant']}`, {best['point']})")
            if not best["trf_mean"] <= best_overall[0]:
                best_overall = (best["trf_mean"], f"`{best['variant']}` ({best['point']}) on `{task}`")
        if have:
            rows.append(row)
    out += table(["task", "learned pruning", "best pruning baseline", "MoE", "adaptive depth", "combined"], rows) + [""]
    if kind != "computed":
        return out
    if _finite(best_overall[0]):
        reached = "was reached" if best_overall[0] >= 10 else "was not reached"
        out += [f"**Answer from these runs:** the largest computed factor within 2% loss is {ftrf(best_overall[0])} "
                f"({best_overall[1]}); a 10× cut within 2% {reached}. These are small CPU-sized models and short "
                "sequences, where attention is a small share of the FLOPs; see the per-mechanism sections for how each "
                "factor is made up. Where the dense model itself is weak (dense quality per seed is listed below), "
                "staying within 2% of it is a low bar.", ""]
    else:
        out += ["**Answer from these runs:** no setting both computes less than the dense model and stays within 2% "
                "of its quality.", ""]
    return out


def ablation_section(root: Path, preset: str, name: str, title: str, figures: Path, extra_cols=()) -> list[str]:
    records = C.with_reduction(C.read_jsonl(root / preset / f"{name}.jsonl"), "computed")
    out = [f"### {title}", ""]
    if not records:
        return out + [f"Not run yet for preset `{preset}` (`python experiments/{name}.py --preset {preset}`).", ""]
    out += [source_line(root, preset, name), ""]
    for task in [t for t in C.TASKS if any(r["task"] == t for r in records)]:
        rs = [r for r in records if r["task"] == task]
        metric = rs[0]["metric"]
        nseeds = len({r["seed"] for r in rs})
        agg = C.aggregate(rs, ("variant", "point"), ("quality", "rel_loss", "trf", "layers_per_token", "prefill_rel",
                                                     *(c for c, _ in extra_cols)))
        body = []
        for a in agg:
            body.append([f"`{a['variant']}`", a["point"], fpm(a["quality_mean"], a["quality_std"]),
                         fpct(a["rel_loss_mean"]), fpm(a["trf_mean"], a["trf_std"], "{:.3f}"),
                         frel(a["layers_per_token_mean"]), frel(a["prefill_rel_mean"])]
                        + [frel(a[f"{c}_mean"]) for c, _ in extra_cols])
        best = ablation_best(agg)
        out += [f"#### `{task}` ({metric}, {nseeds} seed{'s' if nseeds != 1 else ''}, mean ± std)", ""]
        out += table(["variant", "inference", "quality", "rel. loss", "token reduction", "layers/token",
                      "prefill time / dense", *(h for _, h in extra_cols)], body) + [""]
        out += [("Largest token reduction factor within 2% mean relative loss: "
                 + (f"{ftrf(best['trf_mean'])} (`{best['variant']}`, {best['point']})." if best
                    else "none (no variant both computes less than dense and stays within 2%).")), ""]
        fig = figures / f"{name}_{task}.png"
        out += [f"![{title}, {task}]({_rel(fig)})", ""]
    return out


def pictures_section(root: Path, preset: str, figures: Path) -> list[str]:
    pics = root / preset / "pictures"
    out = []
    for stem, caption in (("experts_moe_e8_k2", "expert usage by token class (base MoE)"),
                          ("experts_zero4", "expert usage by token class (with zero-compute experts z*)"),
                          ("depth_layers_used", "layers used per token on a code sample")):
        if (pics / f"{stem}.json").exists():
            out += [f"![{caption}]({_rel(figures / f'{stem}.png')})", ""]
    return (["### Pictures", ""] + out) if out else []


def render(root: Path, preset: str) -> str:
    figures = root / "figures" / preset
    lines = [START, "## Results", "",
             f"*Generated by `python experiments/report.py --preset {preset}` from the files in "
             f"`{_rel(root / preset)}/` alone; do not edit by hand. Every token reduction factor in this section is "
             "the **computed** one (dense FLOPs / FLOPs the compiled program executes, from the compute ledger, "
             "which XLA's cost analysis confirms: `tests/test_realized.py`) unless it says *ideal*.*", ""]
    sizes = _meta(root, preset, "sweep_pruning").get("sizes")
    if sizes:
        m, t = sizes["model"], sizes["train"]
        lines += [f"Preset `{preset}`: d_model {m.get('d_model')}, {m.get('num_layers')} layers, {m.get('num_heads')} heads "
                  f"({m.get('num_kv_heads')} KV), MLP {m.get('mlp_dim')}; trained {t.get('steps')} steps of "
                  f"{t.get('batch_size')} × {t.get('seq_len')} tokens per (task, variant, seed); evaluated on "
                  f"{sizes.get('eval_batches')} held-out batches. Task options: "
                  + "; ".join(f"`{k}`: `{v or 'defaults'}`" for k, v in sizes.get("task_options", {}).items()) + ".", ""]
    lines += headline_section(root, preset, "computed")
    lines += headline_section(root, preset, "ideal")
    lines += pruning_section(root, preset, figures)
    lines += ablation_section(root, preset, "ablate_moe", "Mixture of experts ablation", figures,
                              extra_cols=(("moe_zero_share", "zero-expert share"), ("moe_max_mean_load", "max/mean load")))
    lines += ablation_section(root, preset, "ablate_depth", "Adaptive depth ablation", figures)
    lines += ablation_section(root, preset, "combined", "Pruning + MoE + depth combined", figures)
    lines += pictures_section(root, preset, figures)
    lines += ["### Provenance", ""]
    for name in SCRIPTS:
        meta = _meta(root, preset, name)
        if meta:
            lines.append(f"- `{meta['command']}`: {meta.get('wall_s', 0) / 60:.1f} min wall, "
                         f"{meta.get('invocations', 1)} invocation(s), jax {meta.get('jax')} on {meta.get('backend')}, "
                         f"seeds {meta.get('seeds')}, tasks {', '.join(meta.get('tasks', []))}.")
        else:
            lines.append(f"- `python experiments/{name}.py --preset {preset}`: not run.")
    walls = [_meta(root, preset, n).get("wall_s") for n in SCRIPTS]
    if all(_finite(w) for w in walls):
        total = sum(walls) / 60
        verdict = "met" if total <= 45 else "**not met**"
        lines += ["", f"Total recorded wall time of the four scripts: {total:.1f} min"
                  + (f" (target for the `cpu` preset: under 45 min on 2 CPU cores: {verdict})."
                     if preset == "cpu" else ".")]
        commands = [str(_meta(root, preset, n).get("command", "")) for n in SCRIPTS]
        if all("--results" in c for c in commands):
            lines[-1] += (" The four commands ran into a fresh `--results` folder, so these times include training "
                          "every model and compiling every function (no cached runs, no compilation cache); the "
                          "results files were then copied to `experiments/results/`.")
    tpu = C.sizes("tpu")
    lines += ["", f"The `tpu` preset of every script (one TPU host: the `{tpu.base}` model, {tpu.train['batch_size']} × "
              f"{tpu.train['seq_len']} tokens, {tpu.train['steps']:,} steps, FSDP over the host's chips, {tpu.seeds} seeds, "
              "all tasks for every script) is documented in `experiments/common.py` and was not run here.", "", END]
    return "\n".join(lines) + "\n"


def splice(readme: str, section: str) -> str:
    """README text with the marked section replaced (or appended)."""
    if START in readme and END in readme:
        head, rest = readme.split(START, 1)
        _, tail = rest.split(END, 1)
        return head + section.rstrip("\n") + tail
    sep = "" if not readme or readme.endswith("\n\n") else ("\n" if readme.endswith("\n") else "\n\n")
    return readme + sep + section


def current_section(readme: str) -> Optional[str]:
    if START not in readme or END not in readme:
        return None
    return START + readme.split(START, 1)[1].split(END, 1)[0] + END


def required_files(readme: str, results: Path, preset: str = "cpu") -> set[str]:
    """Every results file the README rests on, relative to ``results``: what the blocks read, what
    the README names by path, and each experiment script's records, meta and CSVs."""
    names = B.used_files(results) | B.referenced_files(readme)
    for name in SCRIPTS:
        names |= {f"{preset}/{name}{suffix}" for suffix in (".jsonl", ".meta.json", ".csv", "_summary.csv")}
    names |= {f"{preset}/pictures/{p.name}" for p in (results / preset / "pictures").glob("*.json")}
    if B.current_block(readme, "long_context") is not None:  # experiments/long_context.py --preset long
        names |= {f"long/long_context{suffix}" for suffix in (".jsonl", ".csv", ".meta.json", ".summary.json")}
    return names


def check(readme: str, section: str, results: Path) -> list[str]:
    """Every reason the README is not what the results files say (empty: up to date)."""
    problems = []
    if current_section(readme) != section.rstrip("\n"):
        problems.append("the results section is out of date")
    # A README with the results section only (e.g. one for another results root) has no blocks to
    # check; a README with some blocks must have all of them.
    has_blocks = any(B.current_block(readme, name) is not None for name in B.BLOCKS)
    for name in B.BLOCKS if has_blocks else ():
        try:
            text = B.render_block(name, results)
        except B.MissingResults as e:
            problems.append(f"block {name}: {e}")
            continue
        current = B.current_block(readme, name)
        if current is None:
            problems.append(f"block {name}: no <!-- report:{name}:start --> ... end region in the README")
        elif current != text:
            problems.append(f"block {name} is out of date (a number differs from its results file)")
    if has_blocks:
        problems += [f"results file {results / name} is missing" for name in sorted(required_files(readme, results))
                     if not (results / name).exists()]
    problems += [f"hand-typed number outside the generated regions: {n}"
                 for n in B.hand_typed_numbers(readme, B.NOT_RESULTS)]
    problems += [f"absolute path in a command (record paths relative to the repository): {p}"
                 for p in B.absolute_paths_in_code(readme)]
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--results", type=Path, default=C.RESULTS_ROOT)
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a generated region differs from what the results files give, a results file "
                             "is missing, or a measured number sits outside the generated regions")
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args(argv)
    section = render(args.results, args.preset)
    readme = args.readme.read_text() if args.readme.exists() else ""
    if args.check:
        problems = check(readme, section, args.results)
        for problem in problems:
            print(f"{args.readme}: {problem}", file=sys.stderr)
        if problems:
            print("run python experiments/report.py to regenerate the regions", file=sys.stderr)
            return 1
        print(f"{args.readme}: every generated region is up to date")
        return 0
    if not args.no_figures:
        from experiments import plots

        plots.draw_all(args.results, args.preset)
        long_rows = C.read_jsonl(args.results / "long" / "long_context.jsonl")  # experiments/long_context.py
        if long_rows:
            plots.long_context_fronts(long_rows, args.results / "figures", "long")
    readme = splice(readme, section)
    for name in B.BLOCKS:
        if B.current_block(readme, name) is not None:
            readme = B.splice_block(readme, name, B.render_block(name, args.results))
    args.readme.write_text(readme)
    print(f"wrote the generated regions of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
