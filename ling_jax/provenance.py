"""Where a results file came from: the command, git revision, full config, library versions and
wall time, and, for an evaluation of checkpoints trained earlier, each checkpoint it read with the
provenance recorded in its workdir.

Every results file goes through :class:`Provenance`: created when the run starts (the wall clock
starts then), its :meth:`~Provenance.fields` are merged into the results object, or
:meth:`~Provenance.write` writes the object atomically with them::

    prov = Provenance("experiments/bench_moe.py", argv)
    ...
    prov.write(path, result, config=config)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


@functools.lru_cache(maxsize=1)
def git_revision() -> str:
    """``git rev-parse HEAD`` of the source tree, with ``-dirty`` if tracked files changed; "unknown" outside git."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
        rev = run("rev-parse", "HEAD")
        return rev + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def portable_path(arg: str) -> str:
    """An argument as a command in the README may show it: an absolute path inside the repository
    becomes relative to it, one elsewhere (a scratch folder) becomes ``$TMPDIR/<name>``; an
    ``--option=/path`` likewise; anything else unchanged."""
    option, eq, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
    if not value.startswith("/"):
        return arg
    path = Path(value)
    try:
        portable = path.resolve().relative_to(REPO.resolve()).as_posix() or "."
    except ValueError:
        portable = "$TMPDIR/" + path.name
    return option + eq + portable


def command_line(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """``python <script> <args>`` (``argv`` default: this process's arguments), with every path
    argument relative to the repository (:func:`portable_path`): a recorded command names no
    machine's folders."""
    args = sys.argv[1:] if argv is None else list(argv)
    return "python " + " ".join(_quote(portable_path(str(a))) for a in [script, *args])


def _quote(arg: str) -> str:
    head, scratch, name = arg.partition("$TMPDIR/")  # $TMPDIR is left for the shell to expand
    if not scratch:
        return shlex.quote(arg)
    return (shlex.quote(head) if head else "") + scratch + shlex.quote(name)


def jsonable(x: Any) -> Any:
    """Configs (dataclasses) as dicts; paths and other objects as strings."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    return json.loads(json.dumps(x, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)))


def checkpoint_provenance(workdir: str | Path) -> dict:
    """What an evaluation read from ``workdir``: its newest checkpoint step, the config it was
    trained with and the provenance of the run that trained it (all from config.json)."""
    from ling_jax.rerun import latest_checkpoint_step
    from ling_jax.workdir import read_record

    record = read_record(workdir) or {}
    return {"workdir": str(workdir), "step": latest_checkpoint_step(workdir),
            "schedule_steps": record.get("schedule_steps"), "config": record.get("config"),
            "trained_by": record.get("provenance")}


class Provenance:
    """The provenance of one run; the wall clock starts at construction."""

    def __init__(self, script: str, argv: Optional[Sequence[str]] = None):
        self.command = command_line(script, argv)
        self.start = time.perf_counter()

    def fields(self, config: Any = None, checkpoints: Iterable[str | Path] = ()) -> dict:
        """``command``, ``git_revision``, ``versions``, ``config``, ``wall_s``, ``backend``,
        ``cpu_count``, ``machine`` and (evaluation of earlier runs) ``checkpoints``."""
        import jax

        out = {"command": self.command, "git_revision": git_revision(), "versions": library_versions(),
               "backend": jax.default_backend(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
               "wall_s": round(time.perf_counter() - self.start, 1)}
        if config is not None:
            out["config"] = jsonable(config)
        checkpoints = [checkpoint_provenance(c) for c in checkpoints]
        if checkpoints:
            out["checkpoints"] = checkpoints
        return out

    def write(self, path: str | Path, result: Mapping[str, Any], *, config: Any = None,
              checkpoints: Iterable[str | Path] = (), indent: Optional[int] = 2) -> dict:
        """Writes ``result`` plus :meth:`fields` as one JSON object (atomically); returns it."""
        from ling_jax.workdir import atomic_write

        out = {**jsonable(dict(result)), **self.fields(config, checkpoints)}
        atomic_write(Path(path), (json.dumps(out, indent=indent) + "\n").encode())
        return out


def run_record() -> dict:
    """The provenance a training workdir records in its config.json (no wall time: the run goes on)."""
    return {"command": command_line(sys.argv[0] if sys.argv and sys.argv[0] else "python"),
            "git_revision": git_revision(), "versions": library_versions()}
