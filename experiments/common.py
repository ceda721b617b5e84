"""Shared experiment machinery: presets and configs, resumable results files, helpers.

Every experiment script (``sweep_pruning.py``, ``ablate_moe.py``, ``ablate_depth.py``,
``combined.py``) uses this module the same way:

* :func:`make_config` builds a :class:`~ling_jax.config.Config` for one (task, variant, seed) from
  the preset's model/train sizes and the variant's overrides;
* :func:`train_or_load` (:mod:`experiments.training`) trains it once and caches the final parameters under
  ``<results>/runs/<preset>/<task>/<variant>/seed<k>/`` (a later call, or a resumed script,
  loads them; a run interrupted mid-training restarts that one run);
* :func:`evaluate` (:mod:`experiments.evaluation`) runs the evaluation batches through a (possibly inference-modified) model and
  returns quality (accuracy, or bits per byte for text), the ledger's token reduction factor and
  the fraction of tokens kept; :func:`time_relative` times it against the dense model;
* :class:`ResultsFile` appends one JSON line per finished point and tells the script which points
  are done, so an interrupted script resumes where it stopped.

The training and evaluation functions are re-exported here, so scripts use ``common`` alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

from experiments.evaluation import (  # noqa: F401  (re-exported)
    LN2, dense_of, evaluate, median_time, relative_loss, time_decode_relative, time_relative,
)
from experiments.training import (  # noqa: F401  (re-exported)
    Trained, atomic_write, eval_batches, run_dir_for, setup_jax, train_or_load,
)
from ling_jax.config import Config, ModelConfig, get_preset
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
    # Seconds: the test-suite preset (2 layers, d_model 32, 40 steps, one seed).
    "smoke": Sizes(
        base="cpu-tiny",
        model=dict(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64, max_seq_len=64),
        train=dict(batch_size=4, seq_len=48, steps=4, warmup_steps=1, learning_rate=3e-3),
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


def make_config(preset: str, task: str, seed: int, overrides: Mapping[str, Any] = (), train_overrides: Mapping[str, Any] = ()) -> Config:
    """The config of one training run: preset sizes + task + seed + variant overrides.

    ``overrides`` are dotted config paths with Python values (``{"model.pruning.enabled": True}``);
    every sub-config changes in one step, so only the final combination has to be valid.
    """
    s = sizes(preset)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {list(TASKS)}")
    flat: dict[str, Any] = {f"model.{k}": v for k, v in s.model.items()}
    flat.update({f"train.{k}": v for k, v in s.train.items()})
    flat.update({"train.seed": seed, "train.eval_batches": s.eval_batches, "train.log_every": 10 ** 9,
                 "data.task": task, "data.task_options": s.task_options[task]})
    flat.update(dict(train_overrides))
    flat.update(dict(overrides))
    base = get_preset(s.base)
    parts: dict[str, dict[str, Any]] = {"model": {}, "train": {}, "data": {}, "mesh": {}}
    for key, value in flat.items():
        section, _, rest = key.partition(".")
        if section not in parts or not rest:
            raise ValueError(f"override {key!r}: sections are {sorted(parts)}")
        parts[section][rest] = value
    model = with_model(base.model, parts["model"])
    sub = {name: dataclasses.replace(getattr(base, name), **parts[name]) for name in ("train", "data", "mesh")}
    return Config(model=model, preset=base.preset, **sub)


def with_model(config: ModelConfig, overrides: Mapping[str, Any]) -> ModelConfig:
    """A model config with overrides relative to the model (``{"pruning.threshold": 0.3}``).

    Fields of one sub-config change together (one ``dataclasses.replace``), so a combination that
    is only valid as a whole (``baseline="window"`` with ``inference_rule="budget"``) is accepted.
    Values are Python values of the field's type (not strings).
    """
    groups: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in overrides.items():
        if "." in key:
            group, name = key.split(".", 1)
            groups.setdefault(group, {})[name] = value
        else:
            top[key] = value
    for group, fields in groups.items():
        sub = getattr(config, group)
        known = {f.name for f in dataclasses.fields(sub)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown override(s) {[f'{group}.{u}' for u in unknown]}; {group} fields: {sorted(known)}")
        top[group] = dataclasses.replace(sub, **fields)
    return dataclasses.replace(config, **top)


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
    """The ``<name>.meta.json`` of a results file: the command that made it, its preset, and the wall
    time accumulated over invocations (written as the invocation goes, so an interrupted one counts)."""

    def __init__(self, path: Path, *, script: str, preset: str, argv: Sequence[str]):
        self.path = Path(path)
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        same = old.get("preset") == preset
        self.base_wall = float(old.get("wall_s", 0.0)) if same else 0.0
        self.invocation = (int(old.get("invocations", 0)) if same else 0) + 1
        self.start = time.perf_counter()
        self.fields = {
            "command": "python " + " ".join(shlex.quote(a) for a in [f"experiments/{script}", *argv]),
            "preset": preset, "backend": jax.default_backend(), "jax": jax.__version__,
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
        }

    def write(self, extra: Mapping[str, Any] = (), *, finished: bool = False) -> None:
        meta = {**self.fields, **dict(extra), "invocations": self.invocation, "finished": finished,
                "wall_s": round(self.base_wall + time.perf_counter() - self.start, 1)}
        self.fields.update(dict(extra))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())


def results_paths(results_root: Path, preset: str, name: str) -> tuple[Path, Path, Path]:
    """(jsonl, csv, meta) paths of one script's results for a preset."""
    base = Path(results_root) / preset
    return base / f"{name}.jsonl", base / f"{name}.csv", base / f"{name}.meta.json"


def common_args(parser, default_preset: str = "cpu") -> None:
    parser.add_argument("--preset", default=default_preset, choices=PRESETS)
    parser.add_argument("--results", type=Path, default=RESULTS_ROOT,
                        help="results root: <results>/<preset>/*.jsonl|csv, <results>/runs/ (cache), <results>/figures/")
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
