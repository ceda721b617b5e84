"""Train-step throughput and achieved FLOP/s as a fraction of a large float32 matmul's FLOP/s.

Both are measured in the same run, so the ratio is meaningful on a shared machine where
absolute times are noise. Model FLOPs = 3 x the ledger's forward FLOPs (forward + backward).

    python experiments/bench_train.py --preset cpu-small --json experiments/results/bench_train.json

``--profile`` adds a breakdown of the step (``experiments/train_profile.py``): the projection
matmuls, attention core and its softmax, norms, rotary embeddings, embedding + loss, optimizer
update and host data time, each as a jitted program timed side by side with the step:

    python experiments/bench_train.py --preset cpu-small --profile --json experiments/results/bench_train_profile_cpu_small.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

if __package__ in (None, ""):  # run as a script: make `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ling_jax.config import apply_overrides, get_preset
from ling_jax.ledger import ledger_from_intermediates
from ling_jax.model import Transformer, forward_with_stats
from ling_jax.provenance import Provenance
from ling_jax.timing import median_time
from ling_jax.train import cross_entropy, init_state, make_train_step


def matmul_flops_per_sec(n: int, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    return 2.0 * n**3 / median_time(f, a, b, repeats=repeats)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", action="store_true", help="add the per-part breakdown of the step")
    parser.add_argument("--profile-repeats", type=int, default=7)
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args(argv)
    prov = Provenance("experiments/bench_train.py", argv)
    load_start = os.getloadavg()[0]

    config = apply_overrides(get_preset(args.preset), args.overrides)
    t = config.train
    model = Transformer(config.model)
    state = init_state(config, model, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (t.batch_size, t.seq_len), 0, config.model.vocab_size)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
             "loss_mask": jnp.ones(tokens.shape, jnp.float32), "oracle_mask": jnp.zeros(tokens.shape, bool)}

    _, inter = forward_with_stats(model, state.variables(), tokens)
    train_flops = 3.0 * ledger_from_intermediates(config.model, inter).computed

    step = jax.jit(make_train_step(config, model))
    step_time = median_time(lambda s: step(s, batch)[1]["loss"], state, repeats=args.steps)
    peak = matmul_flops_per_sec(args.matmul_size, repeats=5)
    step_time = min(step_time, median_time(lambda s: step(s, batch)[1]["loss"], state, repeats=args.steps))

    achieved = train_flops / step_time
    result = {
        "preset": args.preset,
        "backend": jax.default_backend(),
        "tokens_per_step": t.batch_size * t.seq_len,
        "step_time_s": step_time,
        "tokens_per_sec": t.batch_size * t.seq_len / step_time,
        "train_flops_per_step": train_flops,
        "achieved_flops_per_sec": achieved,
        "matmul_flops_per_sec": peak,
        "fraction_of_matmul_peak": achieved / peak,
    }
    if args.profile:
        from experiments.train_profile import profile_parts
        from ling_jax.pipeline import build_data

        data = build_data(config)

        def loss(params, batch):  # the model's cross-entropy (no aux losses: the profile is for dense presets)
            logits, _ = model.apply({"params": params, **state.extra}, batch["inputs"], mutable=["intermediates"])
            return cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]

        whole = {"forward": (jax.jit(loss), (state.params, batch)),
                 "forward_backward": (jax.jit(jax.value_and_grad(loss)), (state.params, batch))}
        result.update(profile_parts(config, state.params, step, (state, batch), data.train_batch, whole=whole,
                                    repeats=args.profile_repeats, train_flops=train_flops,
                                    matmul_size=args.matmul_size))
    result.update({"cpu_count": os.cpu_count(), "load_average_1min_start": load_start,
                   "config_summary": {"model": {k: getattr(config.model, k) for k in ("d_model", "num_layers", "num_heads",
                                                                             "num_kv_heads", "mlp_dim", "vocab_size",
                                                                             "attention_impl")},
                              "batch_size": t.batch_size, "seq_len": t.seq_len, "matmul_size": args.matmul_size}})
    for key, value in result.items():
        print(f"{key:>40}: {value:.4g}" if isinstance(value, float) else f"{key:>40}: {value}")
    if args.json:
        prov.write(args.json, result, config=config)
    print(f"fraction_of_matmul_peak = {result['fraction_of_matmul_peak']:.3f}")
    return result


if __name__ == "__main__":
    main()
