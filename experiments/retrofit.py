"""Retrofit learned token pruning onto a checkpoint imported from the Hugging Face layout.

    python experiments/retrofit.py --json experiments/results/retrofit.json

1. pretrain a dense byte-level model with ling-jax (``cpu-small``, ``--pretrain-steps``);
2. export it as a Llama checkpoint (``config.json`` + ``model.safetensors``, ``save_hf``);
3. ``ling-jax convert`` that directory with learned pruning switched on (layers from 1, keep ratio
   driven to ``--keep``), i.e. the path a user takes with a downloaded model;
4. sweep the converted workdir as imported (untrained scorer), fine-tune it ``--finetune-steps``
   steps from the imported weights (``ling-jax train --workdir``), sweep again.

Reported (printed, and one flat JSON object with the command, git revision and wall time):
validation bits per byte of the dense model, of the imported model (equal: the round trip is
exact), keep-all after fine-tuning, and the sweep's largest token reduction within 2% of keep-all
before and after fine-tuning (the ledger's ideal token reduction factor), with the rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    a = p.parse_args(argv)
    from ling_jax.provenance import Provenance

    prov = Provenance("experiments/retrofit.py", argv)

    from ling_jax.cli import _sweep
    from ling_jax.config import apply_overrides, get_preset
    from ling_jax.interop.convert import convert
    from ling_jax.interop.hf import save_hf
    from ling_jax.sweep import best_within
    from ling_jax.train import load_trained, train

    t0 = time.time()
    root = a.workdir or Path(tempfile.mkdtemp(prefix="retrofit_"))
    dense_cfg = apply_overrides(get_preset(a.preset), {"train.steps": str(a.pretrain_steps),
                                                       "train.checkpoint_every": str(a.pretrain_steps)})
    dense = train(dense_cfg, root / "dense", progress=False)
    _, _, state = load_trained(root / "dense")
    save_hf(root / "hf", dense_cfg.model, state.variables(), "llama")
    t = dense_cfg.train
    overrides = {"train.seq_len": str(t.seq_len), "train.batch_size": str(t.batch_size), "train.steps": str(a.finetune_steps),
                 "train.eval_batches": str(t.eval_batches), "train.learning_rate": "1e-3",
                 "train.warmup_steps": "10", "train.checkpoint_every": str(a.finetune_steps), "train.log_every": "20",
                 "model.pruning.enabled": "true", "model.pruning.layers": "from:1",
                 "model.pruning.target_keep_ratio": str(a.keep), "model.pruning.anneal_steps": str(a.finetune_steps),
                 "model.pruning.window": "8", "model.pruning.budget": "64"}
    config = convert(root / "hf", root / "retro", overrides)
    before = _sweep(root / "retro", progress=False)
    tuned = train(config, root / "retro", progress=False)
    after = _sweep(root / "retro", progress=False)
    best_before, best_after = best_within(before), best_within(after)
    result = {
        "preset": a.preset, "pretrain_steps": a.pretrain_steps, "finetune_steps": a.finetune_steps,
        "target_keep_ratio": a.keep,
        "dense_bpb": dense["bpb"], "imported_keep_all_bpb": before[0]["quality"],
        "finetuned_keep_all_bpb": after[0]["quality"], "finetuned_train_eval_bpb": tuned["bpb"],
        "best_trf_within_2pct_before": best_before["token_reduction"] if best_before else 1.0,
        "best_rule_before": f"{best_before['rule']} {best_before['value']}" if best_before else "none",
        "best_trf_within_2pct_after": best_after["token_reduction"] if best_after else 1.0,
        "best_rule_after": f"{best_after['rule']} {best_after['value']}" if best_after else "none",
        "rows_before": before, "rows_after": after, "wall_time_s": time.time() - t0,
    }
    if a.json:
        prov.write(a.json, result, config=config, checkpoints=[root / "dense", root / "retro"], indent=1)
    for key in ("dense_bpb", "imported_keep_all_bpb", "finetuned_keep_all_bpb", "best_trf_within_2pct_before",
                "best_trf_within_2pct_after", "wall_time_s"):
        print(f"{key}: {result[key]}")
    print(f"retrofit: {result['best_trf_within_2pct_after']:.2f}x token reduction within 2% after "
          f"{a.finetune_steps} fine-tuning steps ({result['best_rule_after']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
