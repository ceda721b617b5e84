"""Named presets: plain functions of nothing that build a :class:`~ling_jax.config.Config`.

``get_preset`` and ``PRESETS`` are re-exported by :mod:`ling_jax.config`."""

from __future__ import annotations

import dataclasses
from typing import Callable

from ling_jax.config import Config, ConfigError, ModelConfig, TrainConfig
from ling_jax.layers.pruning_config import PruningConfig
from ling_jax.sharding_config import MeshConfig


def _cpu_tiny() -> Config:
    """Seconds on a laptop: the test-suite preset."""
    return Config(
        model=ModelConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=192, max_seq_len=128),
        train=TrainConfig(batch_size=8, seq_len=64, steps=50, learning_rate=3e-3, warmup_steps=5,
                          checkpoint_every=25, eval_batches=2, log_every=5),
        preset="cpu-tiny",
    )


def _cpu_small() -> Config:
    """Dense, a few minutes on 2 CPU cores (the main job adds learned pruning: cpu-small-pruned)."""
    return Config(
        model=ModelConfig(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384, max_seq_len=256),
        train=TrainConfig(batch_size=16, seq_len=128, steps=400, learning_rate=3e-3, warmup_steps=30,
                          checkpoint_every=200, eval_batches=16, log_every=20),
        preset="cpu-small",
    )


def _cpu_small_pruned() -> Config:
    """The README main job: ``cpu-small`` trained with learned token pruning (soft mask annealed to
    a hard decision, keep ratio driven to 0.25 from layer 1 up), then swept at inference."""
    base = _cpu_small()
    pruning = PruningConfig(enabled=True, layers="from:1", mode="soft", target_keep_ratio=0.25, num_sinks=1,
                            window=8, budget=64, anneal_steps=base.train.steps, temperature=1.0,
                            final_temperature=0.1)
    return dataclasses.replace(base, model=dataclasses.replace(base.model, pruning=pruning),
                               preset="cpu-small-pruned")


def _cpu_base() -> Config:
    """About 30 minutes on 2 CPU cores (1.7M params, 4.9M training tokens)."""
    return Config(
        model=ModelConfig(d_model=192, num_layers=4, num_heads=6, num_kv_heads=2, mlp_dim=512, max_seq_len=256),
        train=TrainConfig(batch_size=16, seq_len=256, steps=1200, learning_rate=3e-3, warmup_steps=60,
                          checkpoint_every=200, eval_batches=32, log_every=25),
        preset="cpu-base",
    )


def _tpu_base() -> Config:
    """One TPU host (e.g. v5e-8 / v4-8): ~150M params, bf16 compute, FSDP over the host's chips.

    Not run here; sized so params + AdamW state + activations fit comfortably in 8 x 16 GB.
    """
    return Config(
        model=ModelConfig(d_model=1024, num_layers=12, num_heads=16, num_kv_heads=4, mlp_dim=2816,
                          max_seq_len=2048, dtype="bfloat16", remat="block", attention_impl="auto"),
        train=TrainConfig(batch_size=256, seq_len=2048, steps=20_000, learning_rate=1e-3, warmup_steps=1000,
                          checkpoint_every=1000, eval_batches=32, log_every=50),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, expert=1),
        preset="tpu-base",
    )


def _long() -> Config:
    """Long context on 2 CPU cores: 8 layers, 1k-token prompts. ``experiments/long_context.py``
    trains it short-first (256-token sequences, then 1088) and measures prompt -> prune -> continue."""
    return Config(
        model=ModelConfig(d_model=64, num_layers=8, num_heads=4, num_kv_heads=2, mlp_dim=192, max_seq_len=1152),
        train=TrainConfig(batch_size=4, seq_len=1088, steps=30, learning_rate=1e-3, warmup_steps=5,
                          checkpoint_every=10, eval_batches=2, log_every=5),
        preset="long",
    )


def _long_gpu() -> Config:
    """Long context on one GPU (e.g. H100/H200 80+ GB): ~40M params, 8k-token prompts, bf16.
    Documented for ``experiments/long_context.py --preset long-gpu``; not run here."""
    return Config(
        model=ModelConfig(d_model=512, num_layers=12, num_heads=8, num_kv_heads=4, mlp_dim=1536, max_seq_len=8448,
                          dtype="bfloat16", remat="block", attention_impl="auto"),
        train=TrainConfig(batch_size=16, seq_len=8256, steps=4000, learning_rate=1e-3, warmup_steps=200,
                          checkpoint_every=500, eval_batches=8, log_every=50),
        preset="long-gpu",
    )


def _long_tpu() -> Config:
    """Long context on one TPU host (v5e-8 / v4-8): ~150M params, 16k-token prompts, bf16, FSDP.
    Documented for ``experiments/long_context.py --preset long-tpu``; not run here."""
    return Config(
        model=ModelConfig(d_model=1024, num_layers=16, num_heads=16, num_kv_heads=4, mlp_dim=2816, max_seq_len=16640,
                          dtype="bfloat16", remat="block", attention_impl="auto"),
        train=TrainConfig(batch_size=32, seq_len=16448, steps=8000, learning_rate=1e-3, warmup_steps=400,
                          checkpoint_every=500, eval_batches=8, log_every=50),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, expert=1),
        preset="long-tpu",
    )


PRESETS: dict[str, Callable[[], Config]] = {
    "cpu-tiny": _cpu_tiny,
    "cpu-small": _cpu_small,
    "cpu-small-pruned": _cpu_small_pruned,
    "cpu-base": _cpu_base,
    "tpu-base": _tpu_base,
    "long": _long,
    "long-gpu": _long_gpu,
    "long-tpu": _long_tpu,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
    return PRESETS[name]()
