"""MoE vs dense on the default code corpus, at equal active parameters and equal steps.

    python experiments/moe_vs_dense.py --json experiments/results/moe_vs_dense.json

Both models start from the ``cpu-small`` preset (d_model 128, 4 layers, batch 16 x 128 bytes of
the Python standard library sources) and train the same number of steps on the same batches:

* **dense**: every layer a SwiGLU MLP of ``mlp_dim`` (384) hidden units;
* **moe**: every layer 8 routed experts (top-2) + 1 shared expert, each of ``mlp_dim / 3`` (128)
  hidden units, so a token's active FFN is 3 x 128 = 384 units, the dense MLP's size (the router
  adds 8 x d_model weights per layer). Softmax router (renormalised top-2 weights) balanced by the
  aux-loss-free bias alone (``bias_update_rate`` 0.001, no load-balance loss), dropless ``sorted``
  dispatch. (``--router sigmoid`` for the DeepSeek-V3 scores: 1.9791 vs dense 1.9726 at 800 steps,
  where softmax gave 1.9706. One seed each: differences of 0.1-0.3% are not shown to be significant.)

Reported (printed and written as one flat JSON object): validation bits per byte of both, their
difference, total and active parameter counts, ledger FLOPs per token, and the MoE's max/mean
expert load at the end of training: the final model's loads summed over the last 20 training
batches (what the bias balances), per layer, the headline being the worst layer; the same on the
validation split (other files: the last layer's routing follows content, so it is less even there).
Acceptance: ``moe_bpb < dense_bpb`` and ``moe_max_mean_load <= 1.3``.

Cost: a train step takes ~0.25 s of CPU for either model, so the default 800 steps x 2 models take
~8-9 minutes on 2 idle cores (compile and evaluation included); on the team machine under load 10-15
each model took ~15 minutes of wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ling_jax.config import Config, apply_overrides, get_preset  # noqa: E402
from ling_jax.layers.moe_routers import max_mean_load  # noqa: E402
from ling_jax.ledger import ledger_from_intermediates, param_count  # noqa: E402
from ling_jax.model import forward_with_stats  # noqa: E402
from ling_jax.pipeline import build_data  # noqa: E402
from ling_jax.provenance import Provenance  # noqa: E402
from ling_jax.runs import train_or_load  # noqa: E402
from ling_jax.train import load_trained  # noqa: E402


def configs(a) -> dict[str, Config]:
    base = apply_overrides(get_preset("cpu-small"), {"train.steps": a.steps, "train.seed": a.seed,
                                                     "train.checkpoint_every": a.steps})
    mlp = base.model.mlp_dim
    moe = {"model.moe.enabled": True, "model.moe.num_experts": 8, "model.moe.top_k": 2,
           "model.moe.num_shared_experts": 1, "model.moe.expert_dim": mlp // 3, "model.moe.layers": "all",
           "model.moe.router": a.router, "model.moe.bias_update_rate": a.bias_rate,
           "model.moe.load_balance_weight": 0.0, "model.moe.dispatch": "sorted"}
    return {"dense": base, "moe": apply_overrides(base, moe)}


def active_params(cfg: Config, total: int) -> int:
    """Parameters a token uses: all but the routed experts it does not pick."""
    m = cfg.model.moe
    if not m.enabled:
        return total
    per_expert = 3 * cfg.model.d_model * (m.expert_dim or cfg.model.mlp_dim)
    return total - len(cfg.model.moe_layers) * (m.num_experts - m.top_k) * per_expert


def final_loads(workdir: Path, last_steps: int = 20) -> tuple[dict, dict, float]:
    """Max/mean expert load per MoE layer of the trained model, on its last training batches and on
    all validation batches (loads summed over the batches); validation ledger FLOPs per token."""
    cfg, model, state = load_trained(workdir)
    fwd = jax.jit(lambda v, tokens: forward_with_stats(model, v, tokens))
    variables = state.variables()
    data = build_data(cfg)
    num_x = cfg.model.moe.num_experts

    def loads_over(batches, ledger=False):
        loads: dict[str, np.ndarray] = {}
        flops, tokens = 0.0, 0
        for batch in batches:
            _, inter = fwd(variables, batch.inputs)
            for name, block in inter.items():
                if "moe" in block:
                    loads[name] = loads.get(name, 0) + np.asarray(block["moe"]["moe_load"][0])
            if ledger:
                flops += ledger_from_intermediates(cfg.model, inter).computed
                tokens += batch.inputs.size
        return {k: float(max_mean_load(v[:num_x])) for k, v in sorted(loads.items())}, flops / max(tokens, 1)

    steps = cfg.train.steps
    train_loads, _ = loads_over(data.train_batch(s) for s in range(max(0, steps - last_steps), steps))
    valid_loads, flops_per_token = loads_over(data.eval_batches(), ledger=True)
    return train_loads, valid_loads, flops_per_token


def _final_eval(workdir: Path) -> dict:
    """The final evaluation ``ling_jax.train.train`` logged in the workdir's metrics.jsonl."""
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {k[len("eval_"):]: v for k, v in lines[-1].items() if k.startswith("eval_")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bias-rate", dest="bias_rate", type=float, default=0.001)
    p.add_argument("--router", default="softmax", choices=("softmax", "sigmoid"))
    p.add_argument("--workdir", default="", help="keep the runs here (default: a temporary directory)")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    prov = Provenance("experiments/moe_vs_dense.py", argv)

    root = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="moe_vs_dense_"))
    result: dict = {"preset": "cpu-small", "steps": a.steps, "seed": a.seed, "bias_update_rate": a.bias_rate,
                    "router": a.router}
    start = time.perf_counter()
    runs = configs(a)
    for name, cfg in runs.items():
        t0 = time.perf_counter()
        train_or_load(cfg, root / name)
        _, model, state = load_trained(root / name)
        final = _final_eval(root / name)
        total = param_count(state.params)
        result[f"{name}_bpb"] = final["bpb"]
        result[f"{name}_params"] = total
        result[f"{name}_active_params"] = active_params(cfg, total)
        train_loads, valid_loads, flops_per_token = final_loads(root / name)
        result[f"{name}_flops_per_token"] = flops_per_token
        result[f"{name}_train_seconds"] = time.perf_counter() - t0
        if train_loads:
            result["moe_max_mean_load_per_layer"] = train_loads
            result["moe_max_mean_load"] = max(train_loads.values())
            result["moe_max_mean_load_validation_per_layer"] = valid_loads
            result["moe_max_mean_load_validation"] = max(valid_loads.values())
        print(f"{name:5s} bpb {final['bpb']:.4f}  params {total:,} (active {result[f'{name}_active_params']:,})  "
              f"{result[f'{name}_train_seconds']:.0f}s", flush=True)
    result["bpb_gain"] = result["dense_bpb"] - result["moe_bpb"]
    result["moe_beats_dense"] = result["moe_bpb"] < result["dense_bpb"]
    result["balanced"] = result["moe_max_mean_load"] <= 1.3
    result["seconds"] = time.perf_counter() - start
    if a.json:
        prov.write(a.json, result, config=runs, checkpoints=[root / name for name in runs], indent=1)
    print(f"moe max/mean expert load per layer, last {20} training batches: {result['moe_max_mean_load_per_layer']}")
    print(f"moe max/mean expert load per layer, validation: {result['moe_max_mean_load_validation_per_layer']}")
    print(f"dense bpb {result['dense_bpb']:.4f}  moe bpb {result['moe_bpb']:.4f}  "
          f"gain {result['bpb_gain']:+.4f}  moe max/mean load {result['moe_max_mean_load']:.3f} "
          f"(validation {result['moe_max_mean_load_validation']:.3f})")
    return result


if __name__ == "__main__":
    main()
