"""Fault injection (issue 16): every scenario ends with a bit-identical continuation or a one-line
error and a non-zero exit, never loses the last good checkpoint, and never leaves a workdir that
the original command cannot resume.

One reference run (``ref``: cpu-tiny, 16 steps, a checkpoint every 4 steps, all kept) is trained
once; each scenario copies it, breaks something and resumes. Real processes are used only where a
real process is needed (the lock holder, SIGTERM, SIGKILL); everything else calls ``train`` or
``ling_jax.cli.main`` in-process.
"""

import builtins
import functools
import gc
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ling_jax import cli
from ling_jax.checkpoints import (CheckpointError, checkpoint_manager, prune_checkpoints, restore_latest,
                                  save_checkpoint, state_report)
from ling_jax.config import ConfigError, apply_overrides, get_preset
from ling_jax.data import load_corpus
from ling_jax.model import Transformer
from ling_jax.pipeline import build_data
from ling_jax.train import abstract_state, init_state, load_trained, train
from ling_jax.workdir import WorkdirError, WorkdirLock, truncate_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 16, 4
RUN = ["--preset", "cpu-tiny", "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--train.log_every", "1",
       "--train.eval_batches", "1", "--train.batch_size", "8", "--train.seq_len", "32", "--train.keep_checkpoints", "10",
       "--no-progress", "--skip-baselines"]


def _config(**overrides):
    base = {"train.steps": STEPS, "train.checkpoint_every": EVERY, "train.log_every": 1, "train.eval_batches": 1,
            "train.batch_size": 8, "train.seq_len": 32, "train.keep_checkpoints": 10}
    return apply_overrides(get_preset("cpu-tiny"), {k: str(v) for k, v in {**base, **overrides}.items()})


def _losses(workdir) -> dict[int, float]:
    records = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _target():
    config = _config()
    return abstract_state(config, Transformer(config.model))


@functools.lru_cache(maxsize=16)
def _params_at(workdir, step):
    """The state saved at `step` (each workdir path is a new one per test, so caching is safe)."""
    import orbax.checkpoint as ocp

    manager = checkpoint_manager(workdir, _config(), read_only=True)
    state = manager.restore(step, args=ocp.args.StandardRestore(_target()))
    manager.close()
    return state


def _assert_same_state(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.opt_state, b.opt_state)


def _main(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err, *needles):
    assert rc != 0
    lines = [x for x in err.splitlines() if x.startswith("ling-jax")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent compilation cache shared by this module's runs and its subprocesses: every run
    here has the same shapes and schedule, so all but the first load their executables."""
    from jax._src import compilation_cache

    path = str(tmp_path_factory.mktemp("jax_cache"))
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (path, 0, 0)):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield path
    for name, value in before.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """The uninterrupted reference run; tests copy it (never change it)."""
    workdir = tmp_path_factory.mktemp("faults") / "ref"
    train(_config(), workdir, progress=False, log_fn=lambda s: None)
    assert _steps(workdir) == list(range(EVERY, STEPS + 1, EVERY))
    return workdir


def _copy(ref, tmp_path, *, upto=STEPS) -> Path:
    """A copy of the reference workdir as it was after step `upto` (later checkpoints and metrics gone)."""
    dst = tmp_path / "wd"
    shutil.copytree(ref, dst)
    for step in _steps(dst):
        if step > upto:
            shutil.rmtree(dst / "checkpoints" / str(step))
    truncate_metrics(dst / "metrics.jsonl", upto, lambda s: None)
    return dst


def _env():
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ----------------------------------------------------------------------------- 1: non-finite values


@pytest.mark.parametrize("field,value", [("train.learning_rate", "inf"), ("train.weight_decay", "inf"),
                                         ("train.grad_clip", "nan"), ("train.learning_rate", "nan"),
                                         ("train.beta2", "nan"), ("model.norm_eps", "inf")])
def test_non_finite_config_values_are_refused(field, value):
    with pytest.raises(ConfigError, match=field.split(".")[1] + ".*finite|" + field.split(".")[1] + ".*must be in"):
        apply_overrides(get_preset("cpu-tiny"), {field: value})


def test_divergence_stops_with_one_line_and_keeps_good_checkpoints(ref, tmp_path, capsys):
    """A finite but exploding state (weights x 1e30, saved as step 20) makes the next step's loss
    non-finite: the run stops naming that step, saves nothing, and the good checkpoints stay."""
    wd = _copy(ref, tmp_path)
    config = _config()
    manager = checkpoint_manager(wd, config)
    huge = _params_at(ref, STEPS)
    huge = huge.replace(step=huge.step + 4, params=jax.tree_util.tree_map(lambda p: p * 1e30, huge.params))
    save_checkpoint(manager, STEPS + 4, huge, keep=10)
    manager.close()
    before = _steps(wd)
    rc, out, err = _main(capsys, "train", "--workdir", wd, *RUN, "--steps", STEPS + 8, "--train.log_every", 2)
    _one_line_error(rc, err, f"diverged at step {STEPS + 5}:", f"last checkpoint: step {STEPS + 4}")
    assert "resuming with settings changed from config.json: " in out and "train.log_every: 1 -> 2" in out
    assert f"learning-rate schedule keeps the {STEPS} steps" in out  # --steps moved the end, not the schedule
    assert _steps(wd) == before and max(_losses(wd)) == STEPS  # nothing of the diverged steps was kept
    _assert_same_state(_params_at(wd, STEPS), _params_at(ref, STEPS))


def test_non_finite_state_is_never_saved(tmp_path):
    config = _config()
    model = Transformer(config.model)
    state = jax.jit(lambda key: init_state(config, model, key))(jax.random.key(0))  # one compile, not one per op
    manager = checkpoint_manager(tmp_path, config)
    save_checkpoint(manager, 1, state, keep=1)
    bad = state.replace(params=jax.tree_util.tree_map(lambda p: p.at[..., 0].set(np.nan), state.params))
    with pytest.raises(CheckpointError, match="refusing to save step 2: non-finite"):
        save_checkpoint(manager, 2, bad, keep=1)
    assert manager.all_steps() == [1]  # retention never ran: the good step stays
    manager.close()


# ----------------------------------------------------------------------------- 2/3: corrupted checkpoints


def _corrupt(step_dir: Path, kind: str) -> None:
    data = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    if kind == "truncated":
        data.write_bytes(raw[: len(raw) // 2])
    elif kind == "garbage":
        data.write_bytes(np.random.default_rng(0).integers(0, 256, len(raw), dtype=np.uint8).tobytes())
    elif kind == "bitflip":  # 64 bytes in the middle, as the issue did
        mid = len(raw) // 2
        raw[mid:mid + 64] = bytes(b ^ 0x10 for b in raw[mid:mid + 64])
        data.write_bytes(bytes(raw))
    elif kind == "metadata":
        (step_dir / "default" / "_METADATA").unlink()
    elif kind == "fingerprint":  # the step's own metadata, which holds the fingerprints: unverified
        (step_dir / "_CHECKPOINT_METADATA").unlink()
    elif kind == "emptied":
        for child in step_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()


@pytest.mark.parametrize("kind", ["truncated", "garbage", "bitflip", "metadata", "emptied"])
def test_corrupted_latest_checkpoint_falls_back(ref, tmp_path, kind):
    """Readers (eval) and the trainer's restore skip the broken last step with a warning naming it
    and use the one before, bit for bit; readers move nothing, the trainer moves the broken one aside."""
    wd = _copy(ref, tmp_path)
    _corrupt(wd / "checkpoints" / str(STEPS), kind)
    warnings = []
    _, _, state = load_trained(wd, log_fn=warnings.append)
    assert int(state.step) == STEPS - EVERY and len(warnings) == 1 and f"skipped checkpoint step {STEPS}" in warnings[0], warnings
    _assert_same_state(state, _params_at(ref, STEPS - EVERY))
    assert STEPS in _steps(wd)  # a reader leaves it alone

    config = _config()
    manager = checkpoint_manager(wd, config)
    warnings.clear()
    restored, step = restore_latest(manager, _target(), log_fn=warnings.append, quarantine=wd / "skipped_checkpoints")
    manager.close()
    assert step == STEPS - EVERY and f"skipped checkpoint step {STEPS}" in warnings[0] and "moved it to" in warnings[0]
    assert STEPS not in _steps(wd) and len(list((wd / "skipped_checkpoints").iterdir())) == 1


def test_nothing_restorable_is_one_error_and_moves_nothing(ref, tmp_path):
    wd = _copy(ref, tmp_path, upto=8)
    for step in (4, 8):
        _corrupt(wd / "checkpoints" / str(step), "emptied")
    with pytest.raises(CheckpointError, match=r"no checkpoint .* can be restored .*step 8: .*step 4: "):
        train(_config(), wd, progress=False, log_fn=lambda s: None)
    assert _steps(wd) == [4, 8] and not (wd / "skipped_checkpoints").exists()


def test_corruption_and_disk_full_resume_bit_identically(ref, tmp_path, monkeypatch):
    """Bit-flipped last step -> the trainer resumes from the one before; the disk fills during its
    save of the last step (CheckpointError, the earlier steps intact); a partial line is left in metrics.jsonl; the rerun of
    the same command then ends with exactly the reference's losses and state."""
    import orbax.checkpoint as ocp

    wd = _copy(ref, tmp_path)
    _corrupt(wd / "checkpoints" / str(STEPS), "bitflip")
    real_save = ocp.CheckpointManager.save

    def disk_full(self, step, *args, **kwargs):
        if step == STEPS:
            raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device [OS error: 28]")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    logs = []
    with pytest.raises(CheckpointError, match=rf"saving checkpoint step {STEPS} failed .*RESOURCE_EXHAUSTED.*intact; "
                                              rf"details in {wd / 'ling_jax.log'}"):
        train(_config(), wd, progress=False, log_fn=logs.append)
    assert "Traceback" in (wd / "ling_jax.log").read_text()
    assert any(f"skipped checkpoint step {STEPS}" in m for m in logs), logs
    assert max(_steps(wd)) == STEPS - EVERY
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    with open(wd / "metrics.jsonl", "a") as f:
        f.write('{"step": 23, "loss": 2.1')  # a writer killed mid-line
    logs.clear()
    result = train(_config(), wd, progress=False, log_fn=logs.append)
    assert f"resumed from step {STEPS - EVERY}" in "\n".join(logs) and any("dropped 1 unreadable line" in m for m in logs), logs
    assert result["step"] == STEPS and _losses(wd) == _losses(ref)
    _assert_same_state(_params_at(wd, STEPS), _params_at(ref, STEPS))


def test_reader_is_read_only_and_steps_back_when_a_step_vanishes(ref, tmp_path, monkeypatch):
    """eval opens a read-only manager (an in-progress save of the trainer is left alone) and,
    when retention deletes the step it is reading, lists the steps again instead of failing."""
    import orbax.checkpoint as ocp

    wd = _copy(ref, tmp_path)
    in_progress = wd / "checkpoints" / "27.orbax-checkpoint-tmp-1234"
    in_progress.mkdir()
    real_restore = ocp.CheckpointManager.restore
    calls = []

    def racing_restore(self, step, *args, **kwargs):
        calls.append(step)
        if step == STEPS and len(calls) == 1:  # the trainer's retention deletes it mid-read
            shutil.rmtree(wd / "checkpoints" / str(STEPS))
            raise FileNotFoundError(f"No such file or directory: {wd}/checkpoints/24")
        return real_restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", racing_restore)
    warnings = []
    _, _, state = load_trained(wd, log_fn=warnings.append)
    assert calls == [STEPS, STEPS - EVERY] and int(state.step) == STEPS - EVERY and not warnings
    assert in_progress.exists()


# ----------------------------------------------------------------------------- issue 30: unverified steps, races, logs


def test_a_garbled_fingerprint_does_not_let_a_damaged_state_through(ref, tmp_path):
    """Step 16 is rewritten with one bit flipped in the optimizer state, and that array's
    fingerprint in its metadata is garbled: the step is unverified, so the reader warns and uses
    the verified step 12 (the old check skipped an array with an unreadable fingerprint)."""
    wd = _copy(ref, tmp_path)
    good = _params_at(ref, STEPS)
    leaves, treedef = jax.tree_util.tree_flatten(good.opt_state)
    i = next(i for i, x in enumerate(leaves) if x.dtype == np.float32 and x.size)
    flipped = np.array(leaves[i])
    flipped.view(np.uint32).flat[0] ^= 1 << 20
    damaged = good.replace(opt_state=jax.tree_util.tree_unflatten(treedef, [*leaves[:i], flipped, *leaves[i + 1:]]))
    shutil.rmtree(wd / "checkpoints" / str(STEPS))
    manager = checkpoint_manager(wd, _config())
    save_checkpoint(manager, STEPS, damaged, keep=10)
    manager.close()
    before, after = state_report(good)[0], state_report(damaged)[0]
    (name,) = [k for k in after if after[k] != before[k]]  # the flipped array
    meta = wd / "checkpoints" / str(STEPS) / "_CHECKPOINT_METADATA"
    record = json.loads(meta.read_text())
    record["custom_metadata"]["ling_jax_fingerprint"][name] = "garbled"
    meta.write_text(json.dumps(record))
    warnings = []
    _, _, state = load_trained(wd, log_fn=warnings.append)
    assert int(state.step) == STEPS - EVERY and len(warnings) == 1, warnings
    assert f"skipped checkpoint step {STEPS} (unverified: no readable float32 fingerprint of {name}" in warnings[0]
    _assert_same_state(state, _params_at(ref, STEPS - EVERY))


def test_unverified_steps_give_way_to_a_verified_one_or_are_refused_unless_allowed(ref, tmp_path, monkeypatch):
    """Step 8's metadata (which holds its fingerprints) is deleted: the trainer's restore skips it
    with a warning for the verified step 4 and moves it aside. When step 4 is unverified too, the
    restore is refused naming LING_JAX_ALLOW_UNVERIFIED, which then restores the newest one."""
    allow = "LING_JAX_ALLOW_UNVERIFIED"
    monkeypatch.delenv(allow, raising=False)
    wd = _copy(ref, tmp_path, upto=8)
    _corrupt(wd / "checkpoints" / "8", "fingerprint")
    manager = checkpoint_manager(wd, _config())
    warnings = []
    _, step = restore_latest(manager, _target(), log_fn=warnings.append, quarantine=wd / "skipped_checkpoints")
    manager.close()
    assert step == 4 and len(warnings) == 1, warnings
    assert "skipped checkpoint step 8 (unverified: no readable fingerprint" in warnings[0]
    assert "moved it to" in warnings[0]
    (moved,) = (wd / "skipped_checkpoints").iterdir()
    assert _steps(wd) == [4]
    moved.rename(wd / "checkpoints" / "8")  # back, for the readers below
    _corrupt(wd / "checkpoints" / "4", "fingerprint")
    with pytest.raises(CheckpointError, match=r"step 8: unverified: .*step 4: unverified: .*to restore step 8 "
                                              rf"without verification, rerun with {allow}=1"):
        load_trained(wd, log_fn=lambda s: None)
    monkeypatch.setenv(allow, "1")
    warnings.clear()
    _, _, state = load_trained(wd, log_fn=warnings.append)
    assert int(state.step) == 8 and len(warnings) == 1 and "restoring checkpoint step 8 UNVERIFIED" in warnings[0]
    _assert_same_state(state, _params_at(ref, 8))


def test_reader_lists_again_when_retention_deletes_a_step_being_listed(ref, tmp_path, monkeypatch):
    """orbax reads each step folder it lists and raises FileNotFoundError when the trainer's
    retention deletes one in between. Simulated: every other listing deletes the oldest step and
    fails so; the reader lists again and restores the newest step without a warning."""
    import orbax.checkpoint as ocp

    wd = _copy(ref, tmp_path)
    real = ocp.CheckpointManager._load_checkpoint_infos
    calls = []

    def racing(self, *args, **kwargs):
        calls.append(len(_steps(wd)))
        if len(calls) % 2:
            oldest = wd / "checkpoints" / str(min(_steps(wd)))
            shutil.rmtree(oldest)
            raise FileNotFoundError(2, "No such file or directory", str(oldest))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "_load_checkpoint_infos", racing)
    warnings = []
    _, _, state = load_trained(wd, log_fn=warnings.append)
    assert int(state.step) == STEPS and not warnings and len(calls) >= 4, (calls, warnings)
    _assert_same_state(state, _params_at(ref, STEPS))


def test_a_step_whose_read_failed_while_it_was_deleted_is_not_reported(ref, tmp_path, monkeypatch):
    """A reader fails on step 16 while another program deletes it (the folder is still there when
    the read fails, gone by the time step 12 has been read): no "skipped checkpoint" warning for
    a step that was being deleted, not damaged."""
    import orbax.checkpoint as ocp

    wd = _copy(ref, tmp_path)
    real_restore = ocp.CheckpointManager.restore

    def racing_restore(self, step, *args, **kwargs):
        if step == STEPS:
            (wd / "checkpoints" / str(STEPS) / "default" / "_METADATA").unlink()  # half deleted
            raise FileNotFoundError(f"{wd}/checkpoints/{STEPS}/default/_METADATA")
        shutil.rmtree(wd / "checkpoints" / str(STEPS), ignore_errors=True)  # the deletion ends
        return real_restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", racing_restore)
    warnings = []
    _, _, state = load_trained(wd, log_fn=warnings.append)
    assert int(state.step) == STEPS - EVERY and not warnings, warnings


def test_retention_never_shows_a_half_deleted_step(ref, tmp_path, monkeypatch):
    """A reader must find a step whole or not at all: by the time retention deletes any file of a
    step, the step is no longer there under its name (it is renamed first)."""
    wd = _copy(ref, tmp_path)
    doomed = wd / "checkpoints" / "4"
    visible = []
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        visible.append(doomed.exists())
        return real_unlink(path, *args, **kwargs)

    manager = checkpoint_manager(wd, _config())
    monkeypatch.setattr(os, "unlink", unlink)
    assert prune_checkpoints(manager, keep=3, protect=STEPS) == [4]
    monkeypatch.setattr(os, "unlink", real_unlink)
    manager.close()
    assert visible and not any(visible) and _steps(wd) == [8, 12, 16]
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["12", "16", "8"]  # nothing left behind


def test_damaged_checkpoint_tracebacks_go_to_the_workdir_log(ref, tmp_path, capsys, monkeypatch):
    """Reading a step of garbage makes orbax's asynchronous reads fail: asyncio logs each failed
    read it was not asked about ("Task exception was never retrieved" and a traceback) and I/O
    callbacks print tracebacks to stderr, hundreds of lines in all, at moments that depend on
    timing. Made deterministic here: the restore of the damaged step leaves one such task and
    prints one such traceback, then reads the garbage. All of it goes to <workdir>/ling_jax.log;
    stderr gets the one warning line, which names the log."""
    import asyncio
    import traceback

    import orbax.checkpoint as ocp

    wd = _copy(ref, tmp_path)
    _corrupt(wd / "checkpoints" / str(STEPS), "garbage")
    real_restore = ocp.CheckpointManager.restore

    def noisy_restore(self, step, *args, **kwargs):
        if step == STEPS:
            async def read_shard():
                raise ValueError("DATA_LOSS: a shard of this step cannot be decoded")

            loop = asyncio.new_event_loop()
            loop.create_task(read_shard())  # fails, and nobody asks for its result
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
            try:
                loop.call_soon_threadsafe(print)
            except RuntimeError as e:  # what an I/O callback prints when it finds the loop closed
                traceback.print_exception(e, file=sys.stderr)
        return real_restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", noisy_restore)
    terminal = io.StringIO()  # what a handler of the root logger would print on a terminal
    handler = logging.StreamHandler(terminal)
    logging.getLogger().addHandler(handler)
    try:
        capsys.readouterr()
        _, _, state = load_trained(wd)  # warnings go to stderr
        gc.collect()  # asyncio reports a failed task's exception when the task is collected
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    assert int(state.step) == STEPS - EVERY
    assert terminal.getvalue() == "" and len(err.splitlines()) == 1, err + terminal.getvalue()
    assert f"skipped checkpoint step {STEPS} (unreadable: " in err and f"details in {wd / 'ling_jax.log'}" in err
    log = (wd / "ling_jax.log").read_text()
    assert "Task exception was never retrieved" in log and "DATA_LOSS: a shard" in log
    assert "RuntimeError: Event loop is closed" in log and f"checkpoint step {STEPS} in " in log


def test_a_skipped_step_that_cannot_be_moved_does_not_stop_training(ref, tmp_path, monkeypatch):
    """A step folder at mode 000 cannot be moved into skipped_checkpoints (a folder that changes
    parent needs write permission on itself; root has it, so here the move is made to fail). The
    trainer's restore renames it beside itself (that needs no permission on the folder), which
    frees its step number for the next save, or if even that fails leaves it in place; either way
    it warns and resumes from the good step."""
    wd = _copy(ref, tmp_path)
    _corrupt(wd / "checkpoints" / str(STEPS), "emptied")

    def denied(src, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(src))

    real_rename = os.rename
    monkeypatch.setattr(shutil, "move", denied)
    monkeypatch.setattr(os, "rename", lambda src, dst, *a, **k: denied(src) if ".skipped-" in str(dst)
                        else real_rename(src, dst, *a, **k))
    manager = checkpoint_manager(wd, _config())
    warnings = []
    _, step = restore_latest(manager, _target(), log_fn=warnings.append, quarantine=wd / "skipped_checkpoints")
    assert step == STEPS - EVERY and STEPS in _steps(wd) and len(warnings) == 1, warnings
    assert "could not move it aside (PermissionError: [Errno 13] Permission denied" in warnings[0]
    assert f"left it in place (a save of step {STEPS} fails until it is removed); using step 12" in warnings[0]

    monkeypatch.setattr(os, "rename", real_rename)
    warnings.clear()
    restored, step = restore_latest(manager, _target(), log_fn=warnings.append, quarantine=wd / "skipped_checkpoints")
    assert step == STEPS - EVERY and len(warnings) == 1, warnings
    assert f"renamed it to {wd / 'checkpoints' / str(STEPS)}.skipped-" in warnings[0]
    save_checkpoint(manager, STEPS, restored.replace(step=restored.step + EVERY), keep=10)  # its step number is free
    manager.close()
    assert _steps(wd) == [4, 8, 12, 16]


def _full_disk(monkeypatch, name: str) -> None:
    """Files opened for writing whose name starts with ``name`` are /dev/full: writes fail with ENOSPC."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file).name.startswith(name) and set(mode) & set("aw"):
            file = "/dev/full"
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_open)


def test_full_disk_writing_metrics_is_one_line_naming_the_file(ref, tmp_path, capsys, monkeypatch):
    wd = _copy(ref, tmp_path, upto=12)
    _full_disk(monkeypatch, "metrics.jsonl")
    rc, _, err = _main(capsys, "train", "--workdir", wd, *RUN)
    _one_line_error(rc, err, f"cannot write {wd / 'metrics.jsonl'} (No space left on device)", "rerun the same command")
    assert _steps(wd) == [4, 8, 12]


def test_full_disk_rewriting_metrics_names_the_file_and_keeps_it(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    _full_disk(monkeypatch, ".metrics.jsonl")  # truncate_metrics writes a temporary file, then renames it
    with pytest.raises(WorkdirError, match=rf"cannot write {path} \(No space left on device\)"):
        truncate_metrics(path, 1, lambda s: None)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


# ----------------------------------------------------------------------------- 3/5: lock, SIGTERM, SIGKILL


def _start(workdir, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ling_jax.cli", "train", "--workdir", str(workdir), *RUN, *extra]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, workdir, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (Path(workdir) / "metrics.jsonl").exists() and max(_losses(workdir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("trainer made no progress")


def test_second_trainer_is_refused_and_sigterm_saves_the_last_step(ref, tmp_path, capsys):
    """A real trainer holds the workdir: a second one is refused naming its PID. SIGTERM makes the
    first save its last completed step and exit 143 with one line; then the second runs and ends
    bit-identical to the reference."""
    wd = _copy(ref, tmp_path, upto=8)
    first = _start(wd)
    _wait_for_step(first, wd, 10)
    first.send_signal(signal.SIGSTOP)  # held mid-run while the second trainer tries
    rc, _, err = _main(capsys, "train", "--workdir", wd, *RUN)
    _one_line_error(rc, err, "in use by another training run", f"PID {first.pid}")
    first.send_signal(signal.SIGTERM)
    first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 143, err
    line = _one_line_error(first.returncode, err, "stopped by SIGTERM after step", "checkpoint saved")
    stopped = int(line.split("after step ")[1].split()[0])
    assert max(_steps(wd)) == stopped == max(_losses(wd))  # no completed step lost
    rc, out, err = _main(capsys, "train", "--workdir", wd, *RUN)
    assert rc == 0 and f"resumed from step {stopped}" in out, err
    assert _losses(wd) == _losses(ref)


def test_sigkill_leaves_a_stale_lock_that_is_taken_over(ref, tmp_path):
    wd = _copy(ref, tmp_path, upto=8)
    victim = _start(wd)
    _wait_for_step(victim, wd, 10)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert f"PID {victim.pid}" in (wd / ".lock").read_text()
    logs = []
    train(_config(), wd, progress=False, log_fn=logs.append)
    text = "\n".join(logs)
    assert f"took over the workdir lock left by PID {victim.pid}" in text and "resumed from step" in text
    assert _losses(wd) == _losses(ref)
    assert (wd / ".lock").read_text() == ""  # a clean exit leaves no holder


def test_lock_is_exclusive_and_released(tmp_path):
    with WorkdirLock(tmp_path, lambda s: None):
        with pytest.raises(WorkdirError, match=f"in use by another training run \\(PID {os.getpid()}"):
            with WorkdirLock(tmp_path, lambda s: None):
                pass
    with WorkdirLock(tmp_path, lambda s: None):  # released on exit
        pass


# ----------------------------------------------------------------------------- 4: config.json


def test_missing_config_json_and_another_width_leaves_workdir_resumable(ref, tmp_path, capsys):
    wd = _copy(ref, tmp_path)
    (wd / "config.json").unlink()
    rc, _, err = _main(capsys, "train", "--workdir", wd, *RUN, "--model.d_model", 32)
    _one_line_error(rc, err, "can be restored", "config.json is missing")
    assert not (wd / "config.json").exists() and _steps(wd) == _steps(ref)
    rc, out, err = _main(capsys, "train", "--workdir", wd, *RUN)  # the original command (a finished run)
    assert rc == 0 and f"resumed from step {STEPS}" in out, err
    assert json.loads((wd / "config.json").read_text())["config"]["model"]["d_model"] == 64
    rc, out, _ = _main(capsys, "eval", "--workdir", wd)
    assert rc == 0 and json.loads(out.splitlines()[-1])["step"] == STEPS


# ----------------------------------------------------------------------------- 6/7/9: one-line CLI errors


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    rc, _, err = _main(capsys, "train", "--workdir", a_file, *RUN)
    _one_line_error(rc, err, "is not a directory")
    devices = jax.device_count()
    rc, _, err = _main(capsys, "train", "--workdir", tmp_path / "w", *RUN, "--mesh", f"data={devices},tensor=2")
    _one_line_error(rc, err, "MeshConfig", f"multiply to {2 * devices}", f"{devices} devices")
    rc, _, err = _main(capsys, "train", "--workdir", tmp_path / "w", *RUN, "--task", "mqar",
                       "--data.task_options", "num_pairs=8,filler_fraction=2")
    _one_line_error(rc, err, "task_options", "filler_fraction")
    rc, _, err = _main(capsys, "train", "--workdir", tmp_path / "w", *RUN, "--train.grad_clip", "nan")
    _one_line_error(rc, err, "grad_clip")
    import ling_jax.workdir as workdir_lib

    def read_only_fs(path, *args, **kwargs):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(workdir_lib.os, "open", read_only_fs)
    rc, _, err = _main(capsys, "train", "--workdir", tmp_path / "w", *RUN)
    _one_line_error(rc, err, "not writable", "Read-only file system")


def test_partial_metrics_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    logs = []
    truncate_metrics(path, 2, logs.append)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n' and "dropped 1" in logs[0]


# ----------------------------------------------------------------------------- 8: resuming keeps the recorded data


def test_resume_keeps_the_recorded_task(tmp_path, capsys):
    """Trained on mqar, resumed with a larger --steps and no --task: the resumed steps are mqar
    steps (accuracy, not bits per byte), config.json still says mqar, and nothing says otherwise."""
    wd = tmp_path / "mqar"
    rc, _, err = _main(capsys, "train", "--workdir", wd, *RUN, "--task", "mqar")
    assert rc == 0, err
    rc, out, err = _main(capsys, "train", "--workdir", wd, *RUN, "--steps", STEPS + 2)
    assert rc == 0 and f"resumed from step {STEPS}" in out and "data.task" not in out, out + err
    records = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 3))
    assert all("accuracy" in r and "bpb" not in r for r in records if "loss" in r)  # still mqar, not text
    assert json.loads((wd / "config.json").read_text())["config"]["data"]["task"] == "mqar"
    rc, _, err = _main(capsys, "train", "--workdir", wd, "--preset", "cpu-small", "--steps", STEPS)
    _one_line_error(rc, err, "--preset cpu-tiny")


# ----------------------------------------------------------------------------- 10: a small folder of documents


def test_small_directory_holds_out_file_tails(tmp_path, caplog):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "cat", "sat"]
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("doc2.txt", "doc3.txt"):  # neither hashes into the 5% validation split
        (folder / name).write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(150)) + "\n")
    config = apply_overrides(_config(), {"data.path": str(folder)})
    with caplog.at_level("WARNING", logger="ling_jax.data.corpus"):
        data = build_data(config)
    assert "holding out the last 5% of each file's bytes" in caplog.text
    train_bytes, valid = load_corpus(folder, "train"), load_corpus(folder, "validation")
    assert len(valid) > 0 and len(train_bytes) + len(valid) - 2 == sum(p.stat().st_size for p in folder.iterdir())
    assert data.train_batch(0).inputs.shape == (8, 32) and len(data.eval_batches()) == 1
