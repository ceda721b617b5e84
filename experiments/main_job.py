"""Runs the README's main job and records what it printed as a results file.

The job is the README's first command (``ling-jax train --preset cpu-small-pruned --workdir DIR``),
run as a subprocess exactly as a user runs it; this script adds only the record: the command,
git revision, config, wall time of the job and of a rerun of the finished job, the final
evaluation, the baselines it printed and its pruning sweep (``DIR/pruning_sweep.json``).

    python experiments/main_job.py --workdir /tmp/main_job --json experiments/results/main_job.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _run(cmd: list[str]) -> tuple[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout, wall


def _baselines(stdout: str) -> dict:
    """The ``validation bits per byte (N bytes):`` table the job prints."""
    m = re.search(r"validation bits per byte \(([\d,]+) bytes\):\n((?:  .+\n?)+)", stdout)
    if not m:
        raise SystemExit("the job printed no baseline table")
    rows = {line[:18].strip(): float(line[18:]) for line in m.group(2).splitlines() if line.strip()}
    return {"validation_bytes": int(m.group(1).replace(",", "")), "bpb": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="fresh workdir for the job (deleted first)")
    parser.add_argument("--preset", default="cpu-small-pruned")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    job = [sys.executable, "-m", "ling_jax.cli", "train", "--preset", args.preset, "--workdir", str(args.workdir), "--no-progress"]
    stdout, wall = _run(job)
    rerun_stdout, rerun_wall = _run(job)
    if "already finished training" not in rerun_stdout:
        raise SystemExit("the rerun did not reuse the finished job")
    records = [json.loads(line) for line in (args.workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in records if "loss" in r and "step" in r]
    out = {
        "command": " ".join(["python experiments/main_job.py", *(argv if argv is not None else sys.argv[1:])]),
        "job_command": f"ling-jax train --preset {args.preset} --workdir runs/main",
        "git_revision": _git_revision(),
        "config": json.loads((args.workdir / "config.json").read_text())["config"],
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_1min_end": os.getloadavg()[0],
        "wall_s": wall,
        "rerun_wall_s": rerun_wall,
        "steps": train_rows[-1]["step"] if train_rows else None,
        "final_eval": json.loads(next(line for line in stdout.splitlines() if line.startswith("{"))),
        "baselines": _baselines(stdout),
        "sweep": json.loads((args.workdir / "pruning_sweep.json").read_text()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}: job {wall:.1f} s, rerun {rerun_wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
