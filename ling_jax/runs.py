"""A config trained to its last step in a workdir, as experiments use it: :func:`train_or_load`
trains (or resumes) through :func:`ling_jax.train.train`, or only reads a workdir that already
reached the last step, and returns the restored variables. The workdir's compatibility check
(:func:`ling_jax.workdir.check_compatible`) refuses a workdir trained with other settings.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax

from ling_jax.config import Config, ModelConfig


@dataclasses.dataclass
class Trained:
    """A trained model: its config, variables (``{"params": ..., **state collections}``) and
    ``info`` (``workdir``, ``step``, ``train_seconds``: None when it was trained by an earlier run)."""

    config: Config
    variables: dict
    info: dict

    @property
    def model(self) -> ModelConfig:
        return self.config.model


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_or_load(config: Config, workdir: str | Path, *, devices: Optional[Sequence[jax.Device]] = None,
                  progress: bool = False, log_fn: Callable[[str], None] = _stderr) -> Trained:
    """``config`` trained to ``config.train.steps`` in ``workdir``: trains what is missing, then
    restores the newest checkpoint. ``devices``: train on these devices only (default: all, sharded
    by ``config.mesh``); the variables come back on the first device."""
    from ling_jax.rerun import latest_checkpoint_step
    from ling_jax.train import load_trained, train
    from ling_jax.workdir import check_compatible, read_record

    workdir = Path(workdir)
    record = read_record(workdir) if workdir.is_dir() else None
    seconds = None
    if record is None or latest_checkpoint_step(workdir) != config.train.steps:
        start = time.perf_counter()
        train(config, workdir, progress=progress, log_fn=log_fn, devices=devices)
        seconds = time.perf_counter() - start
    else:
        check_compatible(workdir, record, config)
    _, _, state = load_trained(workdir, log_fn=log_fn)
    return Trained(config, {"params": state.params, **state.extra},
                   {"workdir": str(workdir), "step": int(state.step), "train_seconds": seconds})
