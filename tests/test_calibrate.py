"""Learn-then-Test calibration (ling_jax/calibrate.py): the statistics on synthetic loss tables
(pure NumPy, no compilation) and one CLI round trip on a tiny workdir."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ling_jax import cli
from ling_jax.calibrate import (
    check_arguments, hoeffding_bentkus_p_value, learn_then_test, min_requests, p_values, path_order, request_losses,
    upper_bound,
)
from ling_jax.config import ConfigError

DELTA, EPSILON, DRAWS = 0.02, 0.1, 1000
# Settings along the path (cost falling): true risks rise past delta; index 0 is the reference.
TRUE_RISK = np.array([0.0, 0.002, 0.005, 0.01, 0.015, 0.019, 0.021, 0.025, 0.04, 0.1])
COST = np.arange(len(TRUE_RISK), 0, -1.0)
SLACK = 3 * np.sqrt(EPSILON * (1 - EPSILON) / DRAWS)  # three binomial standard deviations over the draws


def _draws(sample, n: int):
    """Chosen true risks of learn_then_test and of the naive rule "cheapest setting whose mean
    loss is at most delta" over DRAWS loss tables from ``sample(rng, n) -> [K, n]``."""
    rng = np.random.default_rng(0)
    chosen, naive = [], []
    for _ in range(DRAWS):
        losses = sample(rng, n)
        chosen.append(TRUE_RISK[learn_then_test(losses, COST, DELTA, EPSILON).chosen])
        ok = np.flatnonzero(losses.mean(axis=1) <= DELTA)
        naive.append(TRUE_RISK[ok.max()])
    return np.array(chosen), np.array(naive)


@pytest.mark.parametrize("kind", ["binary", "bounded"])
def test_chosen_setting_exceeds_delta_at_most_epsilon_of_the_time(kind):
    """1000 calibration draws from a loss table of known true risk per setting: the chosen
    setting's true risk exceeds delta in at most epsilon (+ binomial slack) of the draws, while
    picking by the sample mean does so far more often (the check can fail), and the procedure
    still goes past the reference."""
    def binary(rng, n):
        return (rng.random((len(TRUE_RISK), n)) < TRUE_RISK[:, None]).astype(float)

    def bounded(rng, n):  # continuous losses in [0, 1] with the same means: Hoeffding-Bentkus
        shape = (len(TRUE_RISK), n)
        return (rng.random(shape) < 2 * TRUE_RISK[:, None]) * rng.random(shape)

    chosen, naive = _draws(binary if kind == "binary" else bounded, 1000)
    violation = np.mean(chosen > DELTA)
    assert violation <= EPSILON + SLACK, violation
    assert np.mean(naive > DELTA) > EPSILON + SLACK  # the naive rule breaks the bound on the same draws
    assert np.mean(chosen > 0) > 0.9  # and the test is not vacuous: a cheaper setting is chosen


def test_returns_the_reference_when_no_setting_passes():
    losses = np.full((4, 500), 0.5)
    losses[0] = 0.0
    sel = learn_then_test(losses, [4, 3, 2, 1], DELTA, EPSILON)
    assert sel.chosen == 0 and not sel.passed[1:].any()
    # the walk stops at the first failure even when a later (cheaper) setting would pass
    losses[2] = 0.0
    assert learn_then_test(losses, [4, 3, 2, 1], DELTA, EPSILON).chosen == 0
    losses[1] = 0.0
    sel = learn_then_test(losses, [4, 3, 2, 1], DELTA, EPSILON)
    assert sel.chosen == 2 and sel.path == (1, 2, 3) and list(sel.passed) == [True, True, True, False]


def test_path_follows_cost_then_ideal_then_grid_order():
    assert path_order([10, 5, 8, 8, 8], [10, 5, 3, 4, 4]) == (3, 4, 2, 1)


def test_min_requests_is_the_fewest_that_can_pass():
    n = min_requests(DELTA, EPSILON)
    assert n == 114  # ceil(log 0.1 / log 0.98)
    assert learn_then_test(np.zeros((2, n)), [2, 1], DELTA, EPSILON).chosen == 1
    assert p_values(np.zeros((1, n - 1)), DELTA)[0] > EPSILON


@pytest.mark.parametrize("delta, epsilon, requests, field", [
    (0.0, 0.1, 500, "--delta"), (1.0, 0.1, 500, "--delta"), (-0.1, 0.1, 500, "--delta"), (float("nan"), 0.1, 500, "--delta"),
    (0.02, 0.0, 500, "--epsilon"), (0.02, 1.5, 500, "--epsilon"), (0.02, 0.1, 113, "--requests 114"),
])
def test_bad_arguments_are_one_line_errors(delta, epsilon, requests, field):
    with pytest.raises(ConfigError) as e:
        check_arguments(delta, epsilon, requests)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_p_values_and_upper_bound():
    # binary losses: the exact binomial tail P(Bin(n, delta) <= k)
    losses = np.zeros((1, 200))
    losses[0, :1] = 1.0
    assert p_values(losses, 0.02)[0] == pytest.approx(0.98 ** 200 + 200 * 0.02 * 0.98 ** 199)
    # decided per setting: a bounded row beside it takes Hoeffding-Bentkus and leaves the binary row's alone
    mixed = np.concatenate([losses, np.full((1, 200), 0.005)])
    assert p_values(mixed, 0.02)[0] == p_values(losses, 0.02)[0]
    assert p_values(mixed, 0.02)[1] == hoeffding_bentkus_p_value(np.array([0.005]), 200, 0.02)[0]
    # Hoeffding-Bentkus is a p-value: 1 at or above delta, falls with the mean loss and with n
    assert hoeffding_bentkus_p_value(np.array([0.03]), 1000, 0.02)[0] == 1.0
    p = hoeffding_bentkus_p_value(np.array([0.015, 0.01, 0.005]), 1000, 0.02)
    assert np.all(np.diff(p) < 0) and hoeffding_bentkus_p_value(np.array([0.01]), 4000, 0.02)[0] < p[1]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        p_values(np.array([[0.5, 1.5]]), 0.02)
    bounded = np.full((1, 1000), 0.01)
    ub = upper_bound(bounded, EPSILON)[0]
    assert 0.01 < ub < 0.02 and p_values(bounded, ub + 1e-6)[0] <= EPSILON < p_values(bounded, ub - 1e-4)[0]


def test_request_losses():
    ref = {"bits": np.array([10.0, 10.0, 10.0, 1.0]), "correct": np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], bool)}
    mine = {"bits": np.array([10.5, 9.0, 30.0, 1.0]), "correct": np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1], [0, 0, 0]], bool)}
    assert request_losses("bpb", ref, mine) == pytest.approx([0.05, 0.0, 1.0, 0.0])
    assert request_losses("accuracy", ref, mine) == pytest.approx([0.5, 0.0, 0.0, 1.0])


def test_calibrate_needs_a_trained_workdir_and_valid_arguments(tmp_path, capsys):
    for argv, needle in ((["--workdir", str(tmp_path)], "no config.json"),
                         (["--workdir", str(tmp_path), "--delta", "1.2"], "--delta must be a number in (0, 1)"),
                         (["--workdir", str(tmp_path), "--requests", "50"], "pass --requests 114 or more")):
        assert cli.main(["calibrate", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.fast_xla  # what is checked is the round trip of the policy file, not XLA's code
def test_calibrate_writes_a_policy_that_eval_and_generate_apply(tmp_path, capsys):
    import dataclasses

    import flax.linen as nn
    import jax

    from ling_jax.config import PruningConfig, get_preset
    from ling_jax.model import Transformer, init_params
    from ling_jax.runs import init_workdir

    config = get_preset("cpu-tiny")
    config = dataclasses.replace(config, model=dataclasses.replace(
        config.model, pruning=PruningConfig(enabled=True, layers="from:1", budget=16, window=4)))
    params = nn.meta.unbox(jax.jit(lambda k: init_params(Transformer(config.model), k))(jax.random.key(0)))
    wd = tmp_path / "wd"
    init_workdir(config, wd, {"params": params})
    # a loose bound so that a handful of requests can pass: 8 >= min_requests(0.5, 0.1)
    argv = ["calibrate", "--workdir", str(wd), "--delta", "0.5", "--epsilon", "0.1", "--requests", "8",
            "--request", "40:6", "--grid", "budget=none,10", "--batch-size", "8", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.splitlines()[-1])
    record = json.loads((wd / "policy.json").read_text())
    assert record["setting"] == summary["setting"] == {"budget": 10} and record["evaluation"] == "request"
    assert [row["setting"] for row in record["path"]] == [{"budget": 10}] and "<- chosen" in out
    assert record["reduction_computed"] > 1.0 and 0.0 < record["risk_estimate"] < record["risk_upper_bound"] < 0.5
    # eval --policy on the calibration requests reproduces the recorded figures
    assert cli.main(["eval", "--workdir", str(wd), "--policy", str(wd / "policy.json")]) == 0
    again = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert again["setting"] == record["setting"] and again["requests"] == 8
    assert again["risk"] == pytest.approx(record["risk_estimate"], abs=1e-6)
    assert again["reduction_computed"] == pytest.approx(record["reduction_computed"], rel=1e-6)
    # generate decodes with the calibrated budget
    assert cli.main(["generate", "--workdir", str(wd), "--prompt", "def f(x):", "--max-new-tokens", "4",
                     "--policy", str(wd / "policy.json")]) == 0
    assert json.loads(capsys.readouterr().err.splitlines()[-1])["new_tokens"] == 4
    # a policy of another model or checkpoint is refused in one line
    record["step"] = 7
    (wd / "stale.json").write_text(json.dumps(record))
    assert cli.main(["eval", "--workdir", str(wd), "--policy", str(wd / "stale.json")]) == 2
    err = capsys.readouterr().err
    assert "calibrated at step 7" in err and len(err.strip().splitlines()) == 1
