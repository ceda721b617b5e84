"""Kill-and-resume check (issue 16, acceptance 2): SIGKILLs at random points, including during
checkpoint saves, and SIGTERMs; every resume must end bit-identical to an uninterrupted run, and
a SIGTERM must lose no completed step.

    python experiments/kill_resume.py --kills 20 --terms 5 --json experiments/results/kill_resume.json

Not part of the test suite (minutes of wall time); tests/test_faults.py covers one SIGKILL and
one SIGTERM. The runs go through the real CLI (``python -m ling_jax.cli train``) on cpu-tiny,
one CPU device, with a shared persistent compilation cache so restarts are quick.

Kill points cycle through three kinds, each at a random moment:
  * startup: a uniform delay between 0 and the reference run's time to its first step (import,
    restore, compile from the warm cache);
  * save: as soon as a checkpoint save is in progress (an ``*.orbax-checkpoint-tmp*`` directory
    exists), after a random 0-20 ms;
  * step: after 1-3 further logged steps, plus a random 0-50 ms.
SIGTERMs come after 1-4 further steps. The victim's metrics.jsonl and final checkpoint are then
compared with the reference's: every logged loss equal as a float, every array equal bitwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _losses(workdir: Path) -> dict[int, float]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def _checkpoints(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _tmp_dirs(workdir: Path) -> set[str]:
    d = workdir / "checkpoints"
    return {p.name for p in d.iterdir() if "orbax-checkpoint-tmp" in p.name} if d.is_dir() else set()


def _saving(workdir: Path, stale: set[str]) -> bool:
    """A save of this process is in progress (a temporary directory that was not there at launch:
    one left by an earlier killed save is removed by the next trainer, it is not a save)."""
    try:
        return bool(_tmp_dirs(workdir) - stale)
    except FileNotFoundError:  # a directory vanished while listing
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--terms", type=int, default=5)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--checkpoint-every", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", help="where the two workdirs go (default: a temporary directory)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    from ling_jax.provenance import Provenance
    from ling_jax.workdir import recorded_config

    prov = Provenance("experiments/kill_resume.py")
    rng = random.Random(args.seed)
    started = time.time()
    root = Path(args.root or tempfile.mkdtemp(prefix="kill_resume_"))
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
               XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    run = ["--preset", "cpu-tiny", "--steps", str(args.steps), "--checkpoint-every", str(args.checkpoint_every),
           "--train.log_every", "1", "--train.eval_batches", "1", "--train.batch_size", "8", "--train.seq_len", "32",
           "--train.keep_checkpoints", "2", "--no-progress", "--skip-baselines"]

    def command(workdir: Path) -> list[str]:
        return [sys.executable, "-m", "ling_jax.cli", "train", "--workdir", str(workdir), *run]

    reference, victim = root / "reference", root / "victim"
    for d in (reference, victim, root / "warmup"):
        shutil.rmtree(d, ignore_errors=True)
    # Fills the compilation cache, so that the reference measures the startup of a restart.
    subprocess.run(command(root / "warmup"), env=env, check=True, capture_output=True, timeout=1800)
    t0 = time.time()
    proc = subprocess.Popen(command(reference), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first_step = None
    while proc.poll() is None:
        if first_step is None and _losses(reference):
            first_step = time.time() - t0
        time.sleep(0.01)
    if proc.returncode != 0:
        print(proc.stderr.read(), file=sys.stderr)
        return 1
    reference_wall = time.time() - t0
    first_step = first_step or reference_wall
    print(f"reference: {args.steps} steps in {reference_wall:.1f}s (first step after {first_step:.1f}s)", flush=True)

    plan = ["SIGKILL"] * args.kills + ["SIGTERM"] * args.terms
    rng.shuffle(plan)
    attempts, kinds = [], ["startup", "save", "step"]
    for i, sig in enumerate(plan):
        kind = kinds[sum(1 for a in attempts if a["signal"] == "SIGKILL") % 3] if sig == "SIGKILL" else "step"
        before = max(_losses(victim), default=0)
        stale = _tmp_dirs(victim)
        proc = subprocess.Popen(command(victim), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t = time.time()
        during_save = False
        if kind == "startup":
            deadline = t + rng.uniform(0, first_step)
            while time.time() < deadline and proc.poll() is None:
                time.sleep(0.005)
        elif kind == "save":
            while proc.poll() is None and not _saving(victim, stale):
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.02))
            during_save = _saving(victim, stale)
        else:
            target = before + rng.randint(1, 3 if sig == "SIGKILL" else 4)
            while proc.poll() is None and max(_losses(victim), default=0) < target:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.05))
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=600)
        logged = max(_losses(victim), default=0)
        record = {"attempt": i, "signal": sig, "kind": kind, "seconds_after_start": round(time.time() - t, 3),
                  "finished_before_signal": finished, "returncode": proc.returncode, "during_save": during_save,
                  "stale_tmp_dirs": sorted(stale),
                  "logged_step": logged, "checkpoints": _checkpoints(victim)}
        if sig == "SIGTERM" and not finished:
            record["no_step_lost"] = proc.returncode == 143 and max(_checkpoints(victim), default=0) == logged
            record["message"] = err.strip().splitlines()[-1] if err.strip() else ""
        if proc.returncode not in (0, -signal.SIGKILL, 143):
            record["error"] = err.strip()[-500:]
        attempts.append(record)
        print(json.dumps(record), flush=True)
        if finished:
            print("the victim finished before all interruptions: use more --steps", file=sys.stderr)
            break

    final = subprocess.run(command(victim), env=env, capture_output=True, text=True, timeout=600)
    from ling_jax.checkpoints import restored_arrays_equal
    from ling_jax.train import load_trained

    ref_losses, got_losses = _losses(reference), _losses(victim)
    _, _, ref_state = load_trained(reference)
    _, _, got_state = load_trained(victim)
    interrupted = [a for a in attempts if not a["finished_before_signal"]]
    result = {
        "run": {"preset": "cpu-tiny", "steps": args.steps, "checkpoint_every": args.checkpoint_every,
                   "batch_size": 8, "seq_len": 32, "keep_checkpoints": 2, "devices": 1, "seed": args.seed},
        "sigkills": sum(a["signal"] == "SIGKILL" for a in interrupted),
        "sigkills_during_save": sum(a["during_save"] for a in interrupted),
        "sigkills_at_startup": sum(a["kind"] == "startup" for a in interrupted if a["signal"] == "SIGKILL"),
        "sigterms": sum(a["signal"] == "SIGTERM" for a in interrupted),
        "sigterms_no_step_lost": sum(bool(a.get("no_step_lost")) for a in interrupted),
        "unexpected_errors": sum("error" in a for a in attempts),
        "final_returncode": final.returncode,
        "losses_bit_identical": got_losses == ref_losses and len(ref_losses) == args.steps,
        "final_state_bit_identical": int(got_state.step) == args.steps and restored_arrays_equal(got_state, ref_state),
        "stale_tmp_dirs_seen_at_launch": sum(bool(a["stale_tmp_dirs"]) for a in attempts),
        "attempts": attempts,
        "wall_seconds": round(time.time() - started, 1),
    }
    ok = (result["losses_bit_identical"] and result["final_state_bit_identical"] and final.returncode == 0
          and result["unexpected_errors"] == 0 and result["sigterms_no_step_lost"] == result["sigterms"])
    if args.json:
        prov.write(args.json, result, config=recorded_config(reference), checkpoints=[reference, victim], indent=1)
    print(f"{result['sigkills']} SIGKILLs ({result['sigkills_during_save']} during a save, "
          f"{result['sigkills_at_startup']} at startup), {result['sigterms']} SIGTERMs "
          f"({result['sigterms_no_step_lost']} lost no step); losses bit-identical: {result['losses_bit_identical']}, "
          f"final state bit-identical: {result['final_state_bit_identical']}; {result['wall_seconds']}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
