"""Resuming a workdir: every field that changes training is compared with config.json, and a
change is refused naming the field (issue 17, acceptance 3). The workdir holds only the
config.json a first run records, so the refusal is checked without training anything."""

from __future__ import annotations

import pytest

from ling_jax.config import ConfigError, apply_overrides, get_preset
from ling_jax.train import train
from ling_jax.workdir import RESUME_MAY_CHANGE, check_compatible, read_record, training_changes, write_record

MECHANISMS = {  # every mechanism on, so each group's fields are live
    "model.pruning.enabled": True, "model.moe.enabled": True, "model.moe.num_experts": 4,
    "model.depth.mod_enabled": True, "model.depth.exit_enabled": True, "model.depth.exit_train_freeze": 0.5,
    "train.steps": 2, "train.eval_batches": 1,
}

CHANGES = {  # field group -> training-relevant changes (each must be refused, naming the field)
    "model": {"model.d_model": 32, "model.rope_base": 500.0, "model.qk_norm": "head", "model.dtype": "bfloat16"},
    "pruning": {"model.pruning.target_keep_ratio": 0.25, "model.pruning.anneal_steps": 10,
                "model.pruning.scorer": "lowrank"},
    "moe": {"model.moe.top_k": 1, "model.moe.load_balance_weight": 0.1, "model.moe.jitter": 0.1},
    "depth": {"model.depth.mod_weight": "sigmoid", "model.depth.mod_capacity": 0.25,
              "model.depth.exit_train_freeze": 0.25, "model.depth.exit_loss_weight": 0.5},
    "train": {"train.learning_rate": 1e-3, "train.seed": 1, "train.batch_size": 4, "train.weight_decay": 0.0},
    "data": {"data.task": "mqar", "data.validation_fraction": 0.1, "data.path": "/nonexistent"},
}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(config, workdir) of a workdir whose config.json records ``config``."""
    config = apply_overrides(get_preset("cpu-tiny"), MECHANISMS)
    workdir = tmp_path_factory.mktemp("wd")
    write_record(workdir, config, schedule_steps=config.train.steps)
    return config, workdir


@pytest.mark.parametrize("group", list(CHANGES))
def test_resume_with_a_training_field_changed_is_refused(recorded, group):
    config, workdir = recorded
    for field, value in CHANGES[group].items():
        changed = apply_overrides(config, {field: value})
        with pytest.raises(ConfigError, match=rf"trained with other settings \({field}: "):
            check_compatible(workdir, read_record(workdir), changed)
    field, value = next(iter(CHANGES[group].items()))
    with pytest.raises(ConfigError, match=rf"{field}: "):  # through the trainer: refused before anything runs
        train(apply_overrides(config, {field: value}), workdir, progress=False, log_fn=lambda s: None)


def test_fields_that_do_not_change_training_may_change(recorded):
    config, workdir = recorded
    allowed = {"train.steps": 5, "train.log_every": 1, "train.eval_every": 1, "train.eval_batches": 2,
               "train.checkpoint_every": 1, "train.keep_checkpoints": 3, "model.attention_impl": "reference",
               "model.moe.dispatch": "dense", "model.remat": "block", "model.pruning.threshold": 0.3,
               "model.depth.exit_threshold": 0.5, "mesh.data": 1}
    changed = apply_overrides(config, allowed)
    assert training_changes(config, changed) == []
    check_compatible(workdir, read_record(workdir), changed)
    assert all(any(f == a or f.startswith(a + ".") for a in RESUME_MAY_CHANGE) for f in allowed)


def test_every_changed_field_is_named(recorded):
    config, _ = recorded
    changed = apply_overrides(config, {"model.depth.mod_weight": "sigmoid", "train.seed": 3, "train.steps": 9})
    assert training_changes(config, changed) == ["model.depth.mod_weight: 'straight_through' -> 'sigmoid'",
                                                 "train.seed: 0 -> 3"]
