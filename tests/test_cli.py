"""``ling-jax`` argument parsing: help that lists presets and explains overrides, no abbreviated
options, ``info`` in human units with the mesh its memory figure is for."""

from __future__ import annotations

import argparse
import json

import pytest

from ling_jax import cli
from ling_jax.config import PRESETS, ConfigError, get_preset, parse_overrides


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_train_help_lists_presets_and_explains_overrides(capsys):
    text = _help(capsys, "train")
    for name in PRESETS:
        assert f"\n  {name} " in text, name
    for option in ("--preset PRESET", "--workdir DIR", "--steps N", "--force"):
        line = next(line for line in text.splitlines() if line.strip().startswith(option))
        assert len(line.strip()) > len(option) + 5, f"{option} has no help text"
    assert "--section.field VALUE" in text and "--model.d_model 256" in text
    assert "``" not in text and "``" not in _help(capsys)


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_no_parser_accepts_abbreviations(tmp_path, capsys):
    parsers = list(_parsers(cli.make_parser()))
    assert len(parsers) >= 5 and all(not p.allow_abbrev for p in parsers)
    # --step is not taken as --steps: it is an unknown option, and nothing is trained
    workdir = tmp_path / "wd"
    assert cli.main(["train", "--preset", "cpu-tiny", "--workdir", str(workdir), "--step", "10"]) == 2
    assert "--step" in capsys.readouterr().err and not workdir.exists()
    with pytest.raises(ConfigError, match="--step"):
        parse_overrides(["--step", "10"])
    with pytest.raises(SystemExit):  # --work is not --workdir
        cli.main(["train", "--preset", "cpu-tiny", "--work", str(workdir)])


def test_info_prints_human_units_and_the_mesh(capsys):
    assert cli.main(["info", "--preset", "cpu-tiny", "--mesh", "data=2,fsdp=-1", "--memory"]) == 0
    text = capsys.readouterr().out
    assert "on mesh data=2,fsdp=4,tensor=1,expert=1 (8 devices)" in text  # conftest fakes 8 devices
    assert "MiB" in text and "peak" in text and "parameters" in text
    assert cli.main(["info", "--preset", "cpu-tiny", "--mesh", "data=2,fsdp=-1", "--memory", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["devices"] == 8 and isinstance(info["peak_bytes_per_device"], int)


@pytest.mark.fast_xla  # what is checked is the report, not XLA's code
def test_eval_request_prefills_prunes_and_continues(tmp_path, capsys):
    import dataclasses

    import flax.linen as nn
    import jax

    from ling_jax.model import Transformer, init_params
    from ling_jax.runs import init_workdir

    config = dataclasses.replace(get_preset("cpu-tiny"), preset="cpu-tiny")
    params = nn.meta.unbox(jax.jit(lambda k: init_params(Transformer(config.model), k))(jax.random.key(0)))
    init_workdir(config, tmp_path / "wd", {"params": params})
    argv = ["eval", "--workdir", str(tmp_path / "wd"), "--request", "40:6", "--method", "window", "--budget", "12",
            "--requests", "2"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (out["prompt"], out["continuation"], out["method"], out["budget"]) == (40, 6, "window", 12)
    assert out["token_reduction_computed"] > 1.0 and out["kv_fraction"] < 1.0 and out["bpb"] > 0
    assert cli.main([*argv[:3], "--request", "40"]) != 0
    assert "PROMPT:CONTINUATION" in capsys.readouterr().err
    assert cli.main([*argv[:3], "--request", "40:6", "--method", "learned"]) != 0  # no scorer in this model
    assert "model.pruning.enabled=true" in capsys.readouterr().err
    # cpu-tiny trains at 64 tokens (its model takes 128): a longer request is refused, or warned about
    past = [*argv[:3], "--request", "60:8", "--method", "window", "--budget", "12", "--requests", "1"]
    assert cli.main(past) == 2
    err = capsys.readouterr().err
    assert "68 tokens run past the 64 the model was trained at" in err and "--past-trained-length" in err
    assert len(err.strip().splitlines()) == 1
    assert cli.main([*past, "--past-trained-length"]) == 0
    assert "warning: --request 60:8: 68 tokens run past the 64" in capsys.readouterr().err


def test_two_spellings_of_one_field_must_agree(tmp_path, capsys):
    workdir = tmp_path / "wd"
    for argv, field in ((["--steps", "3", "--train.steps", "7"], "train.steps"),
                        (["--checkpoint-every", "2", "--train.checkpoint_every=5"], "train.checkpoint_every"),
                        (["--task", "mqar", "--data.task", "needle"], "data.task"),
                        (["--mesh", "data=2", "--mesh.data", "4"], "mesh.data")):
        assert cli.main(["train", "--preset", "cpu-tiny", "--workdir", str(workdir), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert field in err and len(err.strip().splitlines()) == 1, err
        assert not workdir.exists()
    args = cli.make_parser().parse_known_args([
        "train", "--preset", "cpu-tiny", "--workdir", str(workdir), "--steps", "3", "--train.steps", "3"])
    assert cli.build_config(*args).train.steps == 3  # agreeing spellings are fine


def test_generate_help_states_the_defaults(capsys):
    text = _help(capsys, "generate")
    for option, default in (("--max-new-tokens", "(default 32)"), ("--budget", "default: the trained"),
                            ("--exit-threshold", "default: the trained")):
        line = " ".join(text.split(f"  {option} ")[1].split("\n  --")[0].split())
        assert default in line, option
    main_job = get_preset("cpu-small-pruned").model.pruning  # the README's first command trains it
    assert (f"{main_job.inference_rule} rule, keep a token if sigmoid(score) >= {main_job.threshold:g}, at most "
            f"{main_job.budget} KV-cache slots per pruned layer") in " ".join(text.split())
