"""Checkpoints that never lose good state: verified saves, validated restores, safe retention.

* :func:`save_checkpoint` refuses non-finite state, records a fingerprint of every array in the
  step's metadata, and only then applies retention (:func:`prune_checkpoints`), so the newest
  checkpoint, written from finite state, is never the one that is deleted. Retention first renames
  a step into ``checkpoints/.deleting`` and deletes it there: a reader sees a step whole or not
  at all, never half deleted.
* :func:`restore_latest` tries the newest step first and checks what it reads: every array finite
  and equal to the fingerprint written at save time. A step that cannot be read or fails a check
  is skipped with a warning naming it and the reason, and the next older step is tried. A step
  without a readable fingerprint (its metadata deleted or damaged) is unverified: an older
  verified step is preferred (with a warning), and if there is none the restore is refused unless
  ``LING_JAX_ALLOW_UNVERIFIED=1`` (then the newest unverified step is restored, with a warning).
  The trainer moves skipped steps out of the way (``quarantine``) so that new saves can take their
  step numbers; a step that cannot be moved is left in place with a warning. Readers only skip. A
  step that vanishes while it is read (the trainer's retention deleted it) is not skipped: the
  reader lists the steps again. If no step can be restored nothing is moved and
  :class:`CheckpointError` lists every step and why.
* Both write what orbax and asyncio log or print while arrays are read or written (tracebacks of
  damaged data or a full disk) to ``<workdir>/ling_jax.log`` (:func:`ling_jax.workdir.log_to_workdir`);
  the terminal gets one line per skipped step or failed save.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ling_jax.workdir import log_to_workdir


class CheckpointError(RuntimeError):
    """No checkpoint can be restored, or a save failed (the previous checkpoints are intact)."""


FINGERPRINT_KEY = "ling_jax_fingerprint"
# =1: with no verified step left, restore the newest step without a readable fingerprint (with a warning)
ALLOW_UNVERIFIED = "LING_JAX_ALLOW_UNVERIFIED"
TRASH = ".deleting"  # retention renames a step in here, then deletes it

_detail = logging.getLogger(__name__)  # full tracebacks, for the workdir's log file


def checkpoint_manager(workdir: Path, config: Any = None, *, read_only: bool = False) -> ocp.CheckpointManager:
    """The orbax manager of ``workdir/checkpoints``. Retention is :func:`prune_checkpoints`, not
    orbax's ``max_to_keep``. ``read_only=True`` (eval, sweep) creates, cleans and deletes nothing."""
    from absl import logging as absl_logging

    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=not read_only, read_only=read_only, enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only,  # unfinished saves of a killed run
        save_interval_steps=0 if read_only else 1,
        todelete_subdir=None if read_only else TRASH,  # deleting a step renames it first (prune_checkpoints)
    )
    verbosity = absl_logging.get_verbosity()
    if read_only:  # orbax warns that a read-only manager is read-only
        absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        # One unnamed item, fixed up front: orbax otherwise infers the layout from the first step
        # it reads, and an emptied step directory would make it misread every other step.
        with log_to_workdir(workdir, "listing the checkpoints"):  # orbax logs each unreadable step metadata
            return _listing(lambda: ocp.CheckpointManager(Path(workdir).resolve() / "checkpoints", options=options,
                                                          item_handlers=ocp.StandardCheckpointHandler()))
    finally:
        absl_logging.set_verbosity(verbosity)


def _listing(fn: Callable[[], Any], attempts: int = 20) -> Any:
    """``fn()`` (something that lists the steps), again when orbax raises FileNotFoundError: it
    reads each step folder it lists, and the trainer's retention may delete one in between."""
    for attempt in range(attempts):
        try:
            return fn()
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.01)


def _list_steps(manager: ocp.CheckpointManager) -> list[int]:
    """The steps on disk now (not the manager's cached list)."""

    def reload() -> list[int]:
        manager.reload()
        return list(manager.all_steps())

    return _listing(reload)


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
    # Restored arrays are committed to their devices, freshly computed ones often not, and jit
    # compiles once for each; committing them in place (no copy) makes saves and restores share one.
    state = jax.tree_util.tree_map(
        lambda x: jax.device_put(x, x.sharding) if isinstance(x, jax.Array) and not x.committed else x, state)
    reports = jax.device_get(_report(state))
    report_leaves = jax.tree_util.tree_leaves(reports)
    fingerprints, bad = {}, []
    for (path, leaf), fp, finite in zip(flat, report_leaves[0::2], report_leaves[1::2]):
        name = jax.tree_util.keystr(path)
        fingerprints[name] = [str(jnp.asarray(leaf).dtype), int(fp)]
        if not bool(finite):
            bad.append(name)
    return fingerprints, bad


def _check_restored(state: Any, recorded: Any) -> tuple[Optional[str], Optional[str]]:
    """(why a restored state is bad, why it cannot be verified): (None, None) for a good state
    that matches the fingerprint ``recorded`` at save time in every array."""
    fingerprints, bad = state_report(state)
    if bad:
        return f"non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}", None
    if not isinstance(recorded, dict):
        return None, "no readable fingerprint in its _CHECKPOINT_METADATA (deleted or damaged)"
    unreadable = None
    for name, (dtype, fp) in fingerprints.items():
        want = recorded.get(name)
        if not (isinstance(want, list) and len(want) == 2 and want[0] == dtype and type(want[1]) is int):
            unreadable = unreadable or f"no readable {dtype} fingerprint of {name} in its _CHECKPOINT_METADATA"
        elif want[1] != fp:
            return f"{name} does not match the fingerprint written when it was saved (corrupted data)", None
    return None, unreadable


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
    workdir = Path(str(manager.directory)).parent
    with log_to_workdir(workdir, f"saving checkpoint step {step} in {manager.directory}") as log:
        try:
            saved = manager.save(step, args=ocp.args.StandardSave(state), force=True,
                                 custom_metadata={FINGERPRINT_KEY: fingerprints})
            manager.wait_until_finished()
            error = None
        except Exception as e:  # orbax/tensorstore raise many types (ValueError, OSError, XlaRuntimeError)
            _detail.error("saving checkpoint step %d failed", step, exc_info=e)
            error = e
    if error is not None:
        details = f"; details in {log.written}" if log.written else ""
        raise CheckpointError(f"saving checkpoint step {step} failed ({_first_line(_root_cause(error))}); "
                              f"the earlier checkpoints {list(manager.all_steps())} are intact{details}") from error
    if not saved:
        raise CheckpointError(f"orbax did not save step {step} (a checkpoint at or after it exists: "
                              f"{list(manager.all_steps())})")
    prune_checkpoints(manager, keep=keep, protect=step)


def prune_checkpoints(manager: ocp.CheckpointManager, *, keep: int, protect: int) -> list[int]:
    """Deletes all but the newest ``keep`` steps; never ``protect`` (the step just saved and
    checked). Returns the deleted steps. orbax renames each into ``checkpoints/.deleting`` (one
    atomic step), which is then emptied: a reader never finds a half-deleted step under its name."""
    steps = sorted(manager.all_steps(), reverse=True)
    doomed = [s for s in steps[max(keep, 1):] if s != protect]
    trash = Path(str(manager.directory)) / TRASH
    if jax.process_index() == 0:
        shutil.rmtree(trash, ignore_errors=True)  # left by a run killed while deleting
    for s in doomed:
        manager.delete(s)
    if jax.process_index() == 0:
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


# ----------------------------------------------------------------------------- restore


def _first_line(error: BaseException, limit: int = 300) -> str:
    """The error's type and first line; a long one keeps its start and its end (where tensorstore
    says what went wrong, after the paths)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    text = f"{type(error).__name__}: {text}" if not text.startswith(type(error).__name__) else text
    return text if len(text) <= limit else f"{text[:limit // 2 - 5]} ... {text[-(limit // 2):]}"


def _root_cause(error: BaseException) -> BaseException:
    """The innermost ``raise ... from`` cause: orbax wraps tensorstore's error (which says what is
    wrong: "ZSTD_decompressStream() failed", "No space left") in one that prints a whole spec."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _recorded_fingerprints(manager: ocp.CheckpointManager, step: int) -> Any:
    meta = manager.metadata(step)
    custom = getattr(meta, "custom_metadata", None) or {}
    return custom.get(FINGERPRINT_KEY) if isinstance(custom, dict) else None


def _step_dir(manager: ocp.CheckpointManager, step: int) -> Path:
    return Path(str(manager.directory)) / str(step)


def _read_step(manager: ocp.CheckpointManager, step: int, abstract: Any
               ) -> Optional[tuple[Any, Optional[str], Optional[str]]]:
    """(state, why it is bad, why it is unverified) of one step (see :func:`_check_restored`);
    None if the step vanished while it was read (the trainer's retention deleted it)."""
    try:
        # The fingerprint first: read after the arrays, it could be missing only because the
        # step was deleted in between, and the step would look unverified.
        recorded = _recorded_fingerprints(manager, step)
        restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # noqa: BLE001  (orbax/tensorstore/zstd raise many types)
        if not _step_dir(manager, step).exists():
            return None
        _detail.warning("checkpoint step %d in %s cannot be read", step, manager.directory, exc_info=e)
        return None, f"unreadable: {_first_line(_root_cause(e))}", None
    if recorded is None and not _step_dir(manager, step).exists():
        return None
    return (restored, *_check_restored(restored, recorded))


def restore_latest(manager: ocp.CheckpointManager, state: Any, *, log_fn: Optional[Callable[[str], None]] = None,
                   quarantine: Optional[Path] = None, allow_unverified: Optional[bool] = None) -> tuple[Any, int]:
    """The newest good checkpoint restored into the shapes/dtypes/shardings of ``state``.

    Args:
      state: a TrainState of arrays or ShapeDtypeStructs (the restore target).
      log_fn: receives one warning per skipped step (default: print to stderr).
      quarantine: where the trainer moves skipped steps (``None``: readers leave them in place).
      allow_unverified: when no step with a matching fingerprint is left, restore the newest step
        without a readable one (with a warning) instead of refusing; default: the environment
        variable ``LING_JAX_ALLOW_UNVERIFIED`` is set to something other than 0.
    Returns:
      (state, step), or (the given state, 0) when there is no checkpoint.
    Raises:
      CheckpointError: there are checkpoints but none can be restored (nothing is moved).
    """
    log_fn = log_fn or (lambda msg: print(msg, file=sys.stderr))
    if allow_unverified is None:
        allow_unverified = os.environ.get(ALLOW_UNVERIFIED, "0") not in ("", "0")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    skipped: dict[int, str] = {}  # bad steps (unreadable, non-finite, fingerprint mismatch) and why
    unverified: dict[int, str] = {}  # steps without a readable fingerprint and why
    found: Optional[tuple[Any, int]] = None
    fallback: Optional[tuple[Any, int]] = None  # the newest unverified step (restored if allowed)
    workdir = Path(str(manager.directory)).parent
    with log_to_workdir(workdir, f"restoring the newest checkpoint of {manager.directory}") as log:
        for _ in range(100):  # each round lists the steps again; a step that vanished makes another round
            steps = sorted(set(_list_steps(manager)) - skipped.keys() - unverified.keys(), reverse=True)
            vanished = False
            for step in steps:
                outcome = _read_step(manager, step, abstract)
                if outcome is None:
                    vanished = True
                    break
                restored, bad, unsure = outcome
                if bad is None and unsure is None:
                    found = restored, int(step)
                    break
                if bad is not None:
                    skipped[step] = bad
                else:
                    unverified[step] = unsure
                    if allow_unverified and (fallback is None or step > fallback[1]):
                        fallback = restored, int(step)
            if found or not vanished:
                break
        present = set(_list_steps(manager))  # a step deleted since it failed was being deleted, not damaged
        skipped = {s: why for s, why in skipped.items() if s in present}
        unverified = {s: why for s, why in unverified.items() if s in present}
    details = f"; details in {log.written}" if log.written else ""
    if found is None and fallback is not None and fallback[1] in unverified:
        found = fallback
        log_fn(f"warning: restoring checkpoint step {fallback[1]} UNVERIFIED ({unverified.pop(fallback[1])}) because "
               f"{ALLOW_UNVERIFIED} is set: its arrays may be damaged")
    reasons = {**skipped, **{s: f"unverified: {why}" for s, why in unverified.items()}}
    if found is None:
        if reasons:
            listed = "; ".join(f"step {s}: {why}" for s, why in sorted(reasons.items(), reverse=True))
            hint = (f"; to restore step {max(unverified)} without verification, rerun with {ALLOW_UNVERIFIED}=1"
                    if unverified else "")
            raise CheckpointError(f"no checkpoint in {manager.directory} can be restored with this config "
                                  f"({listed}){hint}{details}")
        return state, 0
    restored, step = found
    _report_skipped({s: why for s, why in reasons.items() if s > step}, step, manager, log_fn, quarantine, details)
    return restored, step


def _report_skipped(skipped: dict[int, str], restored: int, manager: ocp.CheckpointManager,
                    log_fn: Callable[[str], None], quarantine: Optional[Path], details: str) -> None:
    for step, why in sorted(skipped.items(), reverse=True):
        where = _move_aside(_step_dir(manager, step), quarantine) if quarantine is not None else ""
        log_fn(f"warning: skipped checkpoint step {step} ({why}){where}; using step {restored}{details}")
    if skipped and quarantine is not None:
        _list_steps(manager)


def _move_aside(src: Path, quarantine: Path) -> str:
    """Moves a skipped step folder into ``quarantine`` so that a new save can take its step
    number; if it cannot be moved there (a folder without write permission cannot change its
    parent), renames it beside itself, which needs no permission on the folder; else leaves it.
    Returns what happened, for the warning."""
    if not src.exists():
        return ""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        quarantine.mkdir(parents=True, exist_ok=True)
        dst = quarantine / f"{src.name}-{stamp}"
        shutil.move(str(src), str(dst))
        return f"; moved it to {dst}"
    except OSError as e:
        failed = _first_line(e)
    renamed = src.with_name(f"{src.name}.skipped-{stamp}")
    try:
        os.rename(src, renamed)
        return f"; could not move it to {quarantine} ({failed}), renamed it to {renamed}"
    except OSError:
        return (f"; could not move it aside ({failed}), left it in place (a save of step {src.name} fails until "
                "it is removed)")


def restored_arrays_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two states' arrays (a test and script helper)."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
