"""The training workdir: an exclusive lock, the recorded config.json, and metrics.jsonl upkeep.

* :class:`WorkdirLock` holds ``fcntl.flock`` on ``<workdir>/.lock`` for the whole run. The lock
  dies with its process (even on SIGKILL), so a stale lock is simply taken over; the file keeps
  the holder's PID so a refused trainer can name it.
* ``config.json`` records the config, its model signature and the learning-rate schedule length
  (``schedule_steps``, fixed by the run that started the workdir). It is written atomically
  (temporary file + ``os.replace``) and only after a successful restore or the first save.
* ``metrics.jsonl`` is truncated on resume to the restored step; a partial last line (a killed
  writer) or any unparsable line is dropped. A write that fails (a full disk) is a
  :class:`WorkdirError` naming the file.
* ``ling_jax.log`` receives what libraries log or print to stderr while a checkpoint is read or
  written (:func:`log_to_workdir`): orbax's and asyncio's tracebacks when arrays cannot be read
  or written go there, and the terminal gets one line from ling-jax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import gc
import io
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ling_jax.config import Config, ConfigError, from_dict, to_dict

LOCK_NAME = ".lock"
LOG_NAME = "ling_jax.log"


def print_log(msg: str) -> None:
    """The trainer's default log: warnings (``"warning: ..."``) to stderr, as every command writes
    them, and progress notes to stdout."""
    print(msg, file=sys.stderr if msg.startswith("warning:") else sys.stdout, flush=True)


class WorkdirError(RuntimeError):
    """The workdir cannot be used: not a directory, not writable, locked by another run, unreadable config."""


def prepare(workdir: str | Path) -> Path:
    """Creates ``workdir`` if needed; WorkdirError if it is a file or cannot be created."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"workdir {workdir} exists and is not a directory; pass a directory to --workdir")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create workdir {workdir}: {e.strerror or e}") from e
    return workdir


class WorkdirLock:
    """Exclusive, non-blocking lock on a workdir, held from ``__enter__`` to ``__exit__``."""

    def __init__(self, workdir: Path, log_fn: Callable[[str], None] = print_log):
        self.path = Path(workdir) / LOCK_NAME
        self.log_fn = log_fn
        self._fd: Optional[int] = None

    def __enter__(self) -> "WorkdirLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"workdir {self.path.parent} is not writable ({e.strerror or e}); "
                               "use a writable --workdir") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirError(f"workdir {self.path.parent} is in use by another training run "
                                   f"({holder or 'PID unknown'}); wait for it to finish or stop it") from None
            raise WorkdirError(f"cannot lock workdir {self.path.parent}: {e.strerror or e}") from e
        previous = _read_holder(fd)
        if previous:
            self.log_fn(f"took over the workdir lock left by {previous}, which is no longer running")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise WorkdirError(f"workdir {self.path.parent} is not writable ({e.strerror or e})") from e
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # a clean exit leaves no holder behind
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


# ----------------------------------------------------------------------------- config.json


def read_record(workdir: str | Path) -> Optional[dict]:
    """The parsed config.json of a workdir, None if there is none."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise ValueError("no 'config' object")
        return record
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path} is unreadable ({e}); restore it or use a new --workdir") from e


def recorded_config(workdir: str | Path) -> Optional[Config]:
    """The Config a workdir was trained with, None if it has no config.json."""
    record = read_record(workdir)
    return None if record is None else from_dict(record["config"])


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file beside it, fsync and ``os.replace``:
    a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WorkdirError(f"cannot write {path} ({e.strerror or e}); the previous version is unchanged") from e


def write_record(workdir: Path, config: Config, *, schedule_steps: int, data: Optional[dict] = None) -> None:
    """Writes config.json (atomically): the config, the schedule length, the provenance of the
    run writing it (command, git revision, library versions) and, for a text corpus, the
    fingerprint of the data trained on (``data``, see :func:`ling_jax.pipeline.data_fingerprint`)."""
    from ling_jax.provenance import run_record

    record = {"schedule_steps": int(schedule_steps), "config": to_dict(config), "provenance": run_record()}
    if data is not None:
        record["data_fingerprint"] = data
    atomic_write(workdir / "config.json", json.dumps(record, indent=2, default=str).encode())


# Fields that may differ between a workdir's config.json and the config that resumes it (a whole
# section, or one ``section.field``). None changes what a training step computes:
RESUME_MAY_CHANGE = (
    "preset", "mesh",  # a name; the device layout (checkpoints restore onto any mesh)
    # where training stops (the schedule length is recorded separately), how often it logs,
    # evaluates and saves, how many checkpoints it keeps:
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
    "train.keep_checkpoints",
    # implementation switches: the same math by another kernel, or recomputed in the backward pass
    "model.attention_impl", "model.moe.dispatch", "model.remat",
    # call-time inference thresholds (ling_jax.policy); training (soft mask, train mode) never reads them
    "model.pruning.threshold", "model.depth.mod_threshold", "model.depth.mod_predictor_threshold",
    "model.depth.exit_threshold",
)


def config_changes(recorded: Config, config: Config, *, ignore: tuple[str, ...] = ()) -> list[str]:
    """``"section.field: old -> new"`` for every leaf field of ``config`` that differs from
    ``recorded``, skipping the sections and fields named in ``ignore``."""
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        for f in dataclasses.fields(a):
            name = f"{prefix}{f.name}"
            if name in ignore:
                continue
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if dataclasses.is_dataclass(va):
                walk(va, vb, name + ".")
            elif va != vb:
                out.append(f"{name}: {va!r} -> {vb!r}")

    walk(recorded, config, "")
    return out


def training_changes(recorded: Config, config: Config) -> list[str]:
    """The changes of :func:`config_changes` that alter training: every field of the model, train
    and data configs except :data:`RESUME_MAY_CHANGE`."""
    return config_changes(recorded, config, ignore=RESUME_MAY_CHANGE)


def check_compatible(workdir: Path, record: dict, config: Config) -> None:
    """Refuses to continue a workdir with a config that trains differently from the recorded one,
    naming every changed field (fields added to the code later read as their defaults)."""
    changes = training_changes(from_dict(record["config"]), config)
    if changes:
        raise ConfigError(f"workdir {workdir} was trained with other settings ({'; '.join(changes)}); "
                          "resuming would mix two trainings: use a new --workdir or the recorded settings "
                          f"(fields that may change on resume: {', '.join(RESUME_MAY_CHANGE)})")


def data_difference(record: Optional[dict], now: Optional[dict]) -> Optional[str]:
    """How the corpus ``now`` differs from the one a workdir's ``record`` says it trained on; None
    when they are the same or there is nothing to compare (a synthetic task, an imported model)."""
    then = (record or {}).get("data_fingerprint")
    if not then or not now or {k: then.get(k) for k in ("files", "bytes", "sha256")} == \
            {k: now[k] for k in ("files", "bytes", "sha256")}:
        return None

    def describe(fp: dict) -> str:
        return f"{fp.get('files')} files, {fp.get('bytes'):,} bytes, sha256 {str(fp.get('sha256'))[:12]} from {fp.get('read_from')}"

    return f"the corpus differs from the one this workdir trained on ({describe(then)}; now {describe(now)})"


# ----------------------------------------------------------------------------- metrics.jsonl


def truncate_metrics(path: Path, last_step: int, log_fn: Callable[[str], None] = print_log, final: bool = False) -> None:
    """Keeps the metric lines up to ``last_step`` (later ones are re-run), dropping unparsable
    lines (a partial last line of a killed run); rewrites the file atomically. With ``final``
    (resuming at the last step: only the final evaluation runs again) the final-evaluation lines
    of that step go too, so a re-evaluation replaces its line instead of adding one."""
    if not path.exists():
        return
    keep, dropped = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record.get("step", 0) if isinstance(record, dict) else None
        except ValueError:
            step = None
        if not isinstance(step, int):
            dropped += 1
        elif step < last_step or (step == last_step and not (final and any(k.startswith("eval_") for k in record))):
            keep.append(line)
    if dropped:
        log_fn(f"warning: dropped {dropped} unreadable line(s) from {path} (a run killed while writing)")
    atomic_write(path, "".join(line + "\n" for line in keep).encode())


class MetricsFile:
    """``metrics.jsonl`` opened for appending, unbuffered: each line reaches the file when it is
    written, and a write that fails (a full disk) is a WorkdirError naming the file (closing it
    has nothing left to flush, so no second error hides the first)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "ab", buffering=0)
        except OSError as e:
            raise self._error(e) from e

    def _error(self, e: OSError) -> WorkdirError:
        return WorkdirError(f"cannot write {self.path} ({e.strerror or e}); the checkpoints are intact: free "
                            "space and rerun the same command to resume from the last one")

    def write(self, text: str) -> None:
        data = text.encode()
        try:
            while data:
                data = data[self._file.write(data):]
        except OSError as e:
            raise self._error(e) from e

    def flush(self) -> None:
        pass

    def __enter__(self) -> "MetricsFile":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


# ----------------------------------------------------------------------------- ling_jax.log


class WorkdirLog(io.TextIOBase):
    """``<workdir>/ling_jax.log``, opened for appending at the first write (a block that logs
    nothing leaves no file), under a header line naming what was running. If it cannot be opened
    (a read-only workdir) the text goes to ``fallback`` instead. ``written``: the log's path once
    something went into it, else None."""

    def __init__(self, workdir: Path, what: str, fallback: Any):
        self.path, self.what, self.fallback = Path(workdir) / LOG_NAME, what, fallback
        self._file: Any = None
        self._failed = False

    def _target(self) -> Any:
        if self._file is None and not self._failed:
            try:
                self._file = open(self.path, "a", encoding="utf-8", errors="replace")
                self._file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {self.what}\n")
            except OSError:
                self._failed = True
        return self._file or self.fallback

    def write(self, text: str) -> int:
        (self.fallback if self.closed else self._target()).write(text)  # closed: a late writer of another thread
        return len(text)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    @property
    def written(self) -> Optional[Path]:
        return self.path if self._file is not None else None

    def close(self) -> None:
        super().close()  # flushes
        if self._file is not None:
            self._file.close()


class _Muted(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def log_to_workdir(workdir: str | Path, what: str) -> Iterator[WorkdirLog]:
    """While the block runs, what Python code logs (every other handler of the root logger is
    muted) or prints to ``sys.stderr`` (tracebacks printed by the callbacks of orbax's I/O threads)
    goes to the workdir's :class:`WorkdirLog` instead of the terminal. Failed asyncio tasks report
    their exception when they are collected, so a block that logged something (a failure) ends
    with a garbage collection."""
    log = WorkdirLog(Path(workdir), what, sys.stderr)
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root, muted = logging.getLogger(), _Muted()
    others = list(root.handlers)
    for other in others:
        other.addFilter(muted)
    root.addHandler(handler)
    stderr, sys.stderr = sys.stderr, log
    try:
        yield log
    finally:
        if log.written:
            gc.collect()
        sys.stderr = stderr
        root.removeHandler(handler)
        for other in others:
            other.removeFilter(muted)
        log.close()
