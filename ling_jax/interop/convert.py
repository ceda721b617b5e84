"""``ling-jax convert``: a Hugging Face model directory -> a ling-jax workdir.

The workdir holds ``config.json`` and an orbax checkpoint at step 0 in the layout
:mod:`ling_jax.train` writes, so ``ling-jax eval | sweep | train --workdir W`` work on it. Config
overrides given to convert (``--model.pruning.enabled true --train.steps 300``) shape the run that
``ling-jax train --workdir W`` then resumes from the imported weights: parameters the checkpoint
does not have (a pruning scorer, exit heads) keep their fresh initialisation. That is the retrofit.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Mapping, Sequence

import jax

from ling_jax.config import Config, DataConfig, TrainConfig, apply_overrides
from ling_jax.interop.hf import load_hf
from ling_jax.interop.hf_config import InteropError

SOURCE_FILE = "hf_source.json"


def default_config(model_cfg, model_type: str, tokenizer: str = "") -> Config:
    """A short fine-tuning run on the default text corpus (override anything with --section.field)."""
    seq = min(128, model_cfg.max_seq_len)
    train = TrainConfig(batch_size=8, seq_len=seq, steps=200, learning_rate=3e-4, warmup_steps=20, min_lr_ratio=0.1,
                        weight_decay=0.0, checkpoint_every=100, eval_batches=8, log_every=10)
    return Config(model=model_cfg, train=train, data=DataConfig(tokenizer=tokenizer), preset=f"hf:{model_type}")


def convert(hf_dir: str | pathlib.Path, workdir: str | pathlib.Path, overrides: Mapping[str, str] | Sequence[str] = (),
            *, tokenizer: str | None = None) -> Config:
    """Imports ``hf_dir`` and writes the workdir; returns the run's Config."""

    from ling_jax.interop.tokenizer import Tokenizer
    from ling_jax.runs import init_workdir

    hf_dir, workdir = pathlib.Path(hf_dir), pathlib.Path(workdir)
    model_cfg, variables, hf_cfg = load_hf(hf_dir)
    tok_path = pathlib.Path(tokenizer) if tokenizer else hf_dir / "tokenizer.json"
    if tokenizer and not tok_path.exists():
        raise InteropError(f"--tokenizer {tok_path} does not exist")
    if (workdir / "config.json").exists() or (workdir / "checkpoints").exists():
        raise InteropError(f"workdir {workdir} already holds a run; convert into a new --workdir")
    tok_in_workdir = ""
    if tok_path.exists():
        Tokenizer(tok_path).check_vocab(model_cfg.vocab_size)
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tok_path, workdir / "tokenizer.json")
        tok_in_workdir = str((workdir / "tokenizer.json").resolve())
    config = apply_overrides(default_config(model_cfg, hf_cfg["model_type"], tok_in_workdir), overrides)
    if config.data.tokenizer:
        Tokenizer(config.data.tokenizer).check_vocab(config.model.vocab_size)
    init_workdir(config, workdir, variables, allow_new=True)  # imported weights; new modules (scorers) fresh
    (workdir / SOURCE_FILE).write_text(json.dumps({"hf_dir": str(hf_dir.resolve()), "model_type": hf_cfg["model_type"],
                                                   "hf_config": hf_cfg}, indent=1))
    return config


def export(workdir: str | pathlib.Path, out: str | pathlib.Path, *, model_type: str | None = None,
           max_shard_bytes: int | None = None) -> list[str]:
    """Writes a workdir's latest checkpoint as a Hugging Face directory (``save_hf``). The model type
    and the untouched config.json keys come from the workdir's ``hf_source.json`` when it was
    converted (else ``model_type``, default "llama"). Returns the ling-jax-only parameters that the
    Hugging Face layout has no place for (pruning scorers, exit heads): they are left out."""
    from ling_jax.interop.hf import rules_for, save_hf
    from ling_jax.train import load_trained

    workdir = pathlib.Path(workdir)
    config, _, state = load_trained(workdir)
    source = json.loads((workdir / SOURCE_FILE).read_text()) if (workdir / SOURCE_FILE).exists() else {}
    model_type = model_type or source.get("model_type") or "llama"
    variables = {"params": state.params, **state.extra}
    save_hf(out, config.model, variables, model_type, base_config=source.get("hf_config"), max_shard_bytes=max_shard_bytes)
    mapped = {(r.collection, *r.path) for r in rules_for(config.model, model_type)}
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    return sorted("/".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves
                  if tuple(getattr(k, "key", k) for k in path) not in mapped)
