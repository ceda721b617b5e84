"""Training: optax AdamW with warmup + cosine, jitted train/eval steps, orbax checkpoints, resume.

Layers contribute auxiliary losses by sowing already-weighted scalars named ``loss_*`` into the
``intermediates`` collection; the train step adds them to the cross-entropy. Variable
collections that are model state (:data:`STATE_COLLECTIONS`, for example MoE router biases) live
in ``TrainState.extra``, are checkpointed, and are updated outside the optimizer by
:func:`update_extra_state`; collections layers sow (``intermediates``, ``depth`` decisions) are
per-forward outputs and never enter the state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from ling_jax.checkpoints import CheckpointError, checkpoint_manager, restore_latest, save_checkpoint
from ling_jax.config import Config, from_dict
from ling_jax.data import Batch, DataError
from ling_jax.layers.moe import BIAS_COLLECTION
from ling_jax import sharding as sharding_lib
from ling_jax.ledger import sown
from ling_jax.model import Transformer
from ling_jax.token_state import TokenState
from ling_jax.train_state import STATE_COLLECTIONS, TrainState, abstract_state, init_state, make_optimizer  # noqa: F401 (re-exported)
from ling_jax.workdir import (MetricsFile, WorkdirLock, check_compatible, config_changes, data_difference, prepare,
                              print_log, read_record, recorded_config, truncate_metrics, write_record)

LN2 = math.log(2.0)

def cross_entropy(logits: Float[Array, "B T V"], targets, mask) -> tuple[jax.Array, jax.Array]:
    """Mean token cross-entropy in nats over `mask`, and the number of scored tokens."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)  # [B, T]
    denom = jnp.maximum(jnp.sum(mask), 1.0)
    return jnp.sum(nll * mask) / denom, denom


def aux_losses(intermediates: Any) -> dict[str, jax.Array]:
    """Collects every sown ``loss_*`` scalar (summed over layers) by name."""
    out: dict[str, jax.Array] = {}
    for path, values in sown(intermediates).items():
        if path[-1].startswith("loss_"):
            out[path[-1]] = out.get(path[-1], 0.0) + sum(jnp.asarray(v, jnp.float32) for v in values)
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

    # Token pruning anneals its soft-mask temperature with the step (TokenState.step).
    step_kwargs = lambda step: dict(state=TokenState(step=step)) if config.model.pruning.enabled else {}

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


def jit_train_step(config: Config, model: Transformer, plan: sharding_lib.Plan, *, donate: bool = True) -> Callable:
    """``(state, batch) -> (state, metrics)`` jitted with explicit in/out shardings."""
    return jax.jit(sharding_lib.within(plan.mesh, make_train_step(config, model)), donate_argnums=(0,) if donate else (),
                   in_shardings=(plan.state, plan.batch), out_shardings=(plan.state, plan.replicated))


def jit_eval_step(model: Transformer, plan: sharding_lib.Plan) -> Callable:
    """``(params, extra, batch) -> sums`` jitted with explicit in/out shardings."""
    return jax.jit(sharding_lib.within(plan.mesh, make_eval_step(model)),
                   in_shardings=(plan.state.params, plan.state.extra, plan.batch), out_shardings=plan.replicated)


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


# ----------------------------------------------------------------------------- failures


class NonFiniteError(RuntimeError):
    """A training step produced a non-finite loss or gradient norm; nothing of it was saved."""


class Preempted(RuntimeError):
    """SIGTERM (or orbax's preemption notice) arrived; the last completed step was saved first."""

    def __init__(self, step: int, reason: str):
        saved = "checkpoint saved" if step else "no step completed yet"
        super().__init__(f"stopped by {reason} after step {step} ({saved}); rerun the same command to resume")
        self.step, self.reason = step, reason


class _StopSignal:
    """SIGTERM becomes a request that the loop honours at the next step boundary (main thread,
    single process only: with several processes orbax's preemption sync point is used instead)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: Optional[str] = None
        self._previous = None

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "_StopSignal":
        if self.enabled:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGTERM, self._previous)


def _check_finite(step: int, metrics: dict, last_saved: int) -> None:
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteError(f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; stopped "
                             f"without saving it (last checkpoint: step {last_saved}); try a lower "
                             "--train.learning_rate or --train.grad_clip")


def _schedule_steps(record: Optional[dict], config: Config, start: int) -> int:
    """Length of the learning-rate schedule: fixed by the run that started the workdir."""
    if record is None or start == 0:
        return config.train.steps
    return int(record.get("schedule_steps", record["config"].get("train", {}).get("steps", config.train.steps)))


# ----------------------------------------------------------------------------- the loop


def train(config: Config, workdir: str | Path, *, progress: bool = True, log_fn: Callable[[str], None] = print_log,
          state_shardings: Any = None, batch_sharding: Any = None, is_main_host: bool = True,
          devices: Optional[Sequence[jax.Device]] = None, final_eval: bool = True) -> dict:
    """Trains (resuming from the newest good checkpoint in `workdir`) and returns the final eval metrics.

    Guarantees (see README "Resuming and failures"): the workdir is locked for the whole run; a
    non-finite loss or gradient norm stops the run (NonFiniteError) and is never saved; SIGTERM
    saves the last completed step and raises Preempted; a resumed run keeps the learning-rate
    schedule recorded in config.json (``train.steps`` only moves where training stops).
    ``devices``: train on these devices only (default: all; one device trains unsharded).
    ``final_eval=False`` skips the final evaluation (a caller that evaluates the model itself).
    """
    workdir = Path(workdir)
    if state_shardings is None:  # a --mesh the devices cannot fill is an error, also on one device
        config.mesh.resolve(len(devices) if devices else jax.device_count())
    is_main_host = is_main_host and jax.process_index() == 0
    prepare(workdir)
    lock = WorkdirLock(workdir, log_fn) if is_main_host else contextlib.nullcontext()
    with lock, _StopSignal(enabled=jax.process_count() == 1) as stop:
        return _train_locked(config, workdir, stop, progress=progress, log_fn=log_fn, state_shardings=state_shardings,
                             batch_sharding=batch_sharding, is_main_host=is_main_host, devices=devices,
                             final_eval=final_eval)


def _train_locked(config: Config, workdir: Path, stop: _StopSignal, *, progress: bool, log_fn: Callable[[str], None],
                  state_shardings: Any, batch_sharding: Any, is_main_host: bool,
                  devices: Optional[Sequence[jax.Device]], final_eval: bool) -> dict:
    from tqdm.auto import tqdm

    from ling_jax.pipeline import build_data, data_fingerprint

    record = read_record(workdir)
    if record is not None:  # before anything is built: a changed training setting is refused naming it
        check_compatible(workdir, record, config)
    corpus = data_fingerprint(config)
    changed = data_difference(record, corpus)
    if changed:  # data.path "" (the standard library) is another corpus under another Python
        raise DataError(f"workdir {workdir}: {changed}; resuming would train on other data: "
                        "use the recorded corpus (data.path) or a new --workdir")
    model = Transformer(config.model)
    # More than one device: shard by config.mesh (or the caller's shardings); each host reads its rows.
    plan = None
    if state_shardings is not None:
        plan = sharding_lib.Plan(mesh=batch_sharding.mesh, state=state_shardings, batch=batch_sharding)
    elif len(devices or jax.devices()) > 1:
        plan = sharding_lib.plan(config, model, devices=devices)
    host_index, host_count = sharding_lib.host_slice(plan.batch, config.train.batch_size) if plan else (0, 1)
    data = build_data(config, host_index=host_index, host_count=host_count)

    rng = jax.random.key(config.train.seed)
    state = (sharding_lib.init_sharded_state(config, model, rng, plan.state) if plan
             else jax.jit(lambda key: init_state(config, model, key))(rng))  # one compile, not one per op
    manager = checkpoint_manager(workdir, config)
    try:
        state, start = restore_latest(manager, state, log_fn=log_fn,
                                      quarantine=workdir / "skipped_checkpoints" if is_main_host else None)
    except CheckpointError as e:
        hint = ("; config.json is missing, so the settings these checkpoints were trained with are unknown: "
                "rerun with the original settings or use a new --workdir") if record is None else ""
        raise CheckpointError(f"{e}{hint}") from None
    schedule_steps = _schedule_steps(record, config, start)
    metrics_path = workdir / "metrics.jsonl"
    if start:
        log_fn(f"resumed from step {start} in {workdir}")
        changes = config_changes(from_dict(record["config"]), config, ignore=("mesh", "preset")) if record is not None else []
        if changes:
            log_fn("resuming with settings changed from config.json: " + "; ".join(changes))
        if config.train.steps != schedule_steps:
            past = (f"; steps past {schedule_steps} train at the final rate "
                    f"{config.train.learning_rate * config.train.min_lr_ratio:g}") if config.train.steps > schedule_steps else ""
            log_fn(f"train.steps is {config.train.steps}: the learning-rate schedule keeps the {schedule_steps} steps "
                   f"recorded when this workdir started{past}")
        if is_main_host:
            write_record(workdir, config, schedule_steps=schedule_steps, data=corpus)
    if is_main_host:
        truncate_metrics(metrics_path, start, log_fn, final=start >= config.train.steps)

    # The optimizer sees the recorded schedule length; the loop runs to config.train.steps.
    step_config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=schedule_steps))
    if plan:  # jitted with explicit in/out shardings; host batches become global arrays
        to_global = lambda b: sharding_lib.global_batch(b, plan.batch, config.train.batch_size)  # noqa: E731
        sharded_train, sharded_eval = jit_train_step(step_config, model, plan), jit_eval_step(model, plan)
        train_step = lambda s, b: sharded_train(s, to_global(b))  # noqa: E731
        eval_step = lambda p, e, b: sharded_eval(p, e, to_global(b))  # noqa: E731
    else:
        train_step = jax.jit(make_train_step(step_config, model), donate_argnums=(0,))
        eval_step = jax.jit(make_eval_step(model))

    t = config.train
    tokens_per_step = t.batch_size * t.seq_len
    last_saved = start

    def save(done: int) -> None:
        nonlocal last_saved
        save_checkpoint(manager, done, state, keep=t.keep_checkpoints)
        if last_saved == 0 and is_main_host:  # a fresh run records its config with the first checkpoint
            write_record(workdir, config, schedule_steps=schedule_steps, data=corpus)
        last_saved = done

    def stop_requested(step: int) -> Optional[str]:
        if stop.received:
            return stop.received
        if jax.process_count() > 1 and manager.reached_preemption(step):
            return "a preemption notice"
        return None

    bar = tqdm(total=t.steps, initial=start, disable=not (progress and is_main_host), dynamic_ncols=True, desc="train")
    window_start, window_steps = time.perf_counter(), 0
    pending = None  # (step, metrics) of a step whose finiteness is checked once the next one is dispatched
    try:
        with MetricsFile(metrics_path) if is_main_host else open(os.devnull, "w") as log:
            for step in range(start, t.steps):
                reason = stop_requested(step)
                if reason:
                    if pending:
                        _check_finite(*pending, last_saved)
                    if step > last_saved:
                        save(step)
                    raise Preempted(step, reason)
                batch = data.train_batch(step).as_dict()
                state, m = train_step(state, batch)
                window_steps += 1
                done = step + 1
                if pending:
                    _check_finite(*pending, last_saved)
                pending = (done, m)
                is_log = done % t.log_every == 0 or done == t.steps
                is_eval = bool(t.eval_every) and done % t.eval_every == 0 and done != t.steps
                is_save = done % t.checkpoint_every == 0 or done == t.steps
                if is_log or is_eval or is_save:
                    _check_finite(*pending, last_saved)
                    pending = None
                if is_log:
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
                if is_eval:
                    ev = evaluate(eval_step, state, data.eval_batches(), data.metric, data.bytes_per_token())
                    log.write(json.dumps({"step": done, **{f"eval_{k}": v for k, v in ev.items()}}) + "\n")
                    log.flush()
                if is_save:
                    save(done)
                bar.update(1)
            if pending:
                _check_finite(*pending, last_saved)
            bar.close()
            reason = stop_requested(int(state.step))
            if reason:
                raise Preempted(int(state.step), reason)
            final = {}
            if final_eval:
                final = evaluate(eval_step, state, data.eval_batches(), data.metric, data.bytes_per_token())
                log.write(json.dumps({"step": int(state.step), **{f"eval_{k}": v for k, v in final.items()}}) + "\n")
    finally:
        bar.close()
        manager.close()
    return {"step": int(state.step), **final}


def load_trained(workdir: str | Path, *, log_fn: Optional[Callable[[str], None]] = None
                 ) -> tuple[Config, Transformer, TrainState]:
    """Restores the newest good checkpoint of a workdir together with its config.

    Read-only: the checkpoint manager creates, cleans and deletes nothing, so it is safe while a
    trainer writes the workdir; a step deleted under it makes it list the steps again, and a
    corrupted step is skipped with a warning (to ``log_fn``, default stderr).
    """
    workdir = Path(workdir)
    config = recorded_config(workdir)
    if config is None:
        raise FileNotFoundError(f"{workdir} has no config.json: not a ling-jax training workdir")
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"{workdir} has no checkpoint yet")
    model = Transformer(config.model)
    state = abstract_state(config, model)
    manager = checkpoint_manager(workdir, config, read_only=True)
    try:
        if manager.latest_step() is None:  # step 0 is a checkpoint too (ling-jax convert writes one)
            raise FileNotFoundError(f"{workdir} has no checkpoint yet")
        state, step = restore_latest(manager, state, log_fn=log_fn)
    finally:
        manager.close()
    return config, model, state
