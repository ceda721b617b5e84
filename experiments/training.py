"""Train-or-load for the experiments: one cached training run per (task, variant, seed).

:func:`train_or_load` trains a config once and stores its final variables under
``<results>/runs/<preset>/<task>/<variant>/seed<k>/`` (``state.msgpack`` + ``run.json`` with the
model, training and data config it belongs to); a later call with the same config loads them, a
different config retrains. The jitted train step is cached by (model, train) config, so seeds
and tasks of one shape compile once. A run interrupted mid-training restarts that one run (the
``tpu`` preset trains through :func:`ling_jax.train.train` instead, which checkpoints and resumes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.config import Config, ModelConfig, model_signature, to_dict
from ling_jax.model import Transformer


def _defaults(section: str) -> Any:
    """The default values of a saved config section (what a field added later stands for)."""
    from ling_jax.config import Config

    if section == "model_signature":
        return None
    return json.loads(json.dumps(to_dict(getattr(Config(), section))))


def same_run(saved: Any, current: Any, defaults: Any = None) -> bool:
    """Whether a saved config (JSON) describes the current one: equal, except that a field missing
    from the saved one (added to the code later) must hold its default value in the current one."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key, value in current.items():
            default = defaults.get(key) if isinstance(defaults, dict) else None
            if key not in saved:
                if not isinstance(defaults, dict) or key not in defaults or value != default:
                    return False
            elif not same_run(saved[key], value, default):
                return False
        return set(saved) <= set(current)
    return saved == current


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename (never half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- jax setup


def setup_jax(results_root: Path) -> None:
    """Persistent compilation cache under the runs cache (compiles repeat across scripts/resumes)."""
    cache = Path(results_root) / "runs" / "jax_cache"
    cache.mkdir(parents=True, exist_ok=True)
    try:
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    except Exception:  # an older jax without the option: compile as usual  # pragma: no cover
        pass


# ----------------------------------------------------------------------------- training


def _train_key(config: Config) -> Config:
    """What the jitted train step depends on (not the seed, not the data)."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, seed=0), data=type(config.data)())


@functools.lru_cache(maxsize=64)
def _train_step(key: Config) -> Callable:
    from ling_jax.train import make_train_step

    return jax.jit(make_train_step(key, Transformer(key.model)), donate_argnums=(0,))


def _state_path(run_dir: Path) -> Path:
    return run_dir / "state.msgpack"


def run_dir_for(results_root: Path, preset: str, task: str, variant: str, seed: int) -> Path:
    return Path(results_root) / "runs" / preset / task / variant / f"seed{seed}"


@dataclasses.dataclass
class Trained:
    """A trained model: its config, variables ({"params": ..., **extra}) and training summary."""

    config: Config
    variables: dict
    info: dict

    @property
    def model(self) -> ModelConfig:
        return self.config.model


def _train_sharded(config: Config, run_dir: Path, progress: bool) -> tuple[dict, dict]:
    """Multi-device training (the tpu preset): ling_jax.train.train on the config's mesh, with its
    orbax checkpoints (so even one run resumes mid-way), then the restored final state."""
    from ling_jax.sharding import activate, plan
    from ling_jax.train import load_trained, train

    p = plan(config)
    start = time.perf_counter()
    with activate(p.mesh):
        final = train(config, run_dir / "workdir", progress=progress, state_shardings=p.state, batch_sharding=p.batch)
    _, _, state = load_trained(run_dir / "workdir")
    info = {"train_seconds": time.perf_counter() - start, "steps": config.train.steps,
            "final_eval": {k: v for k, v in final.items() if isinstance(v, (int, float))}}
    return {"params": state.params, **state.extra}, info


def train_or_load(config: Config, run_dir: Path, *, progress: bool = True, desc: str = "train",
                  sharded: bool = False) -> Trained:
    """Trains ``config`` and caches its final variables in ``run_dir``, or loads the cached ones.

    A cached run is reused only if its saved model signature, model, training and data configs
    match (:func:`same_run`; fields added to the config classes since the run was trained count
    as matching at their default values); otherwise it is retrained (and overwritten).
    """
    import flax.linen as nn
    import flax.serialization
    from tqdm.auto import tqdm

    from ling_jax.pipeline import build_data
    from ling_jax.train import init_state

    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    want = {"model_signature": json.loads(json.dumps(model_signature(config.model))),
            "model": json.loads(json.dumps(to_dict(config.model))),
            "train": to_dict(config.train), "data": to_dict(config.data)}
    if meta_path.exists() and _state_path(run_dir).exists():
        meta = json.loads(meta_path.read_text())
        if all(same_run(meta.get(k), v, _defaults(k)) for k, v in want.items()):
            state = flax.serialization.msgpack_restore(_state_path(run_dir).read_bytes())
            variables = jax.tree_util.tree_map(jnp.asarray, {"params": state["params"], **state.get("extra", {})})
            return Trained(config, variables, meta["info"])

    if sharded:
        variables, info = _train_sharded(config, run_dir, progress)
        extra = {k: v for k, v in variables.items() if k != "params"}
        _save(run_dir, variables["params"], extra, {**want, "info": info})
        return Trained(config, variables, info)
    data = build_data(config)
    model = Transformer(config.model)
    state = jax.jit(functools.partial(init_state, config, model))(jax.random.key(config.train.seed))  # one compile
    step_fn = _train_step(_train_key(config))
    start = time.perf_counter()
    losses = []
    bar = tqdm(range(config.train.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        state, metrics = step_fn(state, data.train_batch(step).as_dict())
        if (step + 1) % 50 == 0 or step + 1 == config.train.steps:
            ce = float(metrics["ce"])
            losses.append((step + 1, ce))
            bar.set_postfix(ce=f"{ce:.3f}")
    jax.block_until_ready(state.params)
    info = {"train_seconds": time.perf_counter() - start, "steps": config.train.steps, "final_train_ce": losses[-1][1],
            "train_ce_curve": losses}
    variables = {"params": nn.meta.unbox(state.params), **state.extra}
    _save(run_dir, variables["params"], dict(state.extra), {**want, "info": info})
    return Trained(config, variables, info)


def _save(run_dir: Path, params: Any, extra: dict, meta: dict) -> None:
    import flax.serialization

    run_dir.mkdir(parents=True, exist_ok=True)
    blob = flax.serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, {"params": params, "extra": extra}))
    atomic_write(_state_path(run_dir), blob)
    atomic_write(run_dir / "run.json", json.dumps(meta, indent=1).encode())


def eval_batches(config: Config, batch_size: int = 0) -> list[dict]:
    """The held-out batches of a config (``batch_size``: rows per batch, 0 = the training batch)."""
    from ling_jax.pipeline import build_data

    if batch_size:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=batch_size))
    return [b.as_dict() for b in build_data(config).eval_batches()]
