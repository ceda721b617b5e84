"""What the experiment scripts share: preset sizes, the config of one run, resumable results files.

Training, checkpoints, resume, evaluation and timing are ``ling_jax``'s (:mod:`ling_jax.runs`,
:mod:`ling_jax.evaluation`, :mod:`ling_jax.timing`); provenance is :mod:`ling_jax.provenance`.
Every script (``sweep_pruning.py``, ``ablate_moe.py``, ``ablate_depth.py``, ``combined.py``):

* :func:`make_config`: the :class:`~ling_jax.config.Config` of one (task, variant, seed): the
  preset's sizes plus the variant's dotted overrides, through :func:`ling_jax.config.apply_overrides`;
* :func:`train_or_load`: trains it once in ``<results>/runs/<preset>/<task>/<variant>/seed<k>/``
  (a ling_jax workdir: orbax checkpoints, resumed mid-run, refused if trained with other settings);
* :func:`evaluate` and :func:`ling_jax.timing.time_relative`: quality, token reduction, timing;
* :class:`ResultsFile` appends one JSON line per finished point, so an interrupted script resumes;
  :class:`RunMeta` writes the ``<name>.meta.json`` provenance beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

from ling_jax.config import Config, ModelConfig, apply_overrides, get_preset
from ling_jax.evaluation import evaluate as _evaluate
from ling_jax.evaluation import relative_loss  # noqa: F401  (re-exported)
from ling_jax.provenance import Provenance, checkpoint_provenance
from ling_jax.runs import Trained
from ling_jax.runs import train_or_load as _train_or_load
from ling_jax.timing import time_decode_relative, time_relative  # noqa: F401  (re-exported)
from ling_jax.workdir import atomic_write

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
PRESETS = ("smoke", "cpu", "tpu")


# ----------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Model and training sizes of one preset (shared by every experiment script)."""

    base: str  # ling_jax preset the sizes start from
    model: Mapping[str, Any]  # ModelConfig field -> value
    train: Mapping[str, Any]  # TrainConfig field -> value
    seeds: int
    eval_batches: int
    time_repeats: int  # timed calls per measurement (median)
    task_options: Mapping[str, str]  # task -> DataConfig.task_options
    sharded: bool = False  # train through ling_jax.train.train on the config's device mesh (FSDP)
    eval_batch_size: int = 0  # 0: the training batch size


SIZES: dict[str, Sizes] = {
    # Seconds: the test-suite preset (2 layers, d_model 32, 2 steps, one seed).
    "smoke": Sizes(
        base="cpu-tiny",
        # two inference buckets (empty, all): the bucketed depth path with the fewest branches to compile
        model={"d_model": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 64, "max_seq_len": 64,
               "depth.infer_buckets": "0,1.0"},
        train=dict(batch_size=4, seq_len=48, steps=2, warmup_steps=1, learning_rate=3e-3),
        seeds=1, eval_batches=1, time_repeats=1,
        task_options={"mqar": "num_pairs=4,num_queries=4,filler_fraction=0.5,num_keys=8,num_values=8",
                      "needle": "num_needles=2,num_keys=16,num_values=16",
                      "multihop": "num_nodes=4,max_hops=2,filler_fraction=0.5",
                      "text": ""},
    ),
    # The whole set of cpu-preset scripts took 22.7 minutes from scratch on 2 idle CPU cores. Task sizes are
    # ones a 3-layer d_model-64 model learns (or half learns: MQAR) in 400 steps of 32 x 64 tokens.
    "cpu": Sizes(
        base="cpu-tiny",
        model=dict(d_model=64, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=128, max_seq_len=64),
        train=dict(batch_size=32, seq_len=64, steps=400, warmup_steps=30, learning_rate=3e-3),
        seeds=3, eval_batches=4, time_repeats=5,
        task_options={"mqar": "num_pairs=4,num_queries=4,filler_fraction=0.75,num_keys=8,num_values=8",
                      "needle": "num_needles=1,num_keys=16,num_values=16",
                      "multihop": "num_nodes=4,max_hops=2,filler_fraction=0.75",
                      "text": ""},
    ),
    # One TPU host (v5e-8 / v4-8): the tpu-base model (~150M params, bf16, FSDP), 2k tokens.
    # Documented, not run here.
    "tpu": Sizes(
        base="tpu-base",
        model=dict(max_seq_len=2048),
        train=dict(batch_size=256, seq_len=2048, steps=20_000),
        seeds=3, eval_batches=32, time_repeats=10,
        task_options={"mqar": "num_pairs=64,num_queries=64,filler_fraction=0.9,num_keys=96,num_values=96",
                      "needle": "num_needles=16,num_keys=96,num_values=96",
                      "multihop": "num_nodes=32,max_hops=4,filler_fraction=0.9",
                      "text": ""},
        sharded=True, eval_batch_size=16,
    ),
}

TASKS = ("mqar", "needle", "multihop", "text")


def sizes(preset: str) -> Sizes:
    if preset not in SIZES:
        raise ValueError(f"unknown preset {preset!r}; allowed: {list(SIZES)}")
    return SIZES[preset]


def make_config(preset: str, task: str, seed: int, overrides: Mapping[str, Any] = (),
                train_overrides: Mapping[str, Any] = ()) -> Config:
    """The config of one training run: preset sizes + task + seed + ``train_overrides`` (e.g.
    ``{"train.steps": 50}``) + variant ``overrides`` (dotted config paths with Python values,
    ``{"model.pruning.enabled": True}``), all applied together by ``apply_overrides``."""
    s = sizes(preset)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {list(TASKS)}")
    flat: dict[str, Any] = {f"model.{k}": v for k, v in s.model.items()}
    flat.update({f"train.{k}": v for k, v in s.train.items()})
    flat.update({"train.seed": seed, "train.eval_batches": s.eval_batches, "train.log_every": 10 ** 9,
                 "train.checkpoint_every": s.train["steps"], "data.task": task,
                 "data.task_options": s.task_options[task]})
    return apply_overrides(get_preset(s.base), {**flat, **dict(train_overrides), **dict(overrides)})


def with_model(config: ModelConfig, overrides: Mapping[str, Any]) -> ModelConfig:
    """An inference variant of a trained model: overrides relative to the model (``{"pruning.threshold": 0.3}``)."""
    return apply_overrides(config, overrides)


def run_dir_for(results_root: Path, preset: str, task: str, variant: str, seed: int) -> Path:
    return Path(results_root) / "runs" / preset / task / variant / f"seed{seed}"


def train_or_load(config: Config, run_dir: Path, *, sharded: bool = False, progress: bool = False) -> Trained:
    """One training run (:func:`ling_jax.runs.train_or_load`); unsharded presets train on one device."""
    return _train_or_load(config, run_dir, devices=None if sharded else jax.devices()[:1], progress=progress,
                          final_eval=False)  # the scripts evaluate every point themselves


def eval_batches(config: Config, batch_size: int = 0) -> list[dict]:
    """The held-out batches of a config (``batch_size``: rows per batch, 0 = the training batch)."""
    from ling_jax.pipeline import build_data

    if batch_size:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=batch_size))
    return [b.as_dict() for b in build_data(config).eval_batches()]


def evaluate(*args, **kwargs) -> dict:
    """:func:`ling_jax.evaluation.evaluate`, plus ``trf``: the *ideal* token reduction factor under
    the name the results files and report.py use; the realized one is ``trf_computed`` beside it."""
    r = _evaluate(*args, **kwargs)
    return {**r, "trf": r["trf_ideal"]}


def setup_jax(results_root: Path) -> None:
    """Persistent compilation cache under the runs (compiles repeat across scripts and resumes)."""
    cache = Path(results_root) / "runs" / "jax_cache"
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def metric_of(task: str) -> str:
    return "bpb" if task == "text" else "accuracy"


# ----------------------------------------------------------------------------- results files


class ResultsFile:
    """Append-only JSON-lines results with resume: one record per finished point.

    ``key_fields`` identify a point; :meth:`done` says whether a point is already recorded, so a
    restarted script skips it. Records are flushed and fsynced one by one.
    """

    def __init__(self, path: Path, key_fields: Sequence[str]):
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: list[dict] = []
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            good = []
            for line in lines:
                try:
                    self._records.append(json.loads(line))
                    good.append(line)
                except json.JSONDecodeError:  # a line cut by an interruption: drop it, that point reruns
                    continue
            if len(good) != len(lines) or not self.path.read_bytes().endswith(b"\n") and good:
                atomic_write(self.path, "".join(g + "\n" for g in good).encode())
        self._keys = {self.key(r) for r in self._records}

    def key(self, record: Mapping[str, Any]) -> tuple:
        return tuple(_key_value(record.get(k)) for k in self.key_fields)

    def done(self, **point: Any) -> bool:
        return self.key(point) in self._keys

    def add(self, record: Mapping[str, Any]) -> None:
        record = {k: _jsonable(v) for k, v in record.items()}
        key = self.key(record)
        if key in self._keys:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._records.append(record)
        self._keys.add(key)

    def records(self) -> list[dict]:
        return list(self._records)


def _key_value(v: Any) -> Any:
    return round(v, 9) if isinstance(v, float) else v


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def with_reduction(records: Sequence[Mapping[str, Any]], kind: str) -> list[dict]:
    """Records whose ``trf`` is the token reduction factor of ``kind`` (``computed``: what the
    compiled program executes; ``ideal``: an ideal sparse kernel), from ``trf_<kind>``. Records made
    before both were recorded have no ``trf_computed``: their ``trf`` becomes None (not plotted or
    tabulated as computed)."""
    if kind not in ("computed", "ideal"):
        raise ValueError(f"kind must be 'computed' or 'ideal', got {kind!r}")
    return [{**r, "trf": r.get(f"trf_{kind}")} for r in records]


def write_csv(records: Sequence[Mapping[str, Any]], path: Path) -> None:
    """All records as CSV (columns: the union of keys, sorted; floats with 6 significant digits)."""
    import csv

    cols = sorted({k for r in records for k in r})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(cols)
        for r in records:
            w.writerow([_csv_cell(r.get(c)) for c in cols])


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def mean_std(values: Iterable[Optional[float]]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of the finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan"), 0
    m = float(np.mean(vals))
    s = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return m, s, len(vals)


def aggregate(records: Sequence[Mapping[str, Any]], group: Sequence[str], values: Sequence[str]) -> list[dict]:
    """Mean/std/n over records sharing the ``group`` fields (e.g. over seeds), in first-seen order."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(_key_value(r.get(g)) for g in group), []).append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(group, key))
        row["n"] = len(rs)
        for v in values:
            m, s, _ = mean_std(r.get(v) for r in rs)
            row[f"{v}_mean"], row[f"{v}_std"] = m, s
        out.append(row)
    return out


class RunMeta:
    """The ``<name>.meta.json`` of a results file: :class:`~ling_jax.provenance.Provenance` (command,
    git revision, library versions, wall time), the preset, the configs of the runs it trained or
    read with their checkpoints' provenance, and the wall time accumulated over invocations
    (rewritten as the invocation goes, so an interrupted one counts)."""

    def __init__(self, path: Path, *, script: str, preset: str, argv: Sequence[str]):
        self.path = Path(path)
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        same = old.get("preset") == preset
        self.base_wall = float(old.get("wall_s", 0.0)) if same else 0.0
        self.invocation = (int(old.get("invocations", 0)) if same else 0) + 1
        self.provenance = Provenance(f"experiments/{script}", argv)
        self.fields: dict[str, Any] = {"preset": preset}
        self.runs: dict[str, Trained] = {}

    def read(self, trained: Trained) -> Trained:
        """Records a training run this results file uses (its config and checkpoint)."""
        self.runs[trained.info["workdir"]] = trained
        return trained

    def write(self, extra: Mapping[str, Any] = (), *, finished: bool = False) -> None:
        self.fields.update(dict(extra))
        prov = self.provenance.fields()
        runs = {wd: {**checkpoint_provenance(wd), "train_seconds": t.info["train_seconds"]} for wd, t in self.runs.items()}
        meta = {**prov, **self.fields, "invocations": self.invocation, "finished": finished, "runs": runs,
                "wall_s": round(self.base_wall + prov["wall_s"], 1)}
        atomic_write(self.path, (json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n").encode())


def results_paths(results_root: Path, preset: str, name: str) -> tuple[Path, Path, Path]:
    """(jsonl, csv, meta) paths of one script's results for a preset."""
    base = Path(results_root) / preset
    return base / f"{name}.jsonl", base / f"{name}.csv", base / f"{name}.meta.json"


def common_args(parser, default_preset: str = "cpu") -> None:
    parser.add_argument("--preset", default=default_preset, choices=PRESETS)
    parser.add_argument("--results", type=Path, default=RESULTS_ROOT,
                        help="results root: <results>/<preset>/*.jsonl|csv, <results>/runs/ (training workdirs), <results>/figures/")
    parser.add_argument("--seeds", type=int, default=None, help="override the preset's number of seeds")
    parser.add_argument("--tasks", default=None, help="comma list of tasks (default: all)")
    parser.add_argument("--no-progress", action="store_true")


def selected_tasks(args, default: Sequence[str] = TASKS) -> list[str]:
    if not args.tasks:
        return list(default)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise SystemExit(f"--tasks: unknown {bad}; allowed: {list(TASKS)}")
    return tasks


def progress_bar(total: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True, mininterval=2.0)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- token classes (code)

TOKEN_CLASSES = ("whitespace", "identifier", "keyword", "punctuation", "digit", "other")


def token_classes(row: Sequence[int]) -> list[str]:
    """Class of each byte of a code sample: whitespace, identifier, keyword, punctuation, digit, other.

    Identifiers and keywords are whole words (``[A-Za-z_][A-Za-z0-9_]*``; Python keywords and soft
    keywords are keywords); digits outside words are digits; ASCII punctuation is punctuation;
    everything else (non-ASCII bytes, control bytes) is other.
    """
    import keyword
    import re
    import string

    text = bytes(int(b) & 0xFF for b in row).decode("latin-1")
    out = []
    for ch in text:
        if ch.isspace():
            out.append("whitespace")
        elif ch.isdigit() and ch.isascii():
            out.append("digit")
        elif ch in string.punctuation:
            out.append("punctuation")
        else:
            out.append("other")
    words = set(keyword.kwlist) | set(getattr(keyword, "softkwlist", ()))
    for m in re.finditer(r"[A-Za-z_][A-Za-z0-9_]*", text):
        cls = "keyword" if m.group() in words else "identifier"
        out[m.start():m.end()] = [cls] * (m.end() - m.start())
    return out
