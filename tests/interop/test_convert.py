"""``ling-jax convert`` end to end on the tiny Llama fixture (with its tokenizer.json): convert
with learned pruning switched on, then eval, train (the retrofit: fine-tuning from the imported
weights) and sweep on the workdir; bad inputs exit with a clear error."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax
import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from ling_jax.cli import main  # noqa: E402
from ling_jax.interop.hf import load_hf  # noqa: E402

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "llama"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    corpus = root / "corpus.txt"
    corpus.write_text(pathlib.Path(json.__file__).read_text() * 2)
    workdir = root / "w"
    rc = main(["convert", "--hf", str(FIXTURE), "--workdir", str(workdir), "--data.path", str(corpus),
               "--train.seq_len", "32", "--train.batch_size", "8", "--train.eval_batches", "1", "--train.steps", "2",
               "--train.log_every", "1", "--model.pruning.enabled", "true", "--model.pruning.budget", "16",
               "--model.pruning.window", "4"])
    assert rc == 0
    return workdir


def test_convert_writes_a_workdir_with_the_imported_weights(converted, capsys):
    from ling_jax.train import load_trained

    config, _, state = load_trained(converted)
    assert int(state.step) == 0 and config.preset == "hf:llama" and config.model.pruning.enabled
    assert config.data.tokenizer == str((converted / "tokenizer.json").resolve())
    _, variables, _ = load_hf(FIXTURE)
    imported = jax.tree_util.tree_leaves_with_path(variables["params"])
    for path, value in imported:
        got = state.params
        for k in path:
            got = got[k.key]
        np.testing.assert_array_equal(np.asarray(got), value)
    assert "pruner" in state.params["block_1"]  # the new scorer, freshly initialised


@pytest.mark.fast_xla
def test_eval_train_and_sweep_on_the_converted_workdir(converted, capsys):
    assert main(["eval", "--workdir", str(converted)]) == 0
    before = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert before["step"] == 0 and math.isfinite(before["bpb"]) and before["bpb"] < before["loss"] / math.log(2)
    assert main(["train", "--workdir", str(converted), "--no-progress", "--skip-sweep"]) == 0
    out = capsys.readouterr().out
    assert '"step": 2' in out
    lines = [json.loads(x) for x in (converted / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2]
    assert main(["sweep", "--workdir", str(converted), "--no-progress", "--thresholds", "0.5", "--budgets", "16",
                 "--baselines", "window"]) == 0
    (written,) = converted.glob("pruning_sweep*.json")  # named after its non-default settings
    rows = json.loads(written.read_text())["rows"]
    assert {r["rule"] for r in rows} >= {"keep_all", "threshold"} and all(math.isfinite(r["quality"]) for r in rows)


def test_convert_bad_inputs(tmp_path, converted, capsys):
    assert main(["convert", "--hf", str(tmp_path), "--workdir", str(tmp_path / "w")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["convert", "--hf", str(FIXTURE), "--workdir", str(converted)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["convert", "--hf", str(FIXTURE), "--workdir", str(tmp_path / "x"), "--model.d_model", "64"]) == 2
    assert "has shape" in capsys.readouterr().err
    assert main(["train", "--workdir", str(tmp_path / "empty")]) == 2
    assert "--preset is required" in capsys.readouterr().err


def test_convert_damaged_checkpoint_one_line_errors(tmp_path, capsys):
    """A config.json without a required size and a truncated .safetensors file: exit 2 with one
    line naming the file and what is wrong in it, no traceback."""
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "model.safetensors"):
        (hf / name).write_bytes((FIXTURE / name).read_bytes())
    good = json.loads((FIXTURE / "config.json").read_text())

    def convert_error() -> str:
        assert main(["convert", "--hf", str(hf), "--workdir", str(tmp_path / "w")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ling-jax: error: ") and err.count("\n") == 1, err
        assert not (tmp_path / "w").exists()
        return err

    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
        (hf / "config.json").write_text(json.dumps({k: v for k, v in good.items() if k != key}))
        err = convert_error()
        assert str(hf / "config.json") in err and f"lacks the key '{key}'" in err
    for key, value in (("hidden_size", None), ("num_attention_heads", 0), ("num_hidden_layers", "2")):
        (hf / "config.json").write_text(json.dumps({**good, key: value}))
        assert f"{key} must be a positive integer, got {value!r}" in convert_error()
    (hf / "config.json").write_text(json.dumps({**good, "intermediate_size": None}))
    assert "has a value this conversion cannot use" in convert_error()
    (hf / "config.json").write_text(json.dumps(good))
    data = (FIXTURE / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = convert_error()
    assert str(hf / "model.safetensors") in err and "not a readable safetensors file" in err


def test_export_after_fine_tuning_round_trips(converted, tmp_path, capsys):
    from ling_jax.train import load_trained

    assert main(["export", "--workdir", str(converted), "--hf", str(tmp_path / "hf")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["dropped"] and all("pruner" in name for name in out["dropped"])  # the scorer has no HF tensor
    cfg, variables, _ = load_hf(tmp_path / "hf")
    config, _, state = load_trained(converted)
    assert cfg == dataclasses.replace(config.model, pruning=type(config.model.pruning)())
    for path, value in jax.tree_util.tree_leaves_with_path(variables["params"]):
        got = state.params
        for k in path:
            got = got[k.key]
        np.testing.assert_array_equal(value, np.asarray(got))


def test_generate_from_the_converted_workdir(converted, capsys):
    """With the trained inference settings by default: soft pruning masks in training, hard ones
    under the config's rule, threshold and budget in decoding."""
    assert main(["generate", "--workdir", str(converted), "--prompt", "def f(x):", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def f(x):")
    info = json.loads(captured.err.strip().splitlines()[-1])
    assert info["new_tokens"] == 6 and info["kv_cache_bytes"] > 0
    assert info["pruning"] == {"inference_rule": "threshold", "threshold": 0.5, "budget": 16}
    for count in ("-1", "0"):
        assert main(["generate", "--workdir", str(converted), "--prompt", "x", "--max-new-tokens", count]) == 2
        assert capsys.readouterr().err == f"ling-jax: error: --max-new-tokens must be >= 1, got {count}\n"
    assert main(["generate", "--workdir", str(converted), "--prompt", "x", "--exit-threshold", "0.5"]) == 2
    assert "needs a model with early exit" in capsys.readouterr().err
    assert main(["generate", "--workdir", str(converted), "--prompt", "x", "--max-new-tokens", "100"]) == 2
    assert "exceeds the model's max_seq_len" in capsys.readouterr().err
