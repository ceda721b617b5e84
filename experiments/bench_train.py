"""Train-step throughput and achieved FLOP/s as a fraction of a large float32 matmul's FLOP/s.

Both are measured in the same run, so the ratio is meaningful on a shared machine where
absolute times are noise. Model FLOPs = 3 x the ledger's forward FLOPs (forward + backward).

    python experiments/bench_train.py --preset cpu-small --json experiments/results/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.config import apply_overrides, get_preset
from ling_jax.ledger import ledger_from_intermediates
from ling_jax.model import Transformer, forward_with_stats
from ling_jax.train import init_state, make_train_step


def _time(fn, *args, repeats: int) -> float:
    """Median wall time of fn(*args) after one warm-up call (blocks on the result)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_flops_per_sec(n: int, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    return 2.0 * n**3 / _time(f, a, b, repeats=repeats)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args(argv)

    config = apply_overrides(get_preset(args.preset), args.overrides)
    t = config.train
    model = Transformer(config.model)
    state = init_state(config, model, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (t.batch_size, t.seq_len), 0, config.model.vocab_size)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
             "loss_mask": jnp.ones(tokens.shape, jnp.float32), "oracle_mask": jnp.zeros(tokens.shape, bool)}

    _, inter = forward_with_stats(model, {"params": state.params, **state.extra}, tokens)
    train_flops = 3.0 * ledger_from_intermediates(config.model, inter).computed

    step = jax.jit(make_train_step(config, model))
    step_time = _time(lambda s: step(s, batch)[1]["loss"], state, repeats=args.steps)
    peak = matmul_flops_per_sec(args.matmul_size, repeats=5)
    step_time = min(step_time, _time(lambda s: step(s, batch)[1]["loss"], state, repeats=args.steps))

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
    for key, value in result.items():
        print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"fraction_of_matmul_peak = {result['fraction_of_matmul_peak']:.3f}")
    return result


if __name__ == "__main__":
    main()
