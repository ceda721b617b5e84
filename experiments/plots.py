"""Figures from the results files alone (matplotlib, Agg backend): Pareto fronts and token pictures.

* :func:`pareto` quality against token reduction factor for one task: the learned pruning sweeps
  (threshold, budget, budget + compaction) and every baseline, mean and standard deviation over
  seeds, with the dense model and its 2% quality-loss level;
* :func:`ablation_scatter` quality against token reduction factor for the MoE / depth / combined
  variants;
* :func:`keep_map` which tokens each pruning layer keeps, drawn over a code sample or a task input;
* :func:`expert_usage` routed-expert share per token class (whitespace, identifiers, keywords,
  punctuation, digits, other) for each MoE layer;
* :func:`long_context_fronts` request-level Pareto fronts at long context (prompt -> prune ->
  continue): quality loss against the computed reduction of the whole request, per task and
  distractor level, every method at matched KV budgets;
* :func:`layers_used` how many blocks each token of a code sample went through (adaptive depth).

Every function takes plain records / JSON dicts (as stored under ``experiments/results/``) and a
PNG path; ``python experiments/plots.py`` redraws all figures of a preset.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
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
    "oracle@1": ("tab:pink", "P"),
    "snapkv": ("tab:purple", "<"),
    "learned-scratch": ("tab:brown", "h"),
}
_META = {"Software": "matplotlib"}  # fixed PNG metadata: no version string or date


def _save(fig, path: Path) -> Path:
    """PNG at 90 dpi in a 256-colour palette: these flat plots look the same at a third of the bytes
    (the repository and the notebook's embedded outputs stay small)."""
    from PIL import Image, PngImagePlugin

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata=_META)
    plt.close(fig)
    image = Image.open(buf).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    info = PngImagePlugin.PngInfo()
    for key, value in _META.items():
        info.add_text(key, value)
    image.save(path, format="PNG", optimize=True, pnginfo=info)
    return path


def _series_label(r: Mapping) -> str:
    if r["method"] == "learned":
        if r["rule"] == "budget":
            return "learned+compact" if r.get("compaction") else "learned (budget)"
        return "learned (threshold)"
    return r["method"]


def _log_axis(ax, axis: str = "x", suffix: str = "", candidates: Sequence[float] = ()) -> None:
    """Readable ticks on a log axis spanning less than a few decades: 'nice' numbers (1, 1.2, 1.5,
    2, ... or the given candidates) at roughly even log spacing, written out plainly, no minor labels."""
    getter = ax.get_xlim if axis == "x" else ax.get_ylim
    lo, hi = sorted(getter())
    if lo <= 0 or hi <= lo:
        return
    gap = math.log10(hi / lo) / 6
    ticks: list[float] = []
    for v in sorted(candidates) or _NICE:
        if lo <= v <= hi and (not ticks or math.log10(v / ticks[-1]) >= gap):
            ticks.append(v)
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(mticker.FixedLocator(ticks))
    target.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}{suffix}"))
    target.set_minor_locator(mticker.NullLocator())


_NICE = sorted({round(m * 10.0 ** e, 6) for e in range(-3, 4)
                for m in (1, 1.1, 1.2, 1.3, 1.5, 1.7, 2, 2.5, 3, 4, 5, 6, 7, 8)})


def pareto(records: Sequence[Mapping], task: str, path: Path, tolerance: float = 0.02) -> Path:
    """Quality vs token reduction factor (left) and vs fraction of keys kept (right) for one task of
    the pruning sweep, mean +- std over seeds; one legend beside both panels."""
    rows = [r for r in records if r["task"] == task and r.get("trf") is not None]
    metric = rows[0]["metric"] if rows else "accuracy"
    agg = C.aggregate(rows, ("weights", "method", "rule", "value", "compaction"), ("quality", "trf", "keep_ratio"))
    fig, axes = plt.subplots(1, 2, figsize=(9.4, 4.0), sharey=True)
    series: dict[str, list[dict]] = {}
    for a in agg:
        if a["method"] == "dense" or a["rule"] == "keep_all":
            continue
        series.setdefault(_series_label(a), []).append(a)
    dense = [a for a in agg if a["method"] == "dense"]
    for ax, xkey, xlabel in ((axes[0], "trf", "token reduction factor, computed (dense FLOPs / compiled FLOPs)"),
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
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelsize=9)
    axes[1].invert_xaxis()  # fewer kept tokens to the right, like a larger reduction
    _log_axis(axes[0], suffix="×")
    _log_axis(axes[1], candidates=[2.0 ** -k for k in range(16)])
    axes[0].set_ylabel("bits per byte (lower is better)" if metric == "bpb" else "accuracy (higher is better)",
                       fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(f"learned token pruning vs baselines: {task} (mean ± std over seeds)", fontsize=11)
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=5, fontsize=9, frameon=False)
    return _save(fig, path)


def long_context_fronts(records: Sequence[Mapping], out_dir: Path, preset: str, tolerance: float = 0.02) -> list[Path]:
    """One figure per task of ``experiments/long_context.py``: a panel per distractor level,
    relative quality loss (%) against the computed reduction of the whole request (log), one line
    per method over its KV budgets (mean +- std over seeds), the 2% level dashed."""
    made = []
    for task in sorted({r["task"] for r in records}):
        rows = [r for r in records if r["task"] == task and r["method"] != "dense"]
        levels = sorted({r["level"] for r in rows}, key=lambda lv: ("vocab", "code", "distractors", "source").index(lv))
        fig, axes = plt.subplots(1, len(levels), figsize=(4.6 * len(levels) + 0.4, 4.0), squeeze=False)
        for ax, level in zip(axes[0], levels):
            agg = C.aggregate([r for r in rows if r["level"] == level], ("method", "budget"), ("rel_loss", "trf_computed"))
            for method in sorted({a["method"] for a in agg}, key=lambda m: (not m.startswith("learned"), m)):
                pts = sorted((a for a in agg if a["method"] == method and np.isfinite(a["rel_loss_mean"])
                              and np.isfinite(a["trf_computed_mean"])), key=lambda a: a["trf_computed_mean"])
                if not pts:  # e.g. an untrained dense model with no quality to lose (smoke runs)
                    continue
                color, marker = STYLE.get(method, ("black", "."))
                ax.errorbar([p["trf_computed_mean"] for p in pts], [100 * p["rel_loss_mean"] for p in pts],
                            xerr=[p["trf_computed_std"] for p in pts], yerr=[100 * p["rel_loss_std"] for p in pts],
                            color=color, marker=marker, ls="-" if method.startswith("learned") else ":",
                            label=method, capsize=2, ms=5, lw=1.3 if method.startswith("learned") else 1.0)
            ax.axhline(100 * tolerance, color="black", lw=0.8, ls="--", label=f"{tolerance:.0%} quality loss")
            ax.axhline(0.0, color="gray", lw=0.5)
            ax.set_xscale("log")
            _log_axis(ax, suffix="×")
            ax.set_xlabel("token reduction, computed (whole request, dense FLOPs / FLOPs)", fontsize=9)
            ax.set_title(f"{task}: {level}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
            ax.tick_params(labelsize=9)
        metric = "accuracy lost" if task == "needle" else "bits per byte added"
        axes[0][0].set_ylabel(f"quality loss vs dense, % ({metric})", fontsize=9)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.suptitle(f"prompt -> prune -> continue at matched KV budgets ({preset}; mean ± std over seeds)", fontsize=11)
        fig.tight_layout()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=6, fontsize=9, frameon=False)
        made.append(_save(fig, Path(out_dir) / preset / f"long_context_{task}.png"))
    return made


def ablation_scatter(rows: Sequence[Mapping], path: Path, title: str, label_key: str = "variant",
                     tolerance: float = 0.02) -> Path:
    """Quality vs token reduction factor per variant (mean +- std over seeds) for one task; the
    legend sits beside the axes."""
    rows = [r for r in rows if r.get("trf") is not None]
    metric = rows[0]["metric"] if rows else "bpb"
    agg = C.aggregate(rows, (label_key,), ("quality", "trf"))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    cmap = plt.get_cmap("tab10")
    markers = "osD^v<>ph*"
    for i, a in enumerate(agg):
        ax.errorbar([a["trf_mean"]], [a["quality_mean"]], xerr=[a["trf_std"]], yerr=[a["quality_std"]],
                    marker=markers[i // 10 % len(markers)], color=cmap(i % 10), capsize=2, ls="none", ms=6,
                    label=str(a[label_key]))
    ref = [a for a in agg if a[label_key] == "dense"]
    if ref:
        q = ref[0]["quality_mean"]
        ax.axhline(q * (1 + tolerance) if metric == "bpb" else q * (1 - tolerance), color="black", lw=0.8, ls="--",
                   label=f"{tolerance:.0%} quality loss vs dense")
    ax.set_xscale("log")
    _log_axis(ax, suffix="×")
    ax.set_xlabel("token reduction factor, computed (dense FLOPs / compiled FLOPs)", fontsize=9)
    ax.set_ylabel("bits per byte (lower is better)" if metric == "bpb" else "accuracy (higher is better)", fontsize=9)
    ax.tick_params(labelsize=9)
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title=label_key,
              title_fontsize=9)
    return _save(fig, path)


# ----------------------------------------------------------------------------- token pictures

CELL = 0.24  # inches per token cell in the token pictures
_GLYPH_KEY = {"text": {"·": "space", "⏎": "newline", "→": "tab", "?": "other byte"},
              "task": {"k": "key", "v": "value", ".": "filler", "_": "padding", "Q": "query", "M": "marker",
                       "1-9": "hop number"}}


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


def _glyph_note(tokens: Sequence[int], task: str) -> str:
    """'glyphs: k key, v value, ...' for the glyphs that occur in this picture."""
    seen = {_glyph(int(t), task) for t in tokens}
    key = _GLYPH_KEY["text" if task == "text" else "task"]
    parts = [f"{g} {name}" for g, name in key.items() if g in seen or (g == "1-9" and seen & set("123456789"))]
    return ("glyphs: " + ", ".join(parts)) if parts else ""


def _token_picture(tokens: Sequence[int], rows: Sequence[tuple[str, Sequence[float], Callable]], task: str,
                   width: int, title: str, legend: Sequence, note: str, path: Path) -> Path:
    """Each row (label, per-token value, value -> colour) as coloured cells under the token glyphs,
    ``width`` tokens per line; a colour key and a glyph key below."""
    n = len(tokens)
    lines = math.ceil(n / width)
    gap = 0.7
    height = lines * len(rows) + (lines - 1) * gap
    fig = plt.figure(figsize=(width * CELL, height * CELL))
    ax = fig.add_axes((0, 0, 1, 1))
    y = 0.0
    for line in range(lines):
        lo, hi = line * width, min(n, (line + 1) * width)
        for label, values, color in rows:
            for j in range(lo, hi):
                face = color(values[j])
                r, g, b = matplotlib.colors.to_rgb(face)
                ax.add_patch(plt.Rectangle((j - lo, -y - 1), 1, 1, facecolor=face, edgecolor="white", lw=0.5))
                ax.text(j - lo + 0.5, -y - 0.5, _glyph(int(tokens[j]), task), ha="center", va="center", fontsize=8.5,
                        family="monospace", color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.45 else "black")
            ax.text(-0.4, -y - 0.5, label, ha="right", va="center", fontsize=9)
            y += 1
        if line < lines - 1:
            y += gap
    ax.text(width, -y - 0.1, f"tokens 0-{n - 1}" + (" (the sample continues)" if task == "text" else ""),
            ha="right", va="top", fontsize=8, color="dimgray")
    ax.set_xlim(0, width)
    ax.set_ylim(-height, 0)
    ax.axis("off")
    ax.set_title(title, fontsize=10, loc="left", pad=6)
    ax.legend(handles=list(legend), loc="upper left", bbox_to_anchor=(0.0, -0.9 / height), ncol=len(legend),
              fontsize=9, frameon=False, handlelength=1.2, columnspacing=1.2, borderaxespad=0.0)
    if note:
        ax.text(0, -height - 2.4, note, ha="left", va="top", fontsize=8.5)
    return _save(fig, path)


def keep_map(picture: Mapping, path: Path, width: int = 32) -> Path:
    """Which tokens each pruning layer keeps as keys (blue) over one example, oracle tokens on top."""
    from matplotlib.patches import Patch

    tokens, task = picture["tokens"], picture["task"]
    kept, pruned, answer = "#4a90c8", "#eef3f8", "#f2a03d"
    rows = []
    legend = [Patch(facecolor=kept, label="kept as a key"), Patch(facecolor=pruned, edgecolor="lightgray", label="pruned")]
    if any(picture.get("oracle", [])):
        rows.append(("oracle", picture["oracle"], lambda v: answer if v else pruned))
        legend.append(Patch(facecolor=answer, label="oracle: answer-carrying token"))
    for layer, keep in picture["layers"].items():
        rows.append((f"layer {layer}", keep, lambda v: kept if v >= 0.5 else pruned))
    sinks = picture["num_sinks"]
    first = "the first token" if sinks == 1 else f"the first {sinks} tokens"
    title = (f"tokens kept by learned pruning ({task}, threshold {picture['threshold']}; {first} "
             f"and each query's last {picture['window']} are always visible)")
    return _token_picture(tokens, rows, task, width, title, legend, _glyph_note(tokens, task), path)


def layers_used(picture: Mapping, path: Path, width: int = 32) -> Path:
    """How many blocks each token went through, drawn over a code sample (darker = more layers)."""
    from matplotlib.patches import Patch

    tokens, depth = picture["tokens"], picture["num_layers"]
    cmap = plt.get_cmap("Greens")
    color = lambda v: cmap(0.2 + 0.75 * (v - 1) / max(depth - 1, 1))  # noqa: E731  (1 layer light, all dark)
    rows = [(name, values, color) for name, values in picture["rows"].items()]
    used = sorted({int(v) for _, values, _ in rows for v in values} | {depth})
    legend = [Patch(facecolor=color(v), label=f"{v} layer{'s' if v != 1 else ''}") for v in used]
    title = f"layers used per token (of {depth}), {picture.get('title', '')}"
    return _token_picture(tokens, rows, picture.get("task", "text"), width, title, legend,
                          _glyph_note(tokens, picture.get("task", "text")), path)


def expert_usage(picture: Mapping, path: Path) -> Path:
    """Heatmaps: share of each token class's routed choices going to each expert, per MoE layer."""
    layers = picture["layers"]  # {layer: {class: [counts per choice]}}
    classes = picture["classes"]
    shares = {}
    for layer, table in layers.items():
        m = np.array([table[c] for c in classes], dtype=float)
        shares[layer] = m / np.maximum(m.sum(axis=1, keepdims=True), 1.0)
    vmax = max(max(float(m.max()) for m in shares.values()), 1e-6)
    names = picture["choice_names"]
    cell = min(0.35, 7.2 / (len(names) * len(layers)))  # inches per expert column: at most ~10 inches in all
    fig, axes = plt.subplots(1, len(layers), figsize=(cell * len(names) * len(layers) + 2.8, 3.4), squeeze=False,
                             constrained_layout=True)
    im = None
    for i, (ax, (layer, m)) in enumerate(zip(axes[0], shares.items())):
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        labels = [f"{c} ({picture['tokens_per_class'][c]:,})" for c in classes] if i == 0 else []
        ax.set_yticks(range(len(classes)), labels, fontsize=9)
        ax.set_xticks(range(len(names)), names, fontsize=9, rotation=0 if cell >= 0.3 else 90)
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xlabel("expert", fontsize=9)
        if i == 0:
            ax.set_ylabel("token class (tokens)", fontsize=9)
    cbar = fig.colorbar(im, ax=list(axes[0]), fraction=0.03)
    cbar.set_label("share of the class's routed choices", fontsize=9)
    cbar.ax.tick_params(labelsize=8)
    zero = any(n.startswith("z") for n in names)
    fig.suptitle(f"expert usage by token class ({picture.get('variant', '')}): e* routed experts"
                 + (", z* zero-compute experts" if zero else "") + "; each row sums to 1", fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------- all figures of a preset


def figures_dir(results_root: Path, preset: str) -> Path:
    return Path(results_root) / "figures" / preset


def draw_all(results_root: Path, preset: str) -> list[Path]:
    """Draws every figure whose results exist; returns the PNG paths (sorted)."""
    root = Path(results_root)
    out = figures_dir(root, preset)
    made: list[Path] = []
    sweep = C.with_reduction(C.read_jsonl(root / preset / "sweep_pruning.jsonl"), "computed")
    for task in C.TASKS:
        if any(r["task"] == task for r in sweep):
            made.append(pareto(sweep, task, out / f"pareto_{task}.png"))
    for name, title in (("ablate_moe", "MoE ablation"), ("ablate_depth", "adaptive depth ablation"),
                        ("combined", "pruning + MoE + depth")):
        rows = C.with_reduction(C.read_jsonl(root / preset / f"{name}.jsonl"), "computed")
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
