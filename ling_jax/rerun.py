"""What a workdir already holds, so that a rerun reuses it instead of redoing (or overwriting) it.

* :func:`finished_eval`: the recorded final evaluation of a run that already reached its last step;
* :func:`latest_checkpoint_step`: the newest checkpoint's step, read from the directory names;
* :func:`sweep_path`: the file a pruning sweep with given settings writes (named after them);
* :func:`stored_sweep`: a previous sweep with those settings of the same checkpoint step, if any.

Everything here reads small files only (no checkpoint restore, no compile), so answering "already
done" takes well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from ling_jax.config import Config, ConfigError, from_dict
from ling_jax.workdir import read_record, training_changes

SWEEP_FILE = "pruning_sweep.json"  # the file of the default settings (what `ling-jax train` runs)


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_checkpoint_step(workdir: str | Path) -> Optional[int]:
    """The largest step among ``workdir/checkpoints/<step>`` directories (None: no checkpoint)."""
    root = Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()] if root.is_dir() else []
    return max(steps) if steps else None


def finished_eval(config: Config, workdir: str | Path) -> Optional[dict]:
    """``{"step": .., metric: .., "loss": ..}`` of a workdir that trained this model on this data to
    ``config.train.steps`` and logged its final evaluation; None when there is work left (or the
    workdir holds something else: then training decides what to do and says why)."""
    workdir = Path(workdir)
    path = workdir / "config.json"
    if not path.exists():
        return None
    record = read_record(workdir)
    if training_changes(from_dict(record["config"]), config):
        return None
    steps = config.train.steps
    if latest_checkpoint_step(workdir) != steps:
        return None
    records = _lines(workdir / "metrics.jsonl")
    last = records[-1] if records else {}
    if last.get("step") != steps or not any(k.startswith("eval_") for k in last):
        return None
    return {"step": steps, **{k[len("eval_"):]: v for k, v in last.items() if k.startswith("eval_")}}


def sweep_path(workdir: str | Path, thresholds: Optional[Sequence[float]], budgets: Optional[Sequence[int]],
               baselines: Sequence[str], default_thresholds: Sequence[float]) -> Path:
    """``pruning_sweep.json`` for the default settings, else a name that spells the settings out,
    e.g. ``pruning_sweep_b16-32_window-h2o-tova.json`` (None: the default thresholds / budgets)."""
    parts = []
    if thresholds is not None and tuple(thresholds) != tuple(default_thresholds):
        parts.append("t" + "-".join(f"{t:g}" for t in thresholds))
    if budgets is not None:
        parts.append("b" + "-".join(str(b) for b in budgets))
    if tuple(baselines) != ("window",):
        parts.append("-".join(baselines) if baselines else "nobaselines")
    name = SWEEP_FILE if not parts else f"pruning_sweep_{'_'.join(parts)}.json"
    return Path(workdir) / name


def stored_sweep(path: Path, workdir: str | Path) -> Optional[dict]:
    """The sweep saved at ``path`` if it is of the workdir's latest checkpoint; None if there is none.

    Raises ConfigError when the file is of an older checkpoint (the caller overwrites it only when
    told to: ``--force``)."""
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    latest = latest_checkpoint_step(workdir)
    if stored.get("step") != latest:
        raise ConfigError(f"{path} holds a sweep of step {stored.get('step')}, but the latest checkpoint is step "
                          f"{latest}; pass --force to overwrite it (or copy it away first)")
    return stored
