"""experiments/long_context.py: the request-level long-context experiment, on its smoke preset."""

import json
import math

import pytest

from experiments import long_context as L
from ling_jax.provenance import command_line
from ling_jax.testing import fast_compile

pytestmark = pytest.mark.slow  # an end-to-end run (still in CI; `-m "not slow"` skips it)

METHODS = "learned,oracle,oracle@1"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_context")
    argv = ["--preset", "smoke", "--results", str(root), "--tasks", "needle", "--methods", METHODS, "--no-progress"]
    with fast_compile():  # ~20 tiny programs, each run once or twice: compiling is most of the time
        assert L.main(argv) == 0
    return root, argv


def test_every_point_is_measured_against_dense(smoke):
    root, _ = smoke
    rows = [json.loads(line) for line in (root / "smoke" / "long_context.jsonl").read_text().splitlines()]
    s = L.SIZES["smoke"]
    want = {(lv, m, b) for lv in L.LEVELS["needle"] for m in METHODS.split(",") for b in s.budgets["needle"]}
    want |= {(lv, "dense", s.prompt) for lv in L.LEVELS["needle"]}
    assert {(r["level"], r["method"], r["budget"]) for r in rows} == want
    for r in rows:
        if r["method"] == "dense":
            assert r["trf_computed"] == 1.0 and r["kv_fraction"] == 1.0
            continue
        # Every method holds `budget` of the P + C slots per layer and drops the rest of the prompt
        # inside the first pruning layer: the whole request computes less and caches less.
        assert r["trf_computed"] > 1.0 and r["kv_fraction"] < 1.0
        assert math.isclose(sum(r["terms"].values()), r["computed_flops"], rel_tol=1e-6)
    oracle0 = {(r["level"], r["budget"]): r["trf_computed"] for r in rows if r["method"] == "oracle"}
    oracle1 = {(r["level"], r["budget"]): r["trf_computed"] for r in rows if r["method"] == "oracle@1"}
    assert all(oracle0[k] > oracle1[k] for k in oracle0)  # deciding a layer later costs a whole layer


def test_summary_meta_and_figure_come_with_the_results(smoke):
    root, argv = smoke
    summary = json.loads((root / "smoke" / "long_context.summary.json").read_text())
    assert [lv["level"] for lv in summary["levels"]] == list(L.LEVELS["needle"])
    assert summary["command"] == command_line("experiments/long_context.py", argv) and summary["git_revision"]
    assert "$TMPDIR/" in summary["command"] and "/tmp/" not in summary["command"]  # no machine path recorded
    assert all(lv["oracle_ceiling"]["budget"] == min(L.SIZES["smoke"].budgets["needle"]) for lv in summary["levels"])
    meta = json.loads((root / "smoke" / "long_context.meta.json").read_text())
    assert meta["finished"] and meta["wall_s"] > 0 and meta["runs"]
    assert all("config" in run for run in meta["runs"].values())  # each checkpoint read, with its config
    assert (root / "figures" / "smoke" / "long_context_needle.png").stat().st_size > 0


def test_a_rerun_resumes_and_measures_nothing_again(smoke):
    root, argv = smoke
    path = root / "smoke" / "long_context.jsonl"
    before = path.read_text()
    assert L.main(argv) == 0
    assert path.read_text() == before


def _rec(level, method, budget, seed, quality, trf, dense=0.9):
    return {"task": "needle", "level": level, "method": method, "budget": budget, "seed": seed, "quality": quality,
            "rel_loss": L.relative_loss("needle", quality, dense), "trf_computed": trf, "trf_ideal": trf,
            "kv_fraction": 0.1, "time_fraction": 0.2, "terms": {"prefill:a": 3.0, "continuation:b": 1.0}}


def test_summary_picks_the_largest_reduction_within_two_percent_and_the_advantage():
    recs = []
    for seed, dq in ((0, 0.9), (1, 0.8)):
        recs += [_rec("vocab", "dense", 96, seed, dq, 1.0, dq),
                 _rec("vocab", "learned", 12, seed, dq * 0.9, 20.0, dq),   # 10% loss: not within
                 _rec("vocab", "learned", 32, seed, dq, 8.0, dq),          # within: 8x
                 _rec("vocab", "window", 12, seed, dq * 0.5, 20.0, dq),
                 _rec("vocab", "window", 32, seed, dq * 0.99, 8.0, dq),
                 _rec("vocab", "oracle", 12, seed, dq, 22.0, dq)]
    out = L.summarize(recs, L.SIZES["smoke"])
    lv = out["levels"][0]
    assert lv["best_learned"]["budget"] == 32 and lv["best_learned"]["trf_computed_mean"] == 8.0
    assert lv["best_baseline"]["method"] == "window" and lv["oracle_ceiling"]["trf_computed"] == 22.0
    adv = {a["budget"]: a for a in lv["advantage"]}
    assert adv[12]["advantage_mean"] == pytest.approx((0.9 * 0.4 + 0.8 * 0.4) / 2) and adv[12]["seeds"] == 2
    assert out["headline_trf_within_2pct"] == 8.0 and not out["target_10x_met"]
    assert list(lv["work_of_best_learned"]) == ["prefill:a", "continuation:b"]


def test_method_configs_and_bad_arguments():
    from ling_jax.config import get_preset

    s = L.SIZES["smoke"]
    model = get_preset("cpu-tiny").model
    cfg = L.method_config(model, "snapkv", 12, s).pruning
    assert (cfg.baseline, cfg.layers, cfg.budget, cfg.compaction_start) == ("snapkv", "0", 12, "this_layer")
    assert L.method_config(model, "oracle@1", 12, s).pruning.layers == "1"
    assert not L.method_config(model, "dense", 12, s).pruning.enabled
    with pytest.raises(SystemExit):
        L.main(["--preset", "smoke", "--methods", "lru"])
