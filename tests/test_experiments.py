"""The experiment scripts end to end on the smoke preset, resume, figures, and the README report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from experiments import ablate_depth, ablate_moe, combined, common, plots, report, sweep_pruning
from ling_jax.testing import fast_compile

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"sweep_pruning": sweep_pruning, "ablate_moe": ablate_moe, "ablate_depth": ablate_depth, "combined": combined}


_DONE: dict[Path, set] = {}


def _run(root: Path, name: str) -> None:
    """One script's smoke preset into ``root``, once (runs are shared between scripts). Each run
    is a few steps of a tiny model, so compiling is nearly all the time: programs compile with most
    XLA optimizations off (fast_compile); the tests check records, keys, files and resume, never
    exact numbers."""
    done = _DONE.setdefault(root, set())
    if name not in done:
        with fast_compile():
            SCRIPTS[name].main(["--preset", "smoke", "--results", str(root), "--no-progress"])
        done.add(name)


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def smoke(smoke_root) -> Path:
    """Every script's smoke results (each script runs in its own test first: no long fixture)."""
    for name in SCRIPTS:
        _run(smoke_root, name)
    return smoke_root


def test_readme_section_matches_results():
    """README.md's results section is exactly what report.py generates from experiments/results/."""
    assert report.main(["--check", "--no-figures"]) == 0


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_smoke_writes_results(smoke_root, name):
    _run(smoke_root, name)
    smoke = smoke_root
    records = common.read_jsonl(smoke / "smoke" / f"{name}.jsonl")
    assert records, f"{name} wrote no records"
    for r in records:
        assert r["quality"] is not None and r["trf"] is not None and r["trf"] > 0
    assert (smoke / "smoke" / f"{name}.csv").exists()
    assert (smoke / "smoke" / f"{name}_summary.csv").exists()
    meta = json.loads((smoke / "smoke" / f"{name}.meta.json").read_text())
    assert meta["command"].startswith(f"python experiments/{name}.py") and "--preset smoke" in meta["command"]


def test_sweep_covers_every_point_and_baseline(smoke_root):
    _run(smoke_root, "sweep_pruning")
    smoke = smoke_root
    records = common.read_jsonl(smoke / "smoke" / "sweep_pruning.jsonl")
    sw = sweep_pruning.SWEEPS["smoke"]
    expected = sweep_pruning.plan(sweep_pruning.TASKS["smoke"], common.sizes("smoke").seeds, sw)
    keys = {tuple(r[k] for k in sweep_pruning.KEY) for r in records}
    assert keys == {tuple(p[k] for k in sweep_pruning.KEY) for p in expected}
    methods = {r["method"] for r in records}
    assert set(sw.baselines) <= methods and {"dense", "learned"} <= methods
    dense = [r for r in records if r["method"] == "dense"]
    assert all(r["trf"] == pytest.approx(1.0) for r in dense)
    pruned = [r for r in records if r["rule"] == "budget"]
    assert all(r["keep_ratio"] < 1.0 for r in pruned)
    assert any(r.get("decode_rel") for r in pruned), "decode time relative to dense is recorded"
    assert any(r.get("prefill_rel") for r in pruned), "prefill time relative to dense is recorded"


def test_resume_skips_finished_points(smoke_root, tmp_path):
    _run(smoke_root, "ablate_moe")
    smoke = smoke_root
    """A rerun over complete results adds nothing (and trains nothing: the runs are cached)."""
    before = (smoke / "smoke" / "ablate_moe.jsonl").read_text()
    ablate_moe.main(["--preset", "smoke", "--results", str(smoke), "--no-progress"])
    assert (smoke / "smoke" / "ablate_moe.jsonl").read_text() == before
    # an interrupted file (last record lost, half a line written) is completed on the next run
    copy = tmp_path / "results"
    shutil.copytree(smoke, copy)
    path = copy / "smoke" / "ablate_moe.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    ablate_moe.main(["--preset", "smoke", "--results", str(copy), "--no-progress"])
    again = common.read_jsonl(path)
    assert {(r["variant"], r["point"]) for r in again} == {(json.loads(l)["variant"], json.loads(l)["point"]) for l in lines}


def test_figures_and_report_from_results_alone(smoke, tmp_path):
    made = plots.draw_all(smoke, "smoke")
    names = {p.name for p in made}
    assert {"pareto_mqar.png", "keep_mqar.png", "experts_zero4.png", "depth_layers_used.png", "ablate_moe_text.png",
            "ablate_depth_text.png", "combined_mqar.png"} <= names
    assert all(p.stat().st_size > 1000 for p in made)
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n")
    assert report.main(["--preset", "smoke", "--results", str(smoke), "--readme", str(readme), "--no-figures"]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n") and report.START in text and report.END in text
    assert "python experiments/sweep_pruning.py --preset smoke" in text
    assert "Is a 10× cut at under 2% quality loss real?" in text and "**Answer from these runs:**" in text
    assert report.main(["--preset", "smoke", "--results", str(smoke), "--readme", str(readme), "--check"]) == 0
    readme.write_text(text.replace("## Results", "## Results (edited)"))
    assert report.main(["--preset", "smoke", "--results", str(smoke), "--readme", str(readme), "--check"]) == 1
    # regenerating restores the section byte for byte and leaves the rest alone
    assert report.main(["--preset", "smoke", "--results", str(smoke), "--readme", str(readme), "--no-figures"]) == 0
    assert readme.read_text() == text


def test_token_classes():
    row = list(b"def f(x1):\n    return 42 + x1")
    classes = common.token_classes(row)
    assert classes[:3] == ["keyword"] * 3 and classes[3] == "whitespace" and classes[4] == "identifier"
    assert classes[5] == "punctuation" and classes[6:8] == ["identifier"] * 2
    text = bytes(row).decode()
    assert classes[text.index("42")] == "digit" and classes[text.index("return")] == "keyword"


def test_relative_loss_and_best_within():
    assert common.relative_loss(0.98, 1.0, "accuracy") == pytest.approx(0.02)
    assert common.relative_loss(2.04, 2.0, "bpb") == pytest.approx(0.02)
    recs = [{"task": "t", "seed": s, "method": "learned", "rule": "budget", "value": b, "compaction": False,
             "trf": trf, "rel_loss": loss} for s in (0, 1) for b, trf, loss in ((8, 3.0, 0.05 * s), (16, 2.0, 0.0))]
    best = report.best_within(recs, "t", "learned")
    assert best["n"] == 2 and best["mean"] == pytest.approx(2.5)


def test_train_profile_parts_cover_the_step_shapes():
    """bench_train --profile's parts run at the preset's shapes: XLA counts exactly the FLOPs the
    ledger-style formula gives for the projection matmuls (3x forward), and every part has a time."""
    import jax

    from experiments.train_profile import profile_parts
    from ling_jax.config import get_preset
    from ling_jax.model import Transformer
    from ling_jax.train import init_state, make_train_step

    config = get_preset("cpu-tiny")
    m, t = config.model, config.train
    model = Transformer(m)
    state = jax.jit(lambda key: init_state(config, model, key))(jax.random.key(0))  # eager init compiles op by op
    tokens = jax.random.randint(jax.random.key(1), (t.batch_size, t.seq_len), 0, m.vocab_size)
    batch = {"inputs": tokens, "targets": tokens, "loss_mask": jax.numpy.ones(tokens.shape),
             "oracle_mask": jax.numpy.zeros(tokens.shape, bool)}
    out = profile_parts(config, state.params, jax.jit(make_train_step(config, model)), (state, batch),
                        lambda i: None, repeats=1, train_flops=1e6, matmul_size=128)
    n, e, f, hd = t.batch_size * t.seq_len, m.d_model, m.mlp_dim, m.resolved_head_dim
    per_layer = e * hd * (2 * m.num_heads + 2 * m.num_kv_heads) + 3 * e * f
    assert out["profile_matmuls_xla_flops"] == pytest.approx(6 * n * (m.num_layers * per_layer + e * m.vocab_size))
    for part in ("step", "matmuls", "attention_core", "attention_softmax", "norms", "rope", "embed_and_loss",
                 "optimizer", "peak_matmul", "data"):
        assert out[f"profile_{part}_cpu_s"] >= 0 and out[f"profile_{part}_wall_s"] > 0
    assert out["profile_step_share_of_step"] == 1.0


def test_bench_realized_smoke(tmp_path):
    """bench_realized at cpu-tiny dims, one row (compaction) beside dense: every key of a row,
    provenance, a finite gap, the stated skip fraction."""
    import math

    from experiments import bench_realized

    path = tmp_path / "bench_realized.json"
    with fast_compile():
        bench_realized.main(["--quick", "--preset", "cpu-tiny", "--rows", "prune_budget_compact_50",
                             "--json", str(path)])
    data = json.loads(path.read_text())
    for row in ("dense", "prune_budget_compact_50"):
        for key in ("prefill_xla_flops", "prefill_ledger_computed", "prefill_ledger_ideal", "time_vs_dense",
                    "decode_time_vs_dense", "skip_fraction", "computed_skip_fraction", "xla_exact"):
            assert f"{row}_{key}" in data, f"{row}_{key}"
    for key in ("command", "git_revision", "config", "wall_s", "min_time_fraction_of_computed"):
        assert key in data
    assert math.isfinite(data["max_ledger_xla_gap"]) and data["max_ledger_xla_gap"] >= 0
    assert data["prune_budget_compact_50_skip_fraction"] == 0.5  # budget T/2: half the tokens compacted away
    assert data["prune_budget_compact_50_prefill_ledger_computed"] < data["dense_prefill_ledger_computed"]
    assert data["prune_budget_compact_50_decode_time_vs_dense"] > 0


def test_time_tests_reads_counts_and_the_slowest_item_from_pytest_output():
    from experiments.time_tests import parse

    out = ("============================= slowest 15 durations =============================\n"
           "61.20s call     tests/test_realized.py::test_no_future\n"
           "70.50s setup    tests/test_realized.py::test_ledger[a]\n"
           "=========== 540 passed, 2 skipped, 1 failed in 845.12s (0:14:05) ===========\n")
    got = parse(out)
    assert (got["passed"], got["skipped"], got["failed"], got["errors"]) == (540, 2, 1, 0)
    assert got["pytest_s"] == 845.12 and got["slowest_s"] == 70.5
    assert got["slowest_item"] == "tests/test_realized.py::test_ledger[a] (setup)"
