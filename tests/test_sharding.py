"""Sharding on 8 fake CPU devices: sharded == single-device train steps for several meshes,
rule coverage and golden partition specs, resharding checkpoints, clear errors.

Every jitted step is compiled once per mesh (module-scoped cache) on a tiny model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import flax.linen as nn

from ling_jax import sharding as S
from ling_jax.config import ConfigError, apply_overrides, get_preset
from ling_jax.layers.moe import MoE
from ling_jax.layers.moe_dispatch import capacity_keep
from ling_jax.layers.moe_parallel import expert_parallel_ffn, reference_ffn
from ling_jax.model import Transformer
from ling_jax.testing import assert_close
from ling_jax.memory import memory_report
from ling_jax.checkpoints import save_checkpoint
from ling_jax.train import checkpoint_manager, init_state, jit_train_step, make_train_step, restore_latest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # tests compile many tiny programs: skip LLVM work
MECHANISMS = {  # the token-efficiency mechanisms switched on in the sharded-equivalence model
    "model.pruning.enabled": "true",  # soft token pruning on layer 1
    "model.moe.enabled": "true", "model.moe.num_experts": "4", "model.moe.top_k": "2", "model.moe.layers": "0",
    "model.moe.capacity_factor": "2.0",  # all_to_all capacity dispatch; 2.0 = X / k: nothing is dropped
    "model.depth.mod_enabled": "true", "model.depth.mod_capacity": "0.5", "model.depth.mod_layers": "1",
    "model.depth.predictor_dim": "16",
}
TINY = {"model.d_model": "32", "model.num_heads": "4", "model.num_kv_heads": "2", "model.mlp_dim": "64",
        "model.num_layers": "2", "train.seq_len": "16", "train.batch_size": "8", "train.warmup_steps": "0"}
LAYOUTS = {  # (data, fsdp, tensor, expert)
    "data": (8, 1, 1, 1),
    "data_fsdp": (2, 4, 1, 1),
    "fsdp_tensor": (1, 4, 2, 1),
    "data_expert": (4, 1, 1, 2),
    "fsdp_tensor_expert": (1, 2, 2, 2),
}


def _config(mesh=(1, 1, 1, 1), **extra):
    overrides = {**TINY, **MECHANISMS, **extra}
    overrides.update({f"mesh.{a}": str(n) for a, n in zip(S.MESH_AXES, mesh)})
    return apply_overrides(get_preset("cpu-tiny"), overrides)


def _batch(config, step=0):
    rng = np.random.default_rng(step)
    b, t = config.train.batch_size, config.train.seq_len
    return {"inputs": rng.integers(0, 256, (b, t), dtype=np.int32), "targets": rng.integers(0, 256, (b, t), dtype=np.int32),
            "loss_mask": (rng.random((b, t)) < 0.9).astype(np.float32), "oracle_mask": np.zeros((b, t), bool)}


def _adam_mu(opt_state):
    """The first Adam moment: (1 - b1) * clipped gradient after the first step."""
    found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(x, "mu")]
    assert len(found) == 1
    return found[0].mu


def _compile(jitted, *args):
    return jitted.lower(*args).compile(FAST_COMPILE)


def _init(config, model):
    """The single-device initial state (jitted: an eager init of this model costs ~15 s of CPU)."""
    return jax.jit(lambda key: init_state(config, model, key))(jax.random.key(0))


@pytest.fixture(scope="module")
def reference():
    """Single-device state, its compiled step and the result of one step."""
    config = _config()
    model = Transformer(config.model)
    state = _init(config, model)
    batch = _batch(config)
    step = _compile(jax.jit(make_train_step(config, model)), state, batch)
    new_state, metrics = step(state, batch)
    return dict(config=config, model=model, state=state, step=step, after=(new_state, metrics))


_STEPS = {}


def _sharded_step(layout, state):
    """(config, plan, compiled step) for a mesh layout, compiled once per module."""
    if layout not in _STEPS:
        config = _config(layout)
        model = Transformer(config.model)
        plan = S.plan(config, model)
        args = (jax.device_put(state, plan.state), S.global_batch(_batch(config), plan.batch, 8))
        _STEPS[layout] = (config, plan, _compile(jit_train_step(config, model, plan, donate=False), *args))
    return _STEPS[layout]


def _one_sharded_step(layout, state):
    """One train step of `state` (single-device arrays) on a mesh: (new state, metrics, compiled)."""
    config, plan, step = _sharded_step(layout, state)
    new_state, metrics = step(jax.device_put(state, plan.state), S.global_batch(_batch(config), plan.batch, 8))
    return new_state, metrics, step


def _assert_same_step(got_metrics, got_mu, reference):
    ref_state, ref_metrics = reference["after"]
    keys = ("loss", "ce", "grad_norm")
    assert_close({k: got_metrics[k] for k in keys}, {k: ref_metrics[k] for k in keys})
    assert_close(got_mu, _adam_mu(ref_state.opt_state), kind="grad")  # = 0.1 * clipped gradients


# ----------------------------------------------------------------------------- acceptance 1


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_sharded_train_step_equals_single_device(reference, name):
    """Loss, metrics and gradients of one step with pruning, MoE and MoD on, per mesh layout."""
    new_state, metrics, step = _one_sharded_step(LAYOUTS[name], reference["state"])
    _assert_same_step(metrics, _adam_mu(new_state.opt_state), reference)
    assert_close(new_state.params, reference["after"][0].params, kind="grad")
    plan = _STEPS[LAYOUTS[name]][1]  # the state stays on its shardings
    assert all(x.sharding == s for x, s in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(plan.state)))
    if LAYOUTS[name][3] > 1:  # expert parallel: tokens travel by all_to_all
        assert "all-to-all" in step.as_text()


def test_sharded_init_equals_single_device_init(reference):
    """``init_sharded_state`` computes every shard in place; values equal the plain init."""
    config, plan, _ = _sharded_step(LAYOUTS["fsdp_tensor"], reference["state"])
    state = S.init_sharded_state(config, reference["model"], jax.random.key(0), plan.state)
    assert_close(state.params, reference["state"].params)
    wq = state.params["block_0"]["attn"]["wq"]
    assert wq.sharding.spec == P("fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (32 // 4, 4 // 2, 8)


def _host_main(process_id, port, workdir, data_path):
    """Subprocess body: one of two hosts (8 fake devices each) running `train` on a 16-device mesh."""
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    from ling_jax.train import train

    assert jax.device_count() == 16 and jax.local_device_count() == 8
    print(json.dumps(train(_four_axes_config(data_path), workdir, progress=False)))


def _four_axes_config(data_path):
    return _config((2, 2, 2, 2), **{"train.steps": "2", "train.checkpoint_every": "1", "train.log_every": "1",
                                    "train.eval_batches": "1", "data.path": str(data_path)})


def _random_text(path):
    """Random printable bytes: real text has near-tied router scores (runs of spaces) that rounding
    differences between sharded and unsharded programs can flip in top-k routing."""
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:()[]\n", np.uint8)
    path.write_bytes(alphabet[np.random.default_rng(0).integers(0, len(alphabet), 20_000)].tobytes())
    return path


def test_all_four_axes_on_two_hosts(reference, tmp_path):
    """All four axes > 1 need 16 devices: two processes x 8 fake devices (gloo collectives) run
    ``train`` on a (2, 2, 2, 2) mesh. Each host reads its own rows and only host 0
    writes metrics; the first step's loss, gradient norm and gradients (Adam's first moment in
    the step-1 checkpoint, restored here on one device) equal the single-device step on the same
    batch."""
    import socket

    from ling_jax.pipeline import build_data

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",  # 8 fake devices per host; fast compiles as in FAST_COMPILE
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    workdir, data_path = tmp_path / "run", _random_text(tmp_path / "data.txt")
    code = (f"import sys, tests.test_sharding as t; "
            f"t._host_main(int(sys.argv[1]), {port}, {str(workdir)!r}, {str(data_path)!r})")
    hosts = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [h.communicate(timeout=300) for h in hosts]
    assert all(h.returncode == 0 for h in hosts), outs[0][1][-3000:] + outs[1][1][-3000:]
    assert json.loads(outs[0][0].splitlines()[-1]) == json.loads(outs[1][0].splitlines()[-1])
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2]  # two train records and one eval record: one writer

    config = _four_axes_config(data_path)
    batch = build_data(config).train_batch(0).as_dict()  # the global batch the two hosts split
    want_state, want = reference["step"](reference["state"], batch)
    assert_close({k: records[0][k] for k in ("loss", "ce", "grad_norm")},
                 {k: float(want[k]) for k in ("loss", "ce", "grad_norm")}, dtype=jnp.float32)
    manager = checkpoint_manager(workdir, config)
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, reference["state"])
    restored = manager.restore(1, args=ocp.args.StandardRestore(target))  # after the first step
    manager.close()
    assert_close(_adam_mu(restored.opt_state), _adam_mu(want_state.opt_state), kind="grad")


# ----------------------------------------------------------------------------- acceptance 3


def _moe_inputs(config, seed=0):
    b, t, e = config.train.batch_size, config.train.seq_len, config.model.d_model
    kx, kv, kc = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (b, t, e))
    valid = jax.random.uniform(kv, (b, t)) < 0.9  # some padding tokens
    return x, valid, jax.random.normal(kc, (b, t, e))


@pytest.mark.parametrize("capacity_factor", ["2.0", "0.0"])
def test_expert_parallel_moe_layer_equals_single_device(capacity_factor):
    """The MoE layer on a (1, 2, 2, 2) mesh (experts over `expert`, hidden units over `tensor`)
    equals the single-device layer, forward and gradients; capacity dispatch uses all_to_all,
    dropless dispatch all_gather + reduce_scatter."""
    config = _config((1, 2, 2, 2), **{"model.moe.capacity_factor": capacity_factor})
    mesh = S.make_mesh(config)
    layer = MoE(config.model)
    x, valid, cotangent = _moe_inputs(config)
    boxed = jax.jit(layer.init)(jax.random.key(1), x, valid)["params"]
    params = nn.meta.unbox(boxed)

    def loss(params, x):
        y = layer.apply({"params": params}, x, valid)
        return jnp.sum(y * cotangent), y

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, want), want_grads = jax.jit(grad_fn)(params, x)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, S.LOGICAL_RULES)
    assert shardings["w_gate"].spec == P("expert", "fsdp", "tensor")
    tokens = NamedSharding(mesh, S.to_mesh_spec(P("batch", "length", "embed")))
    sharded = jax.jit(S.within(mesh, grad_fn), in_shardings=(shardings, tokens))
    compiled = _compile(sharded, params, x)
    (_, got), got_grads = compiled(params, x)
    assert_close(got, want)
    assert_close(got_grads, want_grads, kind="grad")
    text = compiled.as_text()
    if float(capacity_factor) > 0:
        assert "all-to-all" in text
    else:
        assert "all-gather" in text and "reduce-scatter" in text


def test_capacity_dispatch_drops_per_device():
    """With a small capacity each device drops its own overflow: equals the reference applied to
    each device's tokens with the single-device capacity policy."""
    config = _config((4, 1, 1, 2))
    mesh = S.make_mesh(config)
    x, valid, _ = _moe_inputs(config, seed=3)
    b, t, e = x.shape
    num_experts, k, f = 4, 2, 16
    kw = jax.random.split(jax.random.key(4), 4)
    w_gate, w_up = (jax.random.normal(kk, (num_experts, e, f)) * e ** -0.5 for kk in kw[:2])
    w_down = jax.random.normal(kw[2], (num_experts, f, e)) * f ** -0.5
    gates, ids = jax.lax.top_k(jax.nn.softmax(jax.random.normal(kw[3], (b, t, num_experts))), k)
    ids = jnp.where(valid[..., None], ids, -1)
    cf = 0.5  # 16 tokens per device * 2 / 4 experts * 0.5 = 4 slots per expert: many drops
    fn = lambda *a: expert_parallel_ffn(*a, capacity_factor=cf)  # noqa: E731
    tokens, whole = NamedSharding(mesh, S.to_mesh_spec(P("batch"))), NamedSharding(mesh, P())
    jitted = jax.jit(S.within(mesh, fn), in_shardings=(tokens,) * 3 + (whole,) * 3)
    args = (x, ids, gates, w_gate, w_up, w_down)
    got = _compile(jitted, *args)(*args)
    # 8 batch shards (data 4 x expert 2): each device holds one row of 16 tokens, 4 slots per expert.
    per_device_keep = jax.jit(jax.vmap(lambda i: capacity_keep(i, i >= 0, num_experts, 4)))  # [B, T, K]
    want = reference_ffn(x, jnp.where(per_device_keep(ids), ids, -1), gates, w_gate, w_up, w_down)
    assert_close(got, want)
    undropped = reference_ffn(x, ids, gates, w_gate, w_up, w_down)
    assert float(jnp.mean(jnp.abs(got - undropped))) > 1e-3  # drops happened


# ----------------------------------------------------------------------------- acceptance 2


def test_every_logical_name_has_a_rule():
    specs = S.logical_state_specs(_config())
    assert S.unruled_names(specs) == set()
    names = {n for spec in jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
             for n in spec if n is not None}
    assert names <= S.RULED_NAMES


def test_unruled_name_is_refused():
    specs = {"w": P("embed", "widgets")}
    assert S.unruled_names(specs) == {"widgets"}


def _golden_tables():
    base = get_preset("tpu-base")
    return {"tpu-base": base, "tpu-base+mechanisms": apply_overrides(base, MECHANISMS)}


def test_golden_partition_specs():
    tables = {}
    for name, config in _golden_tables().items():
        tables[name] = {"params": S.partition_table(config), "replicated": S.replicated_params(config)}
    golden = {"rules": [[k, list(v) if isinstance(v, tuple) else v] for k, v in S.LOGICAL_RULES], "tables": tables}
    path = GOLDEN / "partition_specs_tpu-base.json"
    if os.environ.get("LING_JAX_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert json.loads(path.read_text()) == json.loads(json.dumps(golden)), (
        "partition specs changed; if intended, rerun with LING_JAX_UPDATE_GOLDEN=1 and review the diff")


# ----------------------------------------------------------------------------- acceptance 4


def test_checkpoint_reshards_across_meshes(reference, tmp_path):
    """Saved on (2, 4, 1, 1), restored on (1, 2, 2, 2) and on one device: the next step's loss
    and gradient norm equal those of continuing on the original mesh."""
    src_config, src_plan, src_step = _sharded_step(LAYOUTS["data_fsdp"], reference["state"])
    state = jax.device_put(reference["state"], src_plan.state)
    state, _ = src_step(state, S.global_batch(_batch(src_config, 0), src_plan.batch, 8))
    manager = checkpoint_manager(tmp_path, src_config)
    save_checkpoint(manager, 1, state, keep=1)  # with the fingerprint restore_latest checks on every mesh
    next_batch = _batch(src_config, 1)
    _, expected = src_step(state, S.global_batch(next_batch, src_plan.batch, 8))

    dst_config, dst_plan, dst_step = _sharded_step(LAYOUTS["fsdp_tensor_expert"], reference["state"])
    restored, step = restore_latest(manager, S.abstract_state(dst_config, reference["model"], dst_plan.state))
    assert step == 1 and int(restored.step) == 1
    assert restored.params["block_0"]["attn"]["wq"].sharding == dst_plan.state.params["block_0"]["attn"]["wq"]
    _, on_new_mesh = dst_step(restored, S.global_batch(next_batch, dst_plan.batch, 8))

    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
                                    reference["state"])
    restored1, _ = restore_latest(manager, target)
    manager.close()
    assert restored1.params["head"].sharding == one_device
    _, on_one_device = reference["step"](restored1, next_batch)
    for got in (on_new_mesh, on_one_device):
        assert_close(got["loss"], expected["loss"])
        assert_close(got["grad_norm"], expected["grad_norm"], kind="grad")


# ----------------------------------------------------------------------------- acceptance 5


def test_axis_product_must_equal_device_count():
    with pytest.raises(ConfigError, match=r"multiply to 4, but there are 8 devices"):
        S.make_mesh(_config((2, 2, 1, 1)))
    with pytest.raises(ConfigError, match=r"does not divide the 8 devices"):
        S.make_mesh(_config((3, -1, 1, 1), **{"train.batch_size": "24"}))


def test_more_than_one_fill_axis():
    with pytest.raises(ConfigError, match=r"at most one axis may be -1.*\['data', 'fsdp'\]"):
        apply_overrides(_config(), {"mesh.data": "-1", "mesh.fsdp": "-1"})


def test_heads_must_divide_tensor_axis():
    with pytest.raises(ConfigError, match=r"MeshConfig.tensor \(8\) must divide ModelConfig.num_heads \(4\)"):
        _config((1, 1, 8, 1))
    with pytest.raises(ConfigError, match=r"MeshConfig.tensor \(4\) must divide ModelConfig.num_kv_heads \(2\)"):
        _config((2, 1, 4, 1))


def test_expert_axis_must_divide_num_experts():
    with pytest.raises(ConfigError, match=r"MeshConfig.expert \(8\) must divide ModelConfig.moe.num_experts \(6\)"):
        _config((1, 1, 1, 8), **{"model.moe.enabled": "true", "model.moe.num_experts": "6", "model.moe.top_k": "2"})


def test_batch_must_split_over_batch_axes():
    with pytest.raises(ConfigError, match=r"TrainConfig.batch_size \(4\) must be divisible.*= 8"):
        S.make_mesh(_config((-1, 1, 1, 1), **{"train.batch_size": "4"}))


def test_uneven_parameter_is_named():
    config = _config((1, 1, 2, 4), **{"model.depth.predictor_dim": "5"})
    with pytest.raises(ConfigError, match=r"parameter params/block_1_depth/mod/predictor/\w+ dimension 0 \('mlp', size 5\).*\('tensor',\)"):
        S.plan(config)


def test_cli_info_bad_mesh_is_a_clear_error(capsys):
    from ling_jax.cli import main

    assert main(["info", "--preset", "cpu-tiny", "--mesh", "data=3"]) == 2
    assert "TrainConfig.batch_size (8) must be divisible" in capsys.readouterr().err


# ----------------------------------------------------------------------------- hosts and memory


def test_host_slice_and_global_batch_single_process():
    config = _config(LAYOUTS["data_expert"])
    plan = S.plan(config)
    assert S.host_slice(plan.batch, 8) == (0, 1)
    host = _batch(config)
    arrays = S.global_batch(host, plan.batch, 8)
    assert arrays["inputs"].sharding == plan.batch
    np.testing.assert_array_equal(np.asarray(arrays["inputs"]), host["inputs"])
    assert arrays["inputs"].addressable_shards[0].data.shape == (1, 16)  # 8 rows over data * expert = 8


def test_memory_report_shards_params_over_fsdp():
    config = apply_overrides(get_preset("cpu-tiny"), {**TINY, "mesh.data": "1", "mesh.fsdp": "8"})
    report = memory_report(config)
    model = Transformer(config.model)
    total = sum(x.size * 4 for x in jax.tree_util.tree_leaves(jax.eval_shape(
        lambda: init_state(config, model, jax.random.key(0)).params)))
    assert report["devices"] == 8 and report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
    assert total / 8 <= report["param_bytes_per_device"] < total / 4  # a few scalars stay replicated
    assert report["optimizer_bytes_per_device"] >= 2 * report["param_bytes_per_device"]
    assert report["activation_bytes_per_device"] > 0
