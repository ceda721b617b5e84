"""Pruning + MoE + adaptive depth together, beside each mechanism alone, on every task.

Variants (trained per task and seed; runs with the same name and config as in
``sweep_pruning.py`` / ``ablate_moe.py`` / ``ablate_depth.py`` are loaded from the shared cache):

* ``dense``: the reference;
* ``pruning``: learned token pruning (the sweep's training recipe), hard threshold 0.5, and the
  budget rule with compaction at the sweep's middle budget;
* ``moe``: 8 experts of half the MLP, top-2, plus 4 zero-compute (identity) experts;
* ``mod``: Mixture-of-Depths, capacity 1/4 on every second block, causal predictor at inference;
* ``exit``: early exit after every block, softmax-margin confidence > 0.9;
* ``combined``: all of the above in one model (pruning by threshold, as compaction does not
  combine with adaptive depth), evaluated without and with early exit.

Each point records the total token reduction factor from the ledger, quality and relative loss.

    python experiments/combined.py --preset cpu
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import ablate_depth, ablate_moe  # noqa: E402
from experiments import common as C  # noqa: E402
from experiments import sweep_pruning  # noqa: E402
from experiments.runner import Variant, best_point, parse, run_ablation  # noqa: E402

NAME = "combined"
TASKS = {"smoke": ("mqar",), "cpu": C.TASKS, "tpu": C.TASKS}
EXIT_POINT = {"depth.mode": "infer", "depth.exit_confidence": "margin", "depth.exit_threshold": 0.9}
NO_EXIT = {"depth.mode": "infer", "depth.exit_confidence": "margin", "depth.exit_threshold": 1.0}


def variants(preset: str) -> list[Variant]:
    sw = sweep_pruning.SWEEPS[preset]
    prune = sweep_pruning.pruning_overrides(sw, C.sizes(preset).train["steps"])
    moe = {**ablate_moe.base_moe(preset), "model.moe.num_zero_experts": 4}
    mod = ablate_depth.mod(0.25, "every:2:1")
    exits = {"model.depth.exit_enabled": True, "model.depth.exit_layers": "all"}
    hard = {"pruning.mode": "hard", "pruning.inference_rule": "threshold", "pruning.threshold": 0.5}
    mid = sorted(sw.budgets)[len(sw.budgets) // 2]
    compact = {"pruning.mode": "hard", "pruning.inference_rule": "budget", "pruning.budget": mid, "pruning.compaction": True}
    predictor = {"depth.mode": "infer", "depth.mod_inference": "predictor"}
    out = [
        Variant("dense", {}),
        Variant("pruning", prune, (("threshold0.5", hard), (f"budget{mid}+compact", compact)), run_name="learned"),
        Variant("moe", moe, run_name="zero4"),
        Variant("mod", mod, (("predictor", predictor),), run_name=ablate_depth.MOD_VARIANT),
        Variant("exit", exits, (("margin>0.9", EXIT_POINT),), run_name=ablate_depth.EXIT_VARIANT),
        Variant("combined", {**prune, **moe, **mod, **exits},
                (("threshold0.5+predictor", {**hard, **predictor, **NO_EXIT}),
                 ("threshold0.5+predictor+exit", {**hard, **predictor, **EXIT_POINT}))),
    ]
    if preset == "smoke":  # the end-to-end check: the reference and everything together
        return [v for v in out if v.name in ("dense", "combined")]
    return out


def main(argv=None) -> list[dict]:
    args, argv = parse(__doc__.splitlines()[0], argv)
    tasks = C.selected_tasks(args, TASKS[args.preset])
    seeds = args.seeds or (1 if args.preset in ("cpu", "smoke") else C.sizes(args.preset).seeds)
    records = run_ablation(NAME, args, argv, variants(args.preset), tasks, seeds,
                           means=("moe_zero_share",))
    for task in tasks:
        best = best_point(records, task)
        C.log(f"{task}: largest total token reduction within 2% loss: "
              + (f"{best['trf_mean']:.3f} ({best['variant']}, {best['point']})" if best else "none"))
    return records


if __name__ == "__main__":
    main()
