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
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.config import Config, ConfigError, ModelConfig


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
                  progress: bool = False, log_fn: Callable[[str], None] = _stderr, final_eval: bool = True) -> Trained:
    """``config`` trained to ``config.train.steps`` in ``workdir``: trains what is missing, then
    restores the newest checkpoint. ``devices``: train on these devices only (default: all, sharded
    by ``config.mesh``); the variables come back on the first device. ``final_eval=False``: the
    caller evaluates the model itself (:func:`ling_jax.train.train` skips its final evaluation)."""
    from ling_jax.rerun import latest_checkpoint_step
    from ling_jax.train import load_trained, train
    from ling_jax.workdir import check_compatible, read_record

    workdir = Path(workdir)
    record = read_record(workdir) if workdir.is_dir() else None
    seconds = None
    if record is None or latest_checkpoint_step(workdir) != config.train.steps:
        start = time.perf_counter()
        train(config, workdir, progress=progress, log_fn=log_fn, devices=devices, final_eval=final_eval)
        seconds = time.perf_counter() - start
    else:
        check_compatible(workdir, record, config)
    _, _, state = load_trained(workdir, log_fn=log_fn)
    return Trained(config, {"params": state.params, **state.extra},
                   {"workdir": str(workdir), "step": int(state.step), "train_seconds": seconds})


def init_workdir(config: Config, workdir: str | Path, variables: dict, *, allow_new: bool = False) -> None:
    """Starts a workdir from given weights: a step-0 checkpoint of ``variables`` (the model's
    whole tree, e.g. from an earlier training phase) with a fresh optimizer state, and its
    config.json; :func:`ling_jax.train.train` then trains from them (another phase on other data).

    ``allow_new``: the model may have parameters ``variables`` lacks (a retrofit: a dense model's
    weights under a config that adds e.g. pruning scorers); those keep their fresh initialisation.
    Every given parameter must still exist in the model with its shape."""
    from ling_jax.checkpoints import checkpoint_manager, save_checkpoint
    from ling_jax.model import Transformer
    from ling_jax.train import init_state
    from ling_jax.workdir import prepare, write_record

    workdir = prepare(workdir)
    if (workdir / "config.json").exists() or (workdir / "checkpoints").exists():
        raise FileExistsError(f"workdir {workdir} already holds a run; start from weights in a new workdir")
    model = Transformer(config.model)
    make_state = lambda key: init_state(config, model, key)  # noqa: E731
    key = jax.random.key(config.train.seed)
    given = {"params": variables["params"], **{k: v for k, v in variables.items() if k != "params"}}

    def fitted(state) -> dict:
        """``given`` checked against (and, with ``allow_new``, completed from) ``state``'s variables."""
        fresh = {"params": state.params, **state.extra}
        out = merge_weights(fresh, given) if allow_new else given
        if jax.tree_util.tree_structure(out) != jax.tree_util.tree_structure(fresh) or any(
                a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(fresh))):
            raise ValueError(f"init_workdir: the given variables do not fit the model of this config ({workdir})")
        return out

    fitted(jax.eval_shape(make_state, key))  # refuse a misfit before compiling anything
    state = jax.jit(make_state)(key)
    given = dict(fitted(state))
    state = state.replace(params=given.pop("params"), extra=given)
    manager = checkpoint_manager(workdir, config)
    try:
        save_checkpoint(manager, 0, state, keep=config.train.keep_checkpoints)
    finally:
        manager.close()
    write_record(workdir, config, schedule_steps=config.train.steps)


def merge_weights(target, given, where: str = ""):
    """``target`` (a fresh variable tree) with every leaf of ``given`` put in, cast to the target's
    dtype; each given leaf must exist in ``target`` with the same shape (leaves ``given`` lacks keep
    their fresh values). Used by retrofits (:func:`init_workdir`) and checkpoint imports
    (:mod:`ling_jax.interop.convert`)."""
    if isinstance(given, Mapping):
        if not isinstance(target, Mapping):
            raise ConfigError(f"the given weights have a subtree at {where or '/'} where the model has a leaf")
        out = dict(target)
        for key, value in given.items():
            if key not in target:
                raise ConfigError(f"the given weight {where}/{key} has no place in this model config "
                                  "(an override changed the architecture?)")
            out[key] = merge_weights(target[key], value, f"{where}/{key}")
        return out
    if np.shape(target) != np.shape(given):
        raise ConfigError(f"the given weight {where} has shape {np.shape(given)}, the model config needs "
                          f"{np.shape(target)} (an override changed the architecture?)")
    dtype = target.dtype if hasattr(target, "dtype") else np.asarray(target).dtype  # (a ShapeDtypeStruct too)
    return jnp.asarray(given, dtype)
