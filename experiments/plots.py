"""Figures from the results files alone (matplotlib, Agg backend): Pareto fronts and token pictures.

* :func:`pareto` quality against token reduction factor for one task: the learned pruning sweeps
  (threshold, budget, budget + compaction) and every baseline, mean and standard deviation over
  seeds, with the dense model and its 2% quality-loss level;
* :func:`ablation_scatter` quality against token reduction factor for the MoE / depth / combined
  variants;
* :func:`keep_map` which tokens each pruning layer keeps, drawn over a code sample or a task input;
* :func:`expert_usage` routed-expert share per token class (whitespace, identifiers, keywords,
  punctuation, digits, other) for each MoE layer;
* :func:`layers_used` how many blocks each token of a code sample went through (adaptive depth).

Every function takes plain records / JSON dicts (as stored under ``experiments/results/``) and a
PNG path; ``python experiments/plots.py`` redraws all figures of a preset.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import common as C  # noqa: E402

STYLE = {  # method -> (color, marker)
    "learned": ("tab:blue", "o"),
    "learned+compact": ("tab:cyan", "D"),
    "random": ("tab:gray", "x"),
    "window": ("tab:orange", "s"),
    "h2o": ("tab:green", "^"),
    "tova": ("tab:olive", "v"),
    "oracle": ("tab:red", "*"),
}
_META = {"Software": "matplotlib"}  # fixed PNG metadata: no version string or date


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight", metadata=_META)
    plt.close(fig)
    return path


def _series_label(r: Mapping) -> str:
    if r["method"] == "learned":
        if r["rule"] == "budget":
            return "learned+compact" if r.get("compaction") else "learned (budget)"
        return "learned (threshold)"
    return r["method"]


def pareto(records: Sequence[Mapping], task: str, path: Path, tolerance: float = 0.02) -> Path:
    """Quality vs token reduction factor (left) and vs fraction of keys kept (right) for one task of
    the pruning sweep, mean +- std over seeds."""
    rows = [r for r in records if r["task"] == task and r.get("trf") is not None]
    metric = rows[0]["metric"] if rows else "accuracy"
    agg = C.aggregate(rows, ("weights", "method", "rule", "value", "compaction"), ("quality", "trf", "keep_ratio"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    series: dict[str, list[dict]] = {}
    for a in agg:
        if a["method"] == "dense" or a["rule"] == "keep_all":
            continue
        series.setdefault(_series_label(a), []).append(a)
    dense = [a for a in agg if a["method"] == "dense"]
    for ax, xkey, xlabel in ((axes[0], "trf", "token reduction factor (dense FLOPs / computed FLOPs, ledger)"),
                             (axes[1], "keep_ratio", "fraction of tokens kept as keys (per pruning layer)")):
        for label, pts in sorted(series.items()):
            pts = sorted(pts, key=lambda p: p[f"{xkey}_mean"])
            key = "learned+compact" if label == "learned+compact" else label.split(" ")[0]
            color, marker = STYLE.get(key, ("black", "."))
            ls = "-" if label.startswith("learned") else ":"
            if label == "learned (budget)":
                ls, marker = "--", "o"
            ax.errorbar([p[f"{xkey}_mean"] for p in pts], [p["quality_mean"] for p in pts],
                        xerr=[p[f"{xkey}_std"] for p in pts], yerr=[p["quality_std"] for p in pts],
                        color=color, marker=marker, ls=ls, label=label, capsize=2, ms=5, lw=1.2)
        if dense:
            q = dense[0]["quality_mean"]
            ax.scatter([1.0], [q], color="black", marker="*", s=120, zorder=5, label="dense")
            level = q * (1 + tolerance) if metric == "bpb" else q * (1 - tolerance)
            ax.axhline(level, color="black", lw=0.8, ls="--", label=f"{tolerance:.0%} quality loss")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].invert_xaxis()  # fewer kept tokens to the right, like a larger reduction
    axes[0].set_ylabel("bits per byte (lower is better)" if metric == "bpb" else "accuracy")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"learned token pruning vs baselines: {task} (mean ± std over seeds)")
    return _save(fig, path)


def ablation_scatter(rows: Sequence[Mapping], path: Path, title: str, label_key: str = "variant",
                     tolerance: float = 0.02) -> Path:
    """Quality vs token reduction factor per variant (mean +- std over seeds) for one task."""
    rows = [r for r in rows if r.get("trf") is not None]
    metric = rows[0]["metric"] if rows else "bpb"
    agg = C.aggregate(rows, (label_key,), ("quality", "trf"))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    cmap = plt.get_cmap("tab10")
    for i, a in enumerate(agg):
        ax.errorbar([a["trf_mean"]], [a["quality_mean"]], xerr=[a["trf_std"]], yerr=[a["quality_std"]],
                    marker="o", color=cmap(i % 10), capsize=2, ls="none", label=str(a[label_key]))
    ref = [a for a in agg if a[label_key] == "dense"]
    if ref:
        q = ref[0]["quality_mean"]
        ax.axhline(q * (1 + tolerance) if metric == "bpb" else q * (1 - tolerance), color="black", lw=0.8, ls="--",
                   label=f"{tolerance:.0%} quality loss")
    ax.set_xscale("log")
    ax.set_xlabel("token reduction factor (ledger)")
    ax.set_ylabel("bits per byte (lower is better)" if metric == "bpb" else "accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="best", ncol=2)
    return _save(fig, path)


# ----------------------------------------------------------------------------- token pictures


def _glyph(token: int, task: str) -> str:
    """A printable character for a byte token (text) or a task token id."""
    if task == "text":
        ch = chr(token)
        return {"\n": "⏎", "\t": "→", " ": "·"}.get(ch, ch if 32 < token < 127 else "?")
    from ling_jax.data import tasks as T

    if token == T.PAD:
        return "_"
    if token == T.MARK:
        return "M"
    if token == T.QUERY:
        return "Q"
    if T.HOP_BASE < token < T.FILLER_START:
        return str(token - T.HOP_BASE)
    if T.FILLER_START <= token < T.KEY_START:
        return "."
    if T.KEY_START <= token < T.VALUE_START:
        return "k"
    return "v"


def _token_grid(ax, tokens, rows: Sequence[tuple[str, Sequence[float]]], task: str, width: int, cmap, vmax: float):
    """Draws each row (label, per-token value) as colored cells with the token glyphs."""
    n = len(tokens)
    lines = math.ceil(n / width)
    y = 0
    for line in range(lines):
        lo, hi = line * width, min(n, (line + 1) * width)
        for label, values in rows:
            for j in range(lo, hi):
                v = values[j]
                ax.add_patch(plt.Rectangle((j - lo, -y - 1), 1, 1, color=cmap(v / vmax if vmax else 0), lw=0))
                ax.text(j - lo + 0.5, -y - 0.5, _glyph(int(tokens[j]), task), ha="center", va="center",
                        fontsize=5.5, family="monospace")
            ax.text(-0.5, -y - 0.5, label, ha="right", va="center", fontsize=6)
            y += 1
        y += 0.6
    ax.set_xlim(-8, width)
    ax.set_ylim(-y, 0)
    ax.axis("off")


def keep_map(picture: Mapping, path: Path, width: int = 64) -> Path:
    """Which tokens each pruning layer keeps (dark = kept) over one example, oracle tokens on top."""
    tokens, task = picture["tokens"], picture["task"]
    rows = []
    if any(picture.get("oracle", [])):
        rows.append(("oracle", picture["oracle"]))
    for layer, keep in picture["layers"].items():
        rows.append((f"layer {layer}", keep))
    lines = math.ceil(len(tokens) / width)
    fig, ax = plt.subplots(figsize=(width * 0.14 + 1, lines * (len(rows) + 0.6) * 0.2 + 0.6))
    _token_grid(ax, tokens, rows, task, width, plt.get_cmap("Blues"), vmax=1.6)
    ax.set_title(f"tokens kept by learned pruning ({task}, threshold {picture['threshold']}; "
                 f"sinks {picture['num_sinks']} and each query's last {picture['window']} always visible)", fontsize=8)
    return _save(fig, path)


def layers_used(picture: Mapping, path: Path, width: int = 64) -> Path:
    """How many blocks each token went through, drawn over a code sample (dark = more layers)."""
    tokens = picture["tokens"]
    rows = [(name, values) for name, values in picture["rows"].items()]
    lines = math.ceil(len(tokens) / width)
    fig, ax = plt.subplots(figsize=(width * 0.14 + 1, lines * (len(rows) + 0.6) * 0.2 + 0.6))
    _token_grid(ax, tokens, rows, picture.get("task", "text"), width, plt.get_cmap("Greens"),
                vmax=picture["num_layers"] * 1.3)
    ax.set_title(f"layers used per token (of {picture['num_layers']}), {picture.get('title', '')}", fontsize=8)
    return _save(fig, path)


def expert_usage(picture: Mapping, path: Path) -> Path:
    """Heatmaps: share of each token class's routed choices going to each expert, per MoE layer."""
    layers = picture["layers"]  # {layer: {class: [counts per choice]}}
    classes = picture["classes"]
    shares = {}
    for layer, table in layers.items():
        m = np.array([table[c] for c in classes], dtype=float)
        shares[layer] = m / np.maximum(m.sum(axis=1, keepdims=True), 1.0)
    vmax = max(max(float(m.max()) for m in shares.values()), 1e-6)
    fig, axes = plt.subplots(1, len(layers), figsize=(3.0 * len(layers) + 2.2, 2.8), squeeze=False,
                             constrained_layout=True)
    names = picture["choice_names"]
    im = None
    for i, (ax, (layer, m)) in enumerate(zip(axes[0], shares.items())):
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        labels = [f"{c} ({picture['tokens_per_class'][c]})" for c in classes] if i == 0 else []
        ax.set_yticks(range(len(classes)), labels, fontsize=7)
        ax.set_xticks(range(len(names)), names, fontsize=6, rotation=90)
        ax.set_title(f"layer {layer}", fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.03, label="share of the class's choices")
    fig.suptitle(f"expert usage by token class ({picture.get('variant', '')}; e* routed experts, z* zero-compute; "
                 "rows sum to 1; token counts in brackets)", fontsize=8)
    return _save(fig, path)


# ----------------------------------------------------------------------------- all figures of a preset


def figures_dir(results_root: Path, preset: str) -> Path:
    return Path(results_root) / "figures" / preset


def draw_all(results_root: Path, preset: str) -> list[Path]:
    """Draws every figure whose results exist; returns the PNG paths (sorted)."""
    root = Path(results_root)
    out = figures_dir(root, preset)
    made: list[Path] = []
    sweep = C.read_jsonl(root / preset / "sweep_pruning.jsonl")
    for task in C.TASKS:
        if any(r["task"] == task for r in sweep):
            made.append(pareto(sweep, task, out / f"pareto_{task}.png"))
    for name, title in (("ablate_moe", "MoE ablation"), ("ablate_depth", "adaptive depth ablation"),
                        ("combined", "pruning + MoE + depth")):
        rows = C.read_jsonl(root / preset / f"{name}.jsonl")
        for task in C.TASKS:
            mine = [r for r in rows if r["task"] == task]
            if mine:
                made.append(ablation_scatter(mine, out / f"{name}_{task}.png", f"{title}: {task}"))
    pictures = root / preset / "pictures"
    for p in sorted(pictures.glob("keep_*.json")) if pictures.exists() else []:
        made.append(keep_map(json.loads(p.read_text()), out / f"{p.stem}.png"))
    for p in sorted(pictures.glob("experts_*.json")) if pictures.exists() else []:
        made.append(expert_usage(json.loads(p.read_text()), out / f"{p.stem}.png"))
    for p in sorted(pictures.glob("depth_*.json")) if pictures.exists() else []:
        made.append(layers_used(json.loads(p.read_text()), out / f"{p.stem}.png"))
    return sorted(made)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--results", type=Path, default=C.RESULTS_ROOT)
    args = parser.parse_args(argv)
    for p in draw_all(args.results, args.preset):
        print(p)


if __name__ == "__main__":
    main()
