"""Training: optax AdamW with warmup + cosine, jitted train/eval steps, orbax checkpoints, resume.

Layers contribute auxiliary losses by sowing already-weighted scalars named ``loss_*`` into the
``intermediates`` collection; the train step adds them to the cross-entropy. Variable
collections that are model state (:data:`STATE_COLLECTIONS`, for example MoE router biases) live
in ``TrainState.extra``, are checkpointed, and are updated outside the optimizer by
:func:`update_extra_state`; collections layers sow (``intermediates``, ``depth`` decisions) are
per-forward outputs and never enter the state.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jaxtyping import Array, Float

from ling_jax.config import Config, ConfigError, model_signature, to_dict
from ling_jax.data import Batch
from ling_jax.layers.moe import BIAS_COLLECTION
from ling_jax.model import Transformer

LN2 = math.log(2.0)

# Variable collections that are model state: carried from step to step in TrainState.extra and
# checkpointed. A new stateful collection must be added here (init_state refuses to create an
# unlisted one, rather than silently leaving it out of checkpoints).
STATE_COLLECTIONS = (BIAS_COLLECTION,)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any  # non-trained variable collections, e.g. {"moe_bias": ...}


def make_optimizer(config: Config) -> optax.GradientTransformation:
    t = config.train
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=max(t.warmup_steps, 1),
        decay_steps=max(t.steps, max(t.warmup_steps, 1) + 1), end_value=t.learning_rate * t.min_lr_ratio,
    )
    # No weight decay on norm scales (1-D params).
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)
    tx = optax.chain(
        optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=0.9, b2=t.beta2, weight_decay=t.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def init_state(config: Config, model: Transformer, rng: jax.Array, *, unbox: bool = True) -> TrainState:
    """``unbox=False`` keeps the logical-axis boxes (``ling_jax.sharding`` reads them under eval_shape).

    Only ``params`` and :data:`STATE_COLLECTIONS` are mutable during init, so whatever layers sow
    (``intermediates``, ``depth``, ...) is dropped: ``extra`` holds state only.
    """
    tokens = jnp.zeros((1, min(8, config.train.seq_len)), jnp.int32)
    variables = model.init(rng, tokens, mutable=["params", *STATE_COLLECTIONS])
    variables = nn.meta.unbox(variables) if unbox else dict(variables)
    params = variables.pop("params")
    extra = {k: v for k, v in variables.items() if k in STATE_COLLECTIONS}
    tx, _ = make_optimizer(config)
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), extra=extra)


def cross_entropy(logits: Float[Array, "B T V"], targets, mask) -> tuple[jax.Array, jax.Array]:
    """Mean token cross-entropy in nats over `mask`, and the number of scored tokens."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    denom = jnp.maximum(jnp.sum(mask), 1.0)
    return jnp.sum(nll * mask) / denom, denom


def aux_losses(intermediates: Any) -> dict[str, jax.Array]:
    """Collects every sown ``loss_*`` scalar (summed over layers) by name."""
    out: dict[str, jax.Array] = {}

    def visit(tree):
        for key, value in tree.items():
            if isinstance(value, dict) or hasattr(value, "items"):
                visit(value)
            elif key.startswith("loss_"):
                out[key] = out.get(key, 0.0) + sum(jnp.asarray(v, jnp.float32) for v in value)

    visit(intermediates)
    return out


def update_extra_state(config: Config, extra: Any, intermediates: Any) -> Any:
    """Non-gradient state updates after a step (aux-loss-free MoE router bias)."""
    if config.model.moe.enabled and config.model.moe.bias_update_rate > 0 and BIAS_COLLECTION in extra:
        from ling_jax.layers.moe import update_router_bias

        return update_router_bias(config.model.moe, extra, intermediates)
    return extra


def make_train_step(config: Config, model: Transformer) -> Callable:
    tx, schedule = make_optimizer(config)

    # Early-exit heads need the targets inside the model (they sow their own `loss_exit`).
    exit_kwargs = lambda batch: (dict(targets=batch["targets"], loss_mask=batch["loss_mask"])
                                 if config.model.depth.exit_enabled else {})

    # Token pruning anneals its soft-mask temperature with the step (carry["step"]).
    step_kwargs = lambda step: dict(carry={"step": step}) if config.model.pruning.enabled else {}

    # MoE router jitter draws from a "jitter" rng: a pure function of (seed, step), so resumes replay it.
    moe = config.model.moe
    # Early-exit training with random exits (depth.exit_train_freeze) draws from a "depth" rng, likewise.
    depth = config.model.depth
    rngs = lambda step: {
        **({"jitter": jax.random.fold_in(jax.random.key(config.train.seed), step)} if moe.enabled and moe.jitter > 0 else {}),
        **({"depth": jax.random.fold_in(jax.random.fold_in(jax.random.key(config.train.seed), step), 1)}
           if depth.exit_enabled and depth.exit_train_freeze > 0 else {}),
    }
    rng_kwargs = lambda step: dict(rngs=rngs(step)) if step is not None and rngs(step) else {}

    def loss_fn(params, extra, batch, step=None):
        logits, state = model.apply({"params": params, **extra}, batch["inputs"], mutable=["intermediates"],
                                    **exit_kwargs(batch), **step_kwargs(step), **rng_kwargs(step))
        ce, _ = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        aux = aux_losses(state["intermediates"])
        total = ce + sum(aux.values()) if aux else ce
        correct = (jnp.argmax(logits, -1) == batch["targets"]) * batch["loss_mask"]
        acc = jnp.sum(correct) / jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        return total, (ce, acc, aux, state["intermediates"])

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        (loss, (ce, acc, aux, inter)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.extra, batch, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extra = update_extra_state(config, state.extra, inter)
        metrics = {"loss": loss, "ce": ce, "accuracy": acc, "lr": schedule(state.step),
                   "grad_norm": optax.tree.norm(grads), **aux}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, extra=extra), metrics

    return train_step


def make_eval_step(model: Transformer) -> Callable:
    def eval_step(params, extra, batch):
        logits = model.apply({"params": params, **extra}, batch["inputs"])
        ce, n = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * batch["loss_mask"])
        return {"nll_sum": ce * n, "count": n, "correct": correct}

    return eval_step


def evaluate(eval_step: Callable, state: TrainState, batches: list[Batch], metric: str,
             bytes_per_token: float = 1.0) -> dict[str, float]:
    """Loss (nats per token), accuracy and, for text, bits per byte (``bytes_per_token``: the UTF-8
    bytes each scored token covers, 1 for byte-level models; see ``DataSource.bytes_per_token``)."""
    nll, count, correct = 0.0, 0.0, 0.0
    for b in batches:
        out = jax.device_get(eval_step(state.params, state.extra, b.as_dict()))
        nll, count, correct = nll + float(out["nll_sum"]), count + float(out["count"]), correct + float(out["correct"])
    result = {"loss": nll / max(count, 1.0)}
    if metric == "bpb":
        result["bpb"] = result["loss"] / LN2 / bytes_per_token
    result["accuracy"] = correct / max(count, 1.0)
    return result


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: Path, config: Config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.train.keep_checkpoints, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(workdir.resolve() / "checkpoints", options=options)


def check_workdir_config(workdir: Path, config: Config) -> None:
    """Writes config.json on first use; refuses a workdir that belongs to a different model."""
    path = workdir / "config.json"
    current = model_signature(config.model)
    if path.exists():
        saved = json.loads(path.read_text())
        saved_sig = saved.get("model_signature")
        if saved_sig is not None and saved_sig != json.loads(json.dumps(current)):
            diffs = sorted(k for k in set(saved_sig) | set(current) if saved_sig.get(k) != json.loads(json.dumps(current)).get(k))
            raise ConfigError(
                f"workdir {workdir} holds a checkpoint of a different model config (fields differ: {diffs}); "
                "use a new --workdir or the same model settings"
            )
        return
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model_signature": current, "config": to_dict(config)}, indent=2, default=str))
    os.replace(tmp, path)


def restore_latest(manager: ocp.CheckpointManager, state: TrainState) -> tuple[TrainState, int]:
    step = manager.latest_step()
    if step is None:
        return state, 0
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return restored, int(step)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drops metric lines logged after the checkpoint we resume from (they will be re-run)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------- the loop


def train(config: Config, workdir: str | Path, *, progress: bool = True, log_fn: Callable[[str], None] = print,
          state_shardings: Any = None, batch_sharding: Any = None, is_main_host: bool = True) -> dict:
    """Trains (resuming from the latest checkpoint in `workdir`) and returns the final eval metrics."""
    from tqdm.auto import tqdm

    from ling_jax import sharding as sharding_lib
    from ling_jax.pipeline import build_data

    workdir = Path(workdir)
    model = Transformer(config.model)
    # More than one device: shard by config.mesh (or the caller's shardings); each host reads its rows.
    plan = None
    if state_shardings is not None:
        plan = sharding_lib.Plan(mesh=batch_sharding.mesh, state=state_shardings, batch=batch_sharding)
    elif jax.device_count() > 1:
        plan = sharding_lib.plan(config, model)
    host_index, host_count = sharding_lib.host_slice(plan.batch, config.train.batch_size) if plan else (0, 1)
    is_main_host = is_main_host and jax.process_index() == 0
    data = build_data(config, host_index=host_index, host_count=host_count)  # fails before the workdir is written
    if is_main_host:  # one writer of config.json on a shared workdir
        check_workdir_config(workdir, config)
    rng = jax.random.key(config.train.seed)
    state = sharding_lib.init_sharded_state(config, model, rng, plan.state) if plan else init_state(config, model, rng)
    manager = checkpoint_manager(workdir, config)
    state, start = restore_latest(manager, state)
    metrics_path = workdir / "metrics.jsonl"
    if is_main_host:
        _truncate_metrics(metrics_path, start)
    if start:
        log_fn(f"resumed from step {start} in {workdir}")

    if plan:  # jitted with explicit in/out shardings; host batches become global arrays
        to_global = lambda b: sharding_lib.global_batch(b, plan.batch, config.train.batch_size)  # noqa: E731
        sharded_train, sharded_eval = sharding_lib.jit_train_step(config, model, plan), sharding_lib.jit_eval_step(model, plan)
        train_step = lambda s, b: sharded_train(s, to_global(b))  # noqa: E731
        eval_step = lambda p, e, b: sharded_eval(p, e, to_global(b))  # noqa: E731
    else:
        train_step = jax.jit(make_train_step(config, model), donate_argnums=(0,))
        eval_step = jax.jit(make_eval_step(model))

    t = config.train
    tokens_per_step = t.batch_size * t.seq_len
    bar = tqdm(total=t.steps, initial=start, disable=not (progress and is_main_host), dynamic_ncols=True, desc="train")
    window_start, window_steps = time.perf_counter(), 0
    with open(metrics_path, "a") if is_main_host else open(os.devnull, "w") as log:
        for step in range(start, t.steps):
            batch = data.train_batch(step).as_dict()
            state, m = train_step(state, batch)
            window_steps += 1
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                m = jax.device_get(m)
                elapsed = time.perf_counter() - window_start
                record = {"step": done, "loss": float(m["loss"]), "ce": float(m["ce"]), "lr": float(m["lr"]),
                          "grad_norm": float(m["grad_norm"]), "tokens_per_sec": window_steps * tokens_per_step / elapsed}
                record["bpb" if data.metric == "bpb" else "accuracy"] = (
                    float(m["ce"]) / LN2 / data.bytes_per_token() if data.metric == "bpb" else float(m["accuracy"]))
                record.update({k: float(v) for k, v in m.items() if k.startswith("loss_")})
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_sec']:.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if t.eval_every and done % t.eval_every == 0 and done != t.steps:
                ev = evaluate(eval_step, state, data.eval_batches(), data.metric, data.bytes_per_token())
                log.write(json.dumps({"step": done, **{f"eval_{k}": v for k, v in ev.items()}}) + "\n")
            if done % t.checkpoint_every == 0 or done == t.steps:
                manager.save(done, args=ocp.args.StandardSave(state))
                manager.wait_until_finished()
            bar.update(1)
        bar.close()
        final = evaluate(eval_step, state, data.eval_batches(), data.metric, data.bytes_per_token())
        log.write(json.dumps({"step": int(state.step), **{f"eval_{k}": v for k, v in final.items()}}) + "\n")
    manager.close()
    return {"step": int(state.step), **final}


def load_trained(workdir: str | Path) -> tuple[Config, Transformer, TrainState]:
    """Restores the latest checkpoint of a workdir together with its config."""
    from ling_jax.config import from_dict

    workdir = Path(workdir)
    path = workdir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{workdir} has no config.json: not a ling-jax training workdir")
    config = from_dict(json.loads(path.read_text())["config"])
    model = Transformer(config.model)
    state = init_state(config, model, jax.random.key(config.train.seed))
    manager = checkpoint_manager(workdir, config)
    if manager.latest_step() is None:  # step 0 is a checkpoint too (ling-jax convert writes one)
        manager.close()
        raise FileNotFoundError(f"{workdir} has no checkpoint yet")
    state, step = restore_latest(manager, state)
    manager.close()
    return config, model, state
