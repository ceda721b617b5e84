"""Config validation, presets and overrides: bad input fails with a message naming the field."""

import dataclasses
import functools

import pytest

from ling_jax.cli import build_config, make_parser
from ling_jax.config import (
    PRESETS,
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    get_preset,
    layer_list,
    to_dict,
)


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'.*cpu-tiny"):
        get_preset("nope")


def test_unknown_override_key_names_key_and_allowed():
    with pytest.raises(ConfigError, match=r"model.d_modle.*allowed.*d_model"):
        apply_overrides(get_preset("cpu-tiny"), {"model.d_modle": "64"})
    with pytest.raises(ConfigError, match=r"unknown override key 'optim.lr'"):
        apply_overrides(get_preset("cpu-tiny"), ["optim.lr=1"])


def test_override_parses_types_and_revalidates():
    cfg = apply_overrides(get_preset("cpu-tiny"), ["model.d_model=96", "train.learning_rate=1e-3", "model.tie_embeddings=true"])
    assert cfg.model.d_model == 96 and cfg.train.learning_rate == 1e-3 and cfg.model.tie_embeddings is True
    with pytest.raises(ConfigError, match=r"cannot parse 'abc' as int"):
        apply_overrides(cfg, {"model.d_model": "abc"})


def test_override_values_are_typed_in_every_form():
    """One mechanism for the CLI's strings and the experiment grids' Python values."""
    base = get_preset("cpu-tiny")
    forms = (["--model.d_model", "96", "--train.learning_rate=1e-3", "model.tie_embeddings=true"],
             {"model.d_model": 96, "train.learning_rate": 1e-3, "model.tie_embeddings": True})
    assert apply_overrides(base, forms[0]) == apply_overrides(base, forms[1])
    assert apply_overrides(base, {"train.learning_rate": 1}).train.learning_rate == 1.0  # an int is a float
    for key, value, kind in (("model.d_model", 96.0, "int"), ("model.d_model", True, "int"),
                             ("model.tie_embeddings", 1, "bool"), ("data.task", 3, "str")):
        with pytest.raises(ConfigError, match=rf"override {key}: expected {kind}, got {value!r}"):
            apply_overrides(base, {key: value})
    with pytest.raises(ConfigError, match=r"model.tie_embeddings: cannot parse 'maybe' as bool \(true/false"):
        apply_overrides(base, ["model.tie_embeddings=maybe"])
    with pytest.raises(ConfigError, match=r"override 'model.pruning' names a config group.*model.pruning.<field>"):
        apply_overrides(base, {"model.pruning": True})
    with pytest.raises(ConfigError, match=r"Config has no field 'modle'; allowed: \['data', 'mesh', 'model', 'train'\]"):
        apply_overrides(base, {"modle.d_model": 96})
    with pytest.raises(ConfigError, match=r"PruningConfig.scorer must be one of \['linear', 'lowrank'\], got 'mlp'"):
        apply_overrides(base, {"model.pruning.scorer": "mlp"})
    with pytest.raises(ConfigError, match=r"unexpected argument 'd_model'"):
        apply_overrides(base, ["d_model"])


COMBINED = [  # each valid only together: applied one at a time, in this order, one of them fails
    {"model.depth.mod_enabled": "true", "model.depth.mod_layers": "3", "model.num_layers": "4"},
    {"model.pruning.enabled": "true", "model.pruning.baseline": "random", "model.pruning.mode": "hard",
     "model.pruning.inference_rule": "budget"},
    {"model.moe.enabled": "true", "model.moe.top_groups": "2", "model.moe.num_groups": "4"},
    {"train.seq_len": "256", "model.max_seq_len": "256"},
]


@pytest.mark.parametrize("overrides", COMBINED, ids=["layers", "pruning_baseline", "moe_groups", "seq_len"])
def test_overrides_valid_only_together_are_applied_together(overrides):
    base = get_preset("cpu-tiny")
    with pytest.raises(ConfigError):  # what validating after each override did
        functools.reduce(lambda cfg, item: apply_overrides(cfg, dict([item])), overrides.items(), base)
    cfg = apply_overrides(base, overrides)
    assert cfg == apply_overrides(base, dict(reversed(list(overrides.items()))))  # order does not matter
    assert cfg == apply_overrides(base, [f"{k}={v}" for k, v in overrides.items()])
    for key, value in overrides.items():
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        assert str(obj).lower() == value.lower(), key
    assert cfg.model.depth.mod_layers != "3" or cfg.model.mod_layers == (3,)


def test_combined_overrides_still_fail_clearly():
    base = get_preset("cpu-tiny")
    # Still invalid together: the message names the field and the allowed values.
    with pytest.raises(ConfigError, match=r"mod_layers selects layers \[5\] that do not exist \(model has 4 layers"):
        apply_overrides(base, {"model.depth.mod_enabled": "true", "model.depth.mod_layers": "5", "model.num_layers": "4"})
    with pytest.raises(ConfigError, match=r"PruningConfig.mode must be one of \['soft', 'hard'\], got 'firm'"):
        apply_overrides(base, {"model.pruning.mode": "firm", "model.num_layers": "4"})
    # Unknown keys and unparsable values fail before anything is built, whatever else is given.
    with pytest.raises(ConfigError, match=r"model.moe.num_expert.*allowed.*num_experts"):
        apply_overrides(base, {"model.num_layers": "0", "model.moe.num_expert": "4"})
    with pytest.raises(ConfigError, match=r"override model.moe.top_k: cannot parse 'two' as int"):
        apply_overrides(base, {"model.num_layers": "0", "model.moe.top_k": "two"})
    with pytest.raises(ConfigError, match=r"override 'model.moe' names a config group"):
        apply_overrides(base, {"model.moe": "true"})


@pytest.mark.parametrize("field", ["d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "vocab_size", "max_seq_len"])
@pytest.mark.parametrize("value", [0, -4])
def test_non_positive_sizes(field, value):
    with pytest.raises(ConfigError, match=rf"ModelConfig.{field} must be a positive integer"):
        ModelConfig(**{field: value})


def test_non_positive_train_sizes():
    with pytest.raises(ConfigError, match=r"TrainConfig.batch_size must be a positive integer"):
        TrainConfig(batch_size=0)


def test_heads_divisible_by_kv_heads():
    with pytest.raises(ConfigError, match=r"num_heads \(6\) must be divisible by num_kv_heads \(4\)"):
        ModelConfig(num_heads=6, num_kv_heads=4, d_model=96)


def test_d_model_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"d_model \(100\) must be divisible by num_heads \(8\)"):
        ModelConfig(d_model=100, num_heads=8, num_kv_heads=2)


def test_seq_len_larger_than_model_supports():
    with pytest.raises(ConfigError, match=r"seq_len \(512\) is larger than the model supports.*max_seq_len = 128"):
        apply_overrides(get_preset("cpu-tiny"), {"train.seq_len": "512"})


def test_bad_enum_lists_allowed():
    with pytest.raises(ConfigError, match=r"attention_impl must be one of \['reference', 'xla', 'pallas', 'auto'\]"):
        ModelConfig(attention_impl="cuda")


def test_layer_list_rejects_missing_layers():
    assert layer_list("every:2:1", 6, field_name="x") == (1, 3, 5)
    assert layer_list("from:2", 4, field_name="x") == (2, 3)
    with pytest.raises(ConfigError, match=r"selects layers \[7\] that do not exist"):
        layer_list("1,7", 4, field_name="x")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dict(name):
    cfg = get_preset(name)
    assert from_dict(to_dict(cfg)) == cfg


def test_cli_overrides_and_flags():
    parser = make_parser()
    args, extra = parser.parse_known_args(
        ["train", "--preset", "cpu-tiny", "--workdir", "/tmp/x", "--steps", "7", "--task", "mqar", "--model.d_model", "32", "--train.seed=3"]
    )
    cfg = build_config(args, extra)
    assert (cfg.train.steps, cfg.data.task, cfg.model.d_model, cfg.train.seed) == (7, "mqar", 32, 3)
    args, extra = parser.parse_known_args(["train", "--preset", "cpu-tiny", "--workdir", "/tmp/x", "--bogus", "1"])
    with pytest.raises(ConfigError, match=r"unknown option --bogus"):
        build_config(args, extra)


def test_configs_are_frozen():
    cfg = get_preset("cpu-tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.d_model = 3  # type: ignore[misc]
