"""The CLI's pruning sweep (ling_jax/sweep.py) and ``ling-jax train`` / ``ling-jax sweep``."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from ling_jax import cli
from ling_jax.config import ConfigError, PruningConfig, apply_overrides, get_preset
from ling_jax.model import Transformer
from ling_jax.pipeline import build_data
from ling_jax.sweep import best_within, default_budgets, format_table, pruning_sweep, sweep_variants

PRUNED = {"model.pruning.enabled": "true", "model.pruning.layers": "all", "model.pruning.window": "4",
          "model.pruning.budget": "16", "train.eval_batches": "1"}


@pytest.fixture(scope="module")
def setup():
    config = apply_overrides(get_preset("cpu-tiny"), PRUNED)
    batches = [b.as_dict() for b in build_data(config).eval_batches()]
    params = Transformer(config.model).init(jax.random.key(0), batches[0]["inputs"])["params"]
    return config, {"params": params}, batches


def test_variants_start_with_keep_all_and_cover_every_rule(setup):
    config, _, _ = setup
    variants = sweep_variants(config.model, thresholds=(0.5,), budgets=(8, 16), baselines=("window", "random"))
    assert [(r, v) for r, v, _ in variants] == [
        ("keep_all", None), ("threshold", 0.5), ("budget", 8), ("budget+compact", 8), ("window", 8), ("random", 8),
        ("budget", 16), ("budget+compact", 16), ("window", 16), ("random", 16)]
    assert all(c.pruning.mode == "hard" for _, _, c in variants)
    assert variants[0][2].pruning.threshold == 0.0
    assert not variants[2][2].pruning.compaction and variants[2][2].pruning.baseline == "learned"
    assert variants[3][2].pruning.compaction and variants[3][2].pruning.baseline == "learned"
    assert variants[4][2].pruning.baseline == "window" and not variants[4][2].pruning.compaction


def test_bad_sweeps_fail_clearly(setup):
    config, _, _ = setup
    with pytest.raises(ConfigError, match="model.pruning.enabled"):
        sweep_variants(dataclasses.replace(config.model, pruning=PruningConfig()))
    with pytest.raises(ConfigError, match="baseline must be one of"):
        sweep_variants(config.model, baselines=("lru",))
    with pytest.raises(ConfigError, match=r"threshold must be in \[0, 1\]"):
        sweep_variants(config.model, thresholds=(1.5,))
    with pytest.raises(ConfigError, match="budget"):  # below num_sinks + window
        sweep_variants(config.model, budgets=(2,))


def test_default_budgets_respect_the_protected_set(setup):
    config, _, _ = setup
    assert default_budgets(config.model, 128) == (16, 32, 64)
    assert default_budgets(config.model, 16) == (6, 8)  # floor: sinks + window + 1
    assert all(b < 16 for b in default_budgets(config.model, 16))


def test_sweep_rows(setup):
    config, variables, batches = setup
    rows = pruning_sweep(config.model, variables, batches, "bpb", thresholds=(0.0, 1.0), budgets=(8,),
                         baselines=("window",), progress=False)
    assert [r["rule"] for r in rows] == ["keep_all", "threshold", "threshold", "budget", "budget+compact", "window"]
    keep_all, thr0, thr1, budget, compact, window = rows
    assert keep_all["keep_ratio"] == 1.0 and keep_all["rel_loss"] == 0.0
    assert thr0["quality"] == keep_all["quality"]  # threshold 0 keeps everything: the same forward
    assert thr1["keep_ratio"] < 0.5 and thr1["token_reduction_ideal"] > keep_all["token_reduction_ideal"]
    # A key mask alone skips nothing the CPU program computes: no computed saving (the scorer costs a little).
    assert thr1["token_reduction"] == pytest.approx(keep_all["token_reduction"])
    t = batches[0]["inputs"].shape[1]
    assert budget["keep_ratio"] == pytest.approx(8 / t) and window["keep_ratio"] == pytest.approx(8 / t)
    assert budget["token_reduction_ideal"] > 1.0 and budget["token_reduction"] < 1.0
    assert compact["keep_ratio"] == pytest.approx(8 / t) and compact["token_reduction"] > budget["token_reduction"]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("keep_ratio", "token_reduction", "token_reduction_ideal", "quality",
                                                 "rel_loss"))
    table = format_table(rows, "bpb")
    assert table.count("\n") == len(rows) + 1 and "window" in table


def test_best_within_picks_the_largest_reduction_inside_the_tolerance():
    rows = [{"rule": "keep_all", "value": None, "token_reduction": 1.0, "rel_loss": 0.0},
            {"rule": "threshold", "value": 0.5, "token_reduction": 1.5, "rel_loss": 0.01},
            {"rule": "budget", "value": 8, "token_reduction": 3.0, "rel_loss": 0.05},
            {"rule": "window", "value": 16, "token_reduction": 2.0, "rel_loss": 0.019}]
    assert best_within(rows)["rule"] == "window"
    assert best_within(rows, tolerance=0.1)["rule"] == "budget"
    assert best_within(rows[:1]) is None
    # A masked setting that computes as much as dense is no reduction, however good its quality.
    masked = [{"rule": "window", "value": 16, "token_reduction": 1.0, "rel_loss": -0.01}]
    assert best_within(rows[:1] + masked) is None


def _snapshot(workdir) -> dict:
    """Every file under a workdir: path -> (bytes, mtime)."""
    return {str(p.relative_to(workdir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.mark.fast_xla
def test_train_then_sweep_from_the_cli(tmp_path, capsys):
    workdir = tmp_path / "wd"
    train_cmd = ["train", "--preset", "cpu-tiny", "--workdir", str(workdir), "--steps", "2", "--skip-baselines",
                 "--no-progress", *[f"--{k}={v}" for k, v in PRUNED.items()]]
    assert cli.main(train_cmd) == 0
    out = capsys.readouterr().out
    assert "pruning sweep at step 2" in out and "keep_all" in out
    saved = json.loads((workdir / "pruning_sweep.json").read_text())
    assert saved["metric"] == "bpb" and saved["rows"][0]["rule"] == "keep_all"
    assert np.isfinite([r["quality"] for r in saved["rows"]]).all()

    # a rerun of the finished job says so, prints the same results and changes no file
    before = _snapshot(workdir)
    assert cli.main(train_cmd) == 0
    again = capsys.readouterr().out
    assert "already finished training (2 steps)" in again and "--force" in again
    assert again.split("\n", 1)[1] == out.replace(f"wrote {workdir / 'pruning_sweep.json'}",
                                                  f"(read from {workdir / 'pruning_sweep.json'}, written earlier for "
                                                  "this checkpoint; pass --force to run the sweep again)")
    assert _snapshot(workdir) == before

    # other settings go to a file named after them; the job's own sweep file stays as it was
    custom = ["sweep", "--workdir", str(workdir), "--thresholds", "0.5", "--budgets", "8", "--baselines", "--no-progress"]
    assert cli.main(custom) == 0
    path = workdir / "pruning_sweep_t0.5_b8_nobaselines.json"
    rows = json.loads(path.read_text())["rows"]
    assert [r["rule"] for r in rows] == ["keep_all", "threshold", "budget", "budget+compact"]
    assert (workdir / "pruning_sweep.json").read_bytes() == before["pruning_sweep.json"][0]
    # the same sweep again is read back, not redone; --force redoes it
    first = _snapshot(workdir)
    capsys.readouterr()
    assert cli.main(custom) == 0
    assert f"read from {path}" in capsys.readouterr().out and _snapshot(workdir) == first
    assert cli.main([*custom, "--force"]) == 0
    assert "replacing the sweep of step 2" in capsys.readouterr().out

    # after more training the old sweep is of an older checkpoint: refused without --force
    assert cli.main([*train_cmd[:6], "3", *train_cmd[7:], "--skip-sweep"]) == 0
    capsys.readouterr()
    assert cli.main(custom) == 2
    assert "step 2" in capsys.readouterr().err and json.loads(path.read_text())["step"] == 2
    assert cli.main([*custom, "--force"]) == 0 and json.loads(path.read_text())["step"] == 3
    finals = [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert [r["step"] for r in finals] == [2, 3]  # one final evaluation per training run, none added by reruns


@pytest.mark.fast_xla
def test_sweep_of_a_model_trained_without_pruning_is_a_clear_error(tmp_path, capsys):
    workdir = tmp_path / "dense"
    cmd = ["train", "--preset", "cpu-tiny", "--workdir", str(workdir), "--steps", "1", "--skip-baselines",
           "--no-progress", "--train.eval_batches=1"]
    assert cli.main(cmd) == 0
    assert "pruning sweep" not in capsys.readouterr().out
    assert cli.main(["sweep", "--workdir", str(workdir), "--no-progress"]) == 2
    assert "model.pruning.enabled=true" in capsys.readouterr().err
    # --force on the finished workdir evaluates again; its final-eval line is replaced, not repeated
    lines = (workdir / "metrics.jsonl").read_text()
    assert cli.main([*cmd, "--force"]) == 0
    assert "already finished" not in capsys.readouterr().out
    assert (workdir / "metrics.jsonl").read_text() == lines
