"""Adaptive-depth ablation: Mixture-of-Depths capacity and routed-block pattern, early-exit thresholds
and confidence kinds.

Trained variants (per task and seed, beside the dense reference):

* Mixture-of-Depths at capacities 1/8, 1/4, 1/2 on every second block (``every:2:1``), and at 1/4
  on every block from the second (``from:1``). Each is evaluated with the causal inference rule
  (the trained predictor), with a router-score threshold, and with the training rule (top-k over
  the whole sequence, which reads future tokens: an upper bound, not a deployable decoder);
* early exit with an exit head after every block, trained once, evaluated at a sweep of exit
  thresholds for each confidence kind (softmax margin, hidden-state saturation, learned classifier).

Each point records quality, relative quality loss, token reduction factor (ledger), layers used
per token and prefill time relative to dense. For the code corpus it also stores, per token of a
sample, how many blocks it went through (MoD and early exit), for the pictures.

    python experiments/ablate_depth.py --preset cpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import common as C  # noqa: E402
from experiments.runner import Variant, parse, run_ablation  # noqa: E402

NAME = "ablate_depth"
TASKS = {"smoke": ("text",), "cpu": ("text",), "tpu": C.TASKS}
MEANS = ()
EXIT_THRESHOLDS = {
    "margin": (0.99, 0.95, 0.9, 0.8, 0.6),
    "saturation": (0.999, 0.995, 0.99, 0.98, 0.95),
    "classifier": (0.95, 0.9, 0.8, 0.7, 0.5),
}
SMOKE_THRESHOLDS = {"margin": (0.9,)}
MOD_VARIANT = "mod_c0.25_every2"
EXIT_VARIANT = "exit_all"


def mod(capacity: float, layers: str) -> dict:
    return {"model.depth.mod_enabled": True, "model.depth.mod_capacity": capacity, "model.depth.mod_layers": layers}


def mod_points(preset: str = "cpu") -> tuple:
    infer = {"depth.mode": "infer"}
    predictor = (("predictor", {**infer, "depth.mod_inference": "predictor"}),)
    if preset == "smoke":
        return predictor
    return predictor + (
        ("threshold0.5", {**infer, "depth.mod_inference": "threshold", "depth.mod_threshold": 0.5}),
        ("topk (non-causal)", {**infer, "depth.mod_inference": "topk"}))


def exit_points(preset: str) -> tuple:
    sweep = SMOKE_THRESHOLDS if preset == "smoke" else EXIT_THRESHOLDS
    points = [("no exit", {"depth.mode": "infer", "depth.exit_threshold": 1.0, "depth.exit_confidence": "margin"})]
    for kind, thresholds in sweep.items():
        for thr in thresholds:
            points.append((f"{kind}>{thr}", {"depth.mode": "infer", "depth.exit_confidence": kind,
                                             "depth.exit_threshold": thr}))
    return tuple(points)


def variants(preset: str) -> list[Variant]:
    out = [Variant("dense", {})]
    capacities = (0.25,) if preset == "smoke" else (0.125, 0.25, 0.5)
    for c in capacities:
        out.append(Variant(f"mod_c{c}_every2", mod(c, "every:2:1"), mod_points(preset)))
    if preset != "smoke":
        out.append(Variant("mod_c0.25_from1", mod(0.25, "from:1"), mod_points(preset)))
    out.append(Variant(EXIT_VARIANT, {"model.depth.exit_enabled": True, "model.depth.exit_layers": "all"},
                       exit_points(preset)))
    return out


# ----------------------------------------------------------------------------- layers used per token


def layers_used(trained: C.Trained, overrides: dict, tokens) -> list[int]:
    """Blocks that updated each token of ``tokens`` [T] under the inference overrides."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ling_jax.model import Transformer

    cfg = C.with_model(trained.model, overrides)
    run = jax.jit(lambda variables, x: Transformer(cfg).apply(variables, x, mutable=["intermediates", "depth"])[1])
    depth = jax.device_get(run(trained.variables, jnp.asarray(tokens)[None])).get("depth", {})
    t = len(tokens)
    exit_layer = np.asarray(depth["exit_layer"][0][0]) if "exit_layer" in depth else np.full(t, cfg.num_layers - 1)
    used = np.zeros(t, np.int64)
    for i in range(cfg.num_layers):
        runs = exit_layer >= i
        sub = depth.get(f"block_{i}_depth", {})
        if i in cfg.mod_layers and "mod_routed" in sub:
            runs = runs & np.asarray(sub["mod_routed"][0][0]).astype(bool)
        used += runs
    return used.tolist()


def picture(task: str, trained: dict, batches: list, out: Path) -> None:
    if task != "text":
        return
    import numpy as np

    tokens = np.asarray(batches[0]["inputs"][0])
    rows = {}
    if MOD_VARIANT in trained:
        rows["MoD c=1/4 (predictor)"] = layers_used(trained[MOD_VARIANT], dict(mod_points()[0][1]), tokens)
    if EXIT_VARIANT in trained:
        rows["exit margin>0.9"] = layers_used(trained[EXIT_VARIANT], {"depth.mode": "infer", "depth.exit_threshold": 0.9,
                                                                    "depth.exit_confidence": "margin"}, tokens)
    num_layers = next(iter(trained.values())).model.num_layers
    (out / "depth_layers_used.json").write_text(json.dumps(
        {"task": task, "tokens": tokens.tolist(), "rows": rows, "num_layers": num_layers,
         "title": "code sample (Mixture-of-Depths; early exit)"}) + "\n")


def picture_files(task: str) -> tuple[str, ...]:
    return ("depth_layers_used.json",) if task == "text" else ()


def main(argv=None) -> list[dict]:
    args, argv = parse(__doc__.splitlines()[0], argv)
    tasks = C.selected_tasks(args, TASKS[args.preset])
    seeds = args.seeds or (1 if args.preset in ("cpu", "smoke") else C.sizes(args.preset).seeds)  # cpu: time budget
    records = run_ablation(NAME, args, argv, variants(args.preset), tasks, seeds, picture=picture,
                           picture_files=picture_files)
    for task in tasks:
        agg = C.aggregate([r for r in records if r["task"] == task], ("variant", "point"),
                          ("quality", "rel_loss", "trf", "layers_per_token"))
        for a in agg:
            C.log(f"{task} {a['variant']} [{a['point']}]: quality {a['quality_mean']:.4f}  "
                  f"rel loss {a['rel_loss_mean']:+.2%}  token reduction {a['trf_mean']:.3f}  "
                  f"layers/token {a['layers_per_token_mean']:.2f}")
    return records


if __name__ == "__main__":
    main()
