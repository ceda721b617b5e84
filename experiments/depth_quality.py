"""Acceptance 3 of adaptive depth: quality at equal steps on the default code corpus.

Trains three models of the same dims for the same number of steps on the default corpus (the
Python standard library sources, byte level) with ``ling_jax.train.train``:

* ``dense``  the baseline;
* ``mod``    Mixture-of-Depths on every other block (top-k capacity in training; the block's update
             scaled by sigmoid(router score) as in the MoD paper, ``--mod-weight sigmoid``);
* ``exit``   early-exit heads after every block but the last (weighted per-layer losses; a random
             50% of tokens exit at a random exit in training, ``--exit-train-freeze``, so later
             layers learn to attend to carried-up states).

and evaluates them on the validation split:

* MoD: validation bpb with the causal predictor (what decoding uses; headline) and with top-k
  routing, FLOPs per forward from the ledger (ideal work: routed tokens and visible pairs) vs
  dense, and the predictor's agreement with top-k membership. The predictor's decision threshold
  (``--mod-predictor-threshold capacity``, the default) is set on unseen *training* batches so
  that it routes the training capacity (the ``1 - c`` quantile of its logits over the routed
  blocks): a predictor trained with BCE on a c : 1 - c split routes fewer tokens at 0.5 than the
  block was trained with. The 0.5 threshold is reported too. Target: bpb within 2% of dense with
  at least 30% fewer FLOPs.
* Early exit: for each confidence (margin, classifier, saturation) a threshold sweep on the first
  half of the validation batches picks the threshold with the fewest layers per token whose
  greedy next-token choices agree with the full model (same parameters, no exits) on at least
  ``--agreement`` of the tokens; the second half reports layers per token and agreement.
  Target: at least 1.5x fewer layers with at least 98% agreement.

    PYTHONPATH=. python experiments/depth_quality.py    # 8 layers, 600 steps: ~18 min on 2 shared cores

Writes ``experiments/results/depth_quality.json`` and prints a table; misses are reported as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.config import Config, DepthConfig, get_preset
from ling_jax.layers import depth as depth_lib
from ling_jax.layers.depth_mod import MoDRouter
from ling_jax.ledger import ledger_from_intermediates
from ling_jax.policy import inference_policy
from ling_jax.model import Transformer
from ling_jax.pipeline import build_data
from ling_jax.provenance import Provenance
from ling_jax.runs import train_or_load
from ling_jax.train import LN2, cross_entropy, load_trained

THRESHOLDS = {
    "margin": (0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.92, 0.9, 0.88, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5),
    "classifier": (0.9995, 0.999, 0.998, 0.997, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.965, 0.96, 0.955, 0.95,
                   0.94, 0.93, 0.92, 0.9, 0.85, 0.8, 0.7, 0.5),
    "saturation": (0.999, 0.998, 0.995, 0.99, 0.985, 0.98, 0.97, 0.95, 0.9),
}


def configs(args) -> dict[str, Config]:
    base = get_preset(args.preset)
    model = dataclasses.replace(base.model, num_layers=args.layers)
    tr = dataclasses.replace(base.train, steps=args.steps, checkpoint_every=args.steps, log_every=max(args.steps // 10, 1),
                             eval_batches=args.eval_batches, warmup_steps=min(base.train.warmup_steps, args.steps // 10))
    make = lambda depth: dataclasses.replace(base, model=dataclasses.replace(model, depth=depth), train=tr)
    return {
        "dense": make(DepthConfig()),
        "mod": make(DepthConfig(mod_enabled=True, mod_layers=args.mod_layers, mod_capacity=args.mod_capacity,
                                mod_weight=args.mod_weight)),
        "exit": make(DepthConfig(exit_enabled=True, exit_layers="all", exit_loss_weight=args.exit_loss_weight,
                                 exit_train_freeze=args.exit_train_freeze)),
    }


def with_depth(cfg, **changes):
    return dataclasses.replace(cfg, depth=dataclasses.replace(cfg.depth, **changes))


def _router_outputs(tree):
    """The (scores, predictor) outputs of every MoDRouter in captured intermediates."""
    for key, value in tree.items():
        if key == "__call__":
            yield value[0]
        elif isinstance(value, dict):
            yield from _router_outputs(value)


def capacity_predictor_threshold(model_cfg, state, batches, capacity: float) -> float:
    """sigmoid(predictor) threshold at which the causal predictor routes ``capacity`` of the tokens
    of ``batches`` (training mode: the router inputs the predictor was trained on)."""
    model = Transformer(model_cfg)
    is_router = lambda mdl, method: isinstance(mdl, MoDRouter) and method == "__call__"

    @jax.jit
    def predictor_logits(params, extra, tokens):
        _, st = model.apply({"params": params, **extra}, tokens, mutable=["intermediates"], capture_intermediates=is_router)
        return jnp.stack([pred for _, pred in _router_outputs(st["intermediates"])])  # [routed layers, B, T]

    logits = np.concatenate([np.asarray(predictor_logits(state.params, state.extra, b.inputs)).ravel() for b in batches])
    q = float(np.quantile(logits, 1.0 - capacity))
    return float(np.clip(1.0 / (1.0 + np.exp(-q)), 1e-4, 1 - 1e-4))


class Evaluator:
    """Jitted forward of one model config over fixed validation batches, with the depth stats."""

    def __init__(self, model_cfg, state):
        self.cfg, self.state = model_cfg, state
        model = Transformer(model_cfg)

        def fwd(params, extra, tokens, threshold):
            policy = inference_policy(model_cfg, exit_threshold=threshold)  # traced: one compile per config
            logits, st = model.apply({"params": params, **extra}, tokens, policy=policy, mutable=["intermediates", "depth"])
            return logits, st["intermediates"], st.get("depth", {}).get("layers_used", (jnp.zeros(tokens.shape, jnp.int32),))[0]

        self.fwd = jax.jit(fwd)

    def run(self, batches, threshold=1.0, reference=None) -> dict:
        nll = count = agree = layers = 0.0
        flops_ideal = flops_computed = acc_num = acc_den = 0.0
        preds = []
        for i, b in enumerate(batches):
            logits, inter, used = self.fwd(self.state.params, self.state.extra, b.inputs, jnp.float32(threshold))
            mask = b.loss_mask
            ce, n = cross_entropy(logits, b.targets, mask)
            nll, count = nll + float(ce * n), count + float(n)
            pred = np.asarray(jnp.argmax(logits, -1))
            preds.append(pred)
            if reference is not None:
                agree += float(((pred == reference[i]) * mask).sum())
            layers += float((np.asarray(used) * mask).sum()) if self.cfg.depth.mod_enabled or self.cfg.depth.exit_enabled \
                else float(mask.sum()) * self.cfg.num_layers
            ledger = ledger_from_intermediates(self.cfg, inter)
            flops_ideal += ledger.ideal
            flops_computed += ledger.computed
            acc_num += depth_lib.mod_predictor_accuracy(inter) * 1.0 if self.cfg.mod_layers else 0.0
            acc_den += 1.0
        tokens = sum(b.inputs.size for b in batches)
        return {"bpb": nll / count / LN2, "agreement": agree / count if reference is not None else 1.0,
                "layers_per_token": layers / count, "flops_per_token_ideal": flops_ideal / tokens,
                "flops_per_token_computed": flops_computed / tokens,
                "predictor_accuracy": acc_num / acc_den if self.cfg.mod_layers else float("nan"), "preds": preds}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--mod-capacity", type=float, default=0.25)
    p.add_argument("--mod-layers", default="every:2:1")
    p.add_argument("--mod-weight", default="sigmoid", choices=["straight_through", "sigmoid"])
    p.add_argument("--mod-predictor-threshold", default="capacity",
                   help="'capacity' (route the training capacity on unseen training batches) or a probability")
    p.add_argument("--exit-loss-weight", type=float, default=1.0)
    p.add_argument("--exit-train-freeze", type=float, default=0.5)
    p.add_argument("--agreement", type=float, default=0.985, help="calibration target (test target: 0.98)")
    p.add_argument("--workdir", default="", help="reuse trained models here (default: a fresh temp dir)")
    p.add_argument("--json", default="experiments/results/depth_quality.json")
    args = p.parse_args(argv)
    prov = Provenance("experiments/depth_quality.py", argv)
    start = time.perf_counter()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="depth_quality_"))

    trained, runs = {}, configs(args)
    for name, config in runs.items():
        t0 = time.perf_counter()
        train_or_load(config, workdir / name)
        trained[name] = load_trained(workdir / name)
        print(f"trained {name:5s} {config.train.steps} steps in {time.perf_counter() - t0:.0f}s", flush=True)
    batches = build_data(trained["dense"][0]).eval_batches()
    half = len(batches) // 2
    calib, test = batches[:half], batches[half:]

    # ---- Mixture-of-Depths vs dense
    dense_cfg, _, dense_state = trained["dense"]
    dense = Evaluator(dense_cfg.model, dense_state).run(batches)
    mod_cfg, _, mod_state = trained["mod"]
    if args.mod_predictor_threshold == "capacity":
        data = build_data(mod_cfg)
        unseen = [data.train_batch(args.steps + i) for i in range(8)]  # training split, after the last step
        pred_thr = capacity_predictor_threshold(mod_cfg.model, mod_state, unseen, args.mod_capacity)
    else:
        pred_thr = float(args.mod_predictor_threshold)
    infer = lambda t: with_depth(mod_cfg.model, mode="infer", mod_inference="predictor", mod_predictor_threshold=t)
    mod = Evaluator(infer(pred_thr), mod_state).run(batches)
    mod05 = Evaluator(infer(0.5), mod_state).run(batches) if pred_thr != 0.5 else mod
    mod_topk = Evaluator(mod_cfg.model, mod_state).run(batches)
    result = {
        "steps": args.steps, "num_layers": args.layers, "d_model": dense_cfg.model.d_model,
        "seq_len": dense_cfg.train.seq_len, "batch_size": dense_cfg.train.batch_size,
        "eval_tokens": int(sum(b.loss_mask.sum() for b in batches)),
        "dense_bpb": dense["bpb"], "mod_capacity": args.mod_capacity, "mod_layers": args.mod_layers,
        "mod_bpb": mod["bpb"], "mod_bpb_topk": mod_topk["bpb"], "mod_bpb_ratio": mod["bpb"] / dense["bpb"],
        "mod_flops_reduction": 1 - mod["flops_per_token_ideal"] / dense["flops_per_token_ideal"],
        "mod_flops_reduction_topk": 1 - mod_topk["flops_per_token_computed"] / dense["flops_per_token_computed"],
        "mod_predictor_accuracy": mod["predictor_accuracy"], "mod_layers_per_token": mod["layers_per_token"],
        "mod_predictor_threshold": pred_thr, "mod_bpb_predictor05": mod05["bpb"],
        "mod_bpb_ratio_predictor05": mod05["bpb"] / dense["bpb"],
        "mod_flops_reduction_predictor05": 1 - mod05["flops_per_token_ideal"] / dense["flops_per_token_ideal"],
        "mod_predictor_accuracy05": mod05["predictor_accuracy"],
    }
    result["mod_pass"] = bool(result["mod_bpb_ratio"] <= 1.02 and result["mod_flops_reduction"] >= 0.30)

    # ---- early exit: calibrate a threshold per confidence on `calib`, report on `test`
    exit_cfg, _, exit_state = trained["exit"]
    full = Evaluator(exit_cfg.model, exit_state)  # training mode: every token through every layer
    ref_calib, ref_test = full.run(calib)["preds"], full.run(test)
    result["exit_full_bpb"] = ref_test["bpb"]
    sweeps, best = {}, None
    for conf, grid in THRESHOLDS.items():
        ev = Evaluator(with_depth(exit_cfg.model, mode="infer", exit_confidence=conf), exit_state)
        rows = [(thr, ev.run(calib, thr, ref_calib)) for thr in grid]
        sweeps[conf] = [{"threshold": t, "layers_per_token": r["layers_per_token"], "agreement": r["agreement"]} for t, r in rows]
        ok = [(r["layers_per_token"], t) for t, r in rows if r["agreement"] >= args.agreement]
        thr = min(ok)[1] if ok else grid[0]
        r = ev.run(test, thr, ref_test["preds"])
        sweeps[conf + "_test"] = {"threshold": thr, **{k: v for k, v in r.items() if k != "preds"}}
        if best is None or (r["agreement"] >= 0.98, -r["layers_per_token"]) > (best[2]["agreement"] >= 0.98, -best[2]["layers_per_token"]):
            best = (conf, thr, r)
    conf, thr, r = best
    result.update({
        "exit_confidence": conf, "exit_threshold": thr, "exit_layers_per_token": r["layers_per_token"],
        "exit_layer_reduction": args.layers / r["layers_per_token"], "exit_agreement": r["agreement"],
        "exit_bpb": r["bpb"],
    })
    result["exit_pass"] = bool(result["exit_layer_reduction"] >= 1.5 and result["exit_agreement"] >= 0.98)
    for c in THRESHOLDS:
        t = sweeps[c + "_test"]
        result[f"exit_{c}_threshold"], result[f"exit_{c}_layers_per_token"] = t["threshold"], t["layers_per_token"]
        result[f"exit_{c}_agreement"] = t["agreement"]
    result["wall_s"] = time.perf_counter() - start

    print(f"\n{'model':28s} {'val bpb':>8s} {'FLOPs/token':>12s} {'layers/token':>12s} {'agreement':>9s}")
    print(f"{'dense':28s} {dense['bpb']:8.4f} {dense['flops_per_token_ideal']:12.4g} {dense['layers_per_token']:12.2f} {'':>9s}")
    print(f"{'MoD c=%g predictor > %.3f' % (args.mod_capacity, pred_thr):28s} {mod['bpb']:8.4f} "
          f"{mod['flops_per_token_ideal']:12.4g} {mod['layers_per_token']:12.2f} {'':>9s}")
    print(f"{'MoD c=%g predictor > 0.5' % args.mod_capacity:28s} {mod05['bpb']:8.4f} {mod05['flops_per_token_ideal']:12.4g} "
          f"{mod05['layers_per_token']:12.2f} {'':>9s}")
    print(f"{'MoD (top-k, non-causal)':28s} {mod_topk['bpb']:8.4f} {mod_topk['flops_per_token_computed']:12.4g} "
          f"{mod_topk['layers_per_token']:12.2f} {'':>9s}")
    print(f"{'exit model, full depth':28s} {ref_test['bpb']:8.4f} {ref_test['flops_per_token_ideal']:12.4g} "
          f"{ref_test['layers_per_token']:12.2f} {'':>9s}")
    for c in THRESHOLDS:
        t = sweeps[c + "_test"]
        print(f"{'exit %s > %g' % (c, t['threshold']):28s} {t['bpb']:8.4f} {t['flops_per_token_ideal']:12.4g} "
              f"{t['layers_per_token']:12.2f} {t['agreement']:9.4f}")
    print(f"\nMoD: bpb ratio {result['mod_bpb_ratio']:.4f} (target <= 1.02), FLOPs -{100 * result['mod_flops_reduction']:.1f}% "
          f"(target >= 30%), predictor accuracy {result['mod_predictor_accuracy']:.3f}: {'PASS' if result['mod_pass'] else 'MISS'}")
    print(f"exit: {result['exit_layer_reduction']:.2f}x fewer layers (target >= 1.5x), agreement {result['exit_agreement']:.4f} "
          f"(target >= 0.98) with {conf} > {thr}: {'PASS' if result['exit_pass'] else 'MISS'}")
    if args.json:
        prov.write(args.json, {**result, "exit_sweeps": sweeps}, config=runs,
                   checkpoints=[workdir / name for name in runs])
    print(f"wall {result['wall_s']:.0f}s")
    return result


if __name__ == "__main__":
    main()
