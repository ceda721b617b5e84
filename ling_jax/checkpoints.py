"""Checkpoints that never lose good state: verified saves, validated restores, safe retention.

* :func:`save_checkpoint` refuses non-finite state, records a fingerprint of every array in the
  step's metadata, and only then applies retention (:func:`prune_checkpoints`), so the newest
  checkpoint, written from finite state, is never the one that is deleted.
* :func:`restore_latest` tries the newest step first and checks what it reads: every array finite
  and equal to the fingerprint written at save time. A step that cannot be read or fails a check
  is skipped with a warning naming it and the reason, and the next older step is tried. The
  trainer moves skipped steps out of the way (``quarantine``) so that new saves can take their
  step numbers; readers only skip. A step that vanishes while it is read (the trainer's retention
  deleted it) makes a reader list the steps again. If no step can be restored nothing is moved
  and :class:`CheckpointError` lists every step and why.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """No checkpoint can be restored, or a save failed (the previous checkpoints are intact)."""


FINGERPRINT_KEY = "ling_jax_fingerprint"


def checkpoint_manager(workdir: Path, config: Any = None, *, read_only: bool = False) -> ocp.CheckpointManager:
    """The orbax manager of ``workdir/checkpoints``. Retention is :func:`prune_checkpoints`, not
    orbax's ``max_to_keep``. ``read_only=True`` (eval, sweep) creates, cleans and deletes nothing."""
    from absl import logging as absl_logging

    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=not read_only, read_only=read_only, enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only,  # unfinished saves of a killed run
        save_interval_steps=0 if read_only else 1,
    )
    verbosity = absl_logging.get_verbosity()
    if read_only:  # orbax warns that a read-only manager is read-only
        absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        # One unnamed item, fixed up front: orbax otherwise infers the layout from the first step
        # it reads, and an emptied step directory would make it misread every other step.
        return ocp.CheckpointManager(Path(workdir).resolve() / "checkpoints", options=options,
                                     item_handlers=ocp.StandardCheckpointHandler())
    finally:
        absl_logging.set_verbosity(verbosity)


# ----------------------------------------------------------------------------- fingerprints


def _leaf_report(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(fingerprint, all finite) of one array: sum over elements of bits * (2 * flat index + 1)
    mod 2**32. Odd multipliers are invertible mod 2**32, so changing any one element changes it."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype.itemsize == 1:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    else:  # 64-bit leaves (x64 mode): the low and high words
        bits = jnp.sum(jax.lax.bitcast_convert_type(x, jnp.uint32), axis=-1, dtype=jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)  # flat index from iotas: no reshape of a sharded array
    stride = 1
    for dim in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * jnp.uint32(stride % 2**32)
        stride *= x.shape[dim]
    fingerprint = jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return fingerprint, finite


_report = jax.jit(lambda tree: jax.tree_util.tree_map(_leaf_report, tree))


def state_report(state: Any) -> tuple[dict[str, list], list[str]]:
    """({leaf path: [dtype, fingerprint]}, [paths of leaves holding NaN or inf])."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    reports = jax.device_get(_report(state))
    report_leaves = jax.tree_util.tree_leaves(reports)
    fingerprints, bad = {}, []
    for (path, leaf), fp, finite in zip(flat, report_leaves[0::2], report_leaves[1::2]):
        name = jax.tree_util.keystr(path)
        fingerprints[name] = [str(jnp.asarray(leaf).dtype), int(fp)]
        if not bool(finite):
            bad.append(name)
    return fingerprints, bad


def _check_restored(state: Any, recorded: Optional[dict]) -> Optional[str]:
    """Why a restored state is not good (None if it is)."""
    fingerprints, bad = state_report(state)
    if bad:
        return f"non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
    if recorded:
        for name, (dtype, fp) in fingerprints.items():
            want = recorded.get(name)
            if want is not None and want[0] == dtype and int(want[1]) != fp:
                return f"{name} does not match the fingerprint written when it was saved (corrupted data)"
    return None


# ----------------------------------------------------------------------------- save and retention


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: Any, *, keep: int) -> None:
    """Saves ``state`` as ``step`` (synchronously), then keeps the newest ``keep`` steps.

    Raises:
      CheckpointError: the state holds NaN/inf (nothing is written), or the save failed (disk
        full, unwritable directory, ...); older checkpoints are untouched either way.
    """
    fingerprints, bad = state_report(state)
    if bad:
        raise CheckpointError(f"refusing to save step {step}: non-finite values in {', '.join(bad[:3])}")
    try:
        saved = manager.save(step, args=ocp.args.StandardSave(state), force=True,
                             custom_metadata={FINGERPRINT_KEY: fingerprints})
        manager.wait_until_finished()
    except Exception as e:  # orbax/tensorstore raise many types (ValueError, OSError, XlaRuntimeError)
        raise CheckpointError(f"saving checkpoint step {step} failed ({_first_line(e)}); "
                              f"the earlier checkpoints {list(manager.all_steps())} are intact") from e
    if not saved:
        raise CheckpointError(f"orbax did not save step {step} (a checkpoint at or after it exists: "
                              f"{list(manager.all_steps())})")
    prune_checkpoints(manager, keep=keep, protect=step)


def prune_checkpoints(manager: ocp.CheckpointManager, *, keep: int, protect: int) -> list[int]:
    """Deletes all but the newest ``keep`` steps; never ``protect`` (the step just saved and
    checked). Returns the deleted steps."""
    steps = sorted(manager.all_steps(), reverse=True)
    doomed = [s for s in steps[max(keep, 1):] if s != protect]
    for s in doomed:
        manager.delete(s)
    return doomed


# ----------------------------------------------------------------------------- restore


def _first_line(error: BaseException, limit: int = 240) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    text = f"{type(error).__name__}: {text}" if not text.startswith(type(error).__name__) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _recorded_fingerprints(manager: ocp.CheckpointManager, step: int) -> Optional[dict]:
    meta = manager.metadata(step)
    custom = getattr(meta, "custom_metadata", None) or {}
    return custom.get(FINGERPRINT_KEY)


def _step_dir(manager: ocp.CheckpointManager, step: int) -> Path:
    return Path(str(manager.directory)) / str(step)


def restore_latest(manager: ocp.CheckpointManager, state: Any, *, log_fn: Optional[Callable[[str], None]] = None,
                   quarantine: Optional[Path] = None) -> tuple[Any, int]:
    """The newest good checkpoint restored into the shapes/dtypes/shardings of ``state``.

    Args:
      state: a TrainState of arrays or ShapeDtypeStructs (the restore target).
      log_fn: receives one warning per skipped step (default: print to stderr).
      quarantine: where the trainer moves skipped steps (``None``: readers leave them in place).
    Returns:
      (state, step), or (the given state, 0) when there is no checkpoint.
    Raises:
      CheckpointError: there are checkpoints but none can be restored (nothing is moved).
    """
    import sys

    log_fn = log_fn or (lambda msg: print(msg, file=sys.stderr))
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    skipped: dict[int, str] = {}
    for _ in range(100):  # each round re-lists the steps; a vanished step makes another round
        manager.reload()
        steps = sorted((s for s in manager.all_steps() if s not in skipped), reverse=True)
        if not steps:
            break
        vanished = False
        for step in steps:
            try:
                restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
                problem = _check_restored(restored, _recorded_fingerprints(manager, step))
            except Exception as e:  # noqa: BLE001  (orbax/tensorstore/zstd raise many types)
                if not _step_dir(manager, step).exists():  # deleted under us by the trainer's retention
                    vanished = True
                    break
                problem = f"unreadable: {_first_line(e)}"
            if problem is None:
                _report_skipped(skipped, step, manager, log_fn, quarantine)
                return restored, int(step)
            skipped[step] = problem
        if not vanished:
            break
    if skipped:
        reasons = "; ".join(f"step {s}: {why}" for s, why in sorted(skipped.items(), reverse=True))
        raise CheckpointError(f"no checkpoint in {manager.directory} can be restored with this config ({reasons})")
    return state, 0


def _report_skipped(skipped: dict[int, str], restored: int, manager: ocp.CheckpointManager,
                    log_fn: Callable[[str], None], quarantine: Optional[Path]) -> None:
    for step, why in sorted(skipped.items(), reverse=True):
        where = ""
        if quarantine is not None:
            src = _step_dir(manager, step)
            if src.exists():
                quarantine.mkdir(parents=True, exist_ok=True)
                dst = quarantine / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                shutil.move(str(src), str(dst))
                where = f"; moved it to {dst}"
        log_fn(f"warning: skipped checkpoint step {step} ({why}){where}; using step {restored}")
    if skipped and quarantine is not None:
        manager.reload()


def restored_arrays_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two states' arrays (a test and script helper)."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
