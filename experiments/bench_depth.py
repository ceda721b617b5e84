"""Mixture-of-Depths step time vs dense, as a fraction of the ledger's ideal speedup.

Both models have the same dims (cpu-small: d_model 128, 4 layers) at a long sequence, where the
routed blocks dominate the compute; MoD routes capacity 12.5% on every other block (layers 1, 3).
The two jitted train steps (forward + backward + AdamW) are timed interleaved in one process, so
load from other processes hits both alike; the median step time of each is used.

    ideal speedup    = ledger FLOPs of the dense forward / ledger FLOPs of the MoD forward
    measured speedup = dense step time / MoD step time
    fraction         = measured / ideal                        (target >= 0.8)

The ledger prices a forward pass; a train step costs about 3x the forward for both models, so the
ratio carries over. ``computed`` FLOPs (all query-key pairs the XLA kernel evaluates) are the
headline; the causal-``ideal`` variant is reported beside it.

    PYTHONPATH=. python experiments/bench_depth.py --json experiments/results/bench_depth.json
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np

from ling_jax.config import DepthConfig, get_preset
from ling_jax.ledger import ledger_from_intermediates
from ling_jax.model import Transformer, forward_with_stats
from ling_jax.provenance import Provenance
from ling_jax.timing import median_times
from ling_jax.train import init_state, make_train_step


def build(seq_len: int, batch: int, depth: DepthConfig):
    config = get_preset("cpu-small")
    model_cfg = dataclasses.replace(config.model, max_seq_len=seq_len, depth=depth)
    train_cfg = dataclasses.replace(config.train, batch_size=batch, seq_len=seq_len)
    return dataclasses.replace(config, model=model_cfg, train=train_cfg)


def forward_flops(config, state, tokens) -> tuple[float, float]:
    model = Transformer(config.model)
    _, inter = jax.jit(lambda v, t: forward_with_stats(model, v, t))(state.variables(), tokens)
    ledger = ledger_from_intermediates(config.model, inter)
    return ledger.computed, ledger.ideal


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--capacity", type=float, default=0.125)
    parser.add_argument("--layers", default="every:2:1")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model")
    parser.add_argument("--json", type=str, default="")
    args = parser.parse_args(argv)
    prov = Provenance("experiments/bench_depth.py", argv)

    configs = {
        "dense": build(args.seq_len, args.batch, DepthConfig()),
        "mod": build(args.seq_len, args.batch, DepthConfig(mod_enabled=True, mod_layers=args.layers,
                                                           mod_capacity=args.capacity)),
    }
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(args.batch, args.seq_len + 1), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((args.batch, args.seq_len), np.float32),
             "oracle_mask": np.zeros((args.batch, args.seq_len), bool)}
    steps, states, flops = {}, {}, {}
    for name, config in configs.items():
        model = Transformer(config.model)
        states[name] = jax.jit(lambda k, c=config, m=model: init_state(c, m, k))(jax.random.key(0))
        flops[name] = forward_flops(config, states[name], batch["inputs"])
        steps[name] = jax.jit(make_train_step(config, model))
        for _ in range(2):  # compile + warm up
            states[name], m = steps[name](states[name], batch)
            jax.block_until_ready(m)

    # interleaved, so background load affects both alike
    t = median_times({name: (steps[name], (states[name], batch)) for name in configs}, args.steps)
    t_dense, t_mod = t["dense"], t["mod"]
    measured = t_dense / t_mod
    ideal = flops["dense"][0] / flops["mod"][0]
    ideal_causal = flops["dense"][1] / flops["mod"][1]
    result = {
        "seq_len": args.seq_len, "batch_size": args.batch, "mod_capacity": args.capacity, "mod_layers": args.layers,
        "dense_step_s": t_dense, "mod_step_s": t_mod, "measured_speedup": measured,
        "ideal_speedup": ideal, "ideal_speedup_causal": ideal_causal,
        "mod_fraction_of_ideal_causal": measured / ideal_causal,
        "mod_fraction_of_ideal": measured / ideal,
    }
    for key, value in result.items():
        print(f"{key:32s} {value:.4g}" if isinstance(value, float) else f"{key:32s} {value}")
    if args.json:
        prov.write(args.json, result, config=configs)
    print(f"mod_fraction_of_ideal {result['mod_fraction_of_ideal']:.3f}")
    return result


if __name__ == "__main__":
    main()
