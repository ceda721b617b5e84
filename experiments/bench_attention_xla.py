"""The ``xla`` attention path: head-major jnp (``xla_attention``) vs ``jax.nn.dot_product_attention``.

Forward + backward of the attention core at a preset's training shapes (batch, seq_len, heads,
KV heads, head_dim), causal mask, without and with the soft-pruning bias (what
``cpu-small-pruned`` trains with). Both programs are timed round-robin in one run (median of
``--repeats``), so the ratio holds on a shared machine where absolute times are noise.

    python experiments/bench_attention_xla.py --preset cpu-small --json experiments/results/bench_attention_xla.json

Headline: ``ratio_dpa_over_head_major_bias`` (> 1: dot_product_attention is slower).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make `ling_jax` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ling_jax.config import get_preset
from ling_jax.layers.attention import AttentionMask, dpa_attention, xla_attention


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    wall_start, load_start = time.perf_counter(), os.getloadavg()[0]
    config = get_preset(args.preset)
    m, t = config.model, config.train
    b, s, h, hkv, d = t.batch_size, t.seq_len, m.num_heads, m.num_kv_heads, m.resolved_head_dim
    kq, kk, kv, kb, kg = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(key, (b, s, n, d)) for key, n in ((kq, h), (kk, hkv), (kv, hkv)))
    cot = jax.random.normal(kg, (b, s, h, d))
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    mask = AttentionMask.causal_self(positions).replace(kv_log_keep=jax.nn.log_sigmoid(jax.random.normal(kb, (b, s))))

    def program(fn, with_bias: bool):
        def loss(q, k, v, mask):
            dense, bias = mask.dense()
            return jnp.sum(fn(q, k, v, dense, bias if with_bias else None) * cot)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    result: dict = {}
    for with_bias in (False, True):
        fns = {"head_major": program(xla_attention, with_bias), "dpa": program(dpa_attention, with_bias)}
        for fn in fns.values():
            jax.block_until_ready(fn(q, k, v, mask))
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(q, k, v, mask))
                times[name].append(time.perf_counter() - start)
        tag = "bias" if with_bias else "nobias"
        med = {name: float(np.median(ts)) for name, ts in times.items()}
        result.update({f"{name}_s_{tag}": value for name, value in med.items()})
        result[f"ratio_dpa_over_head_major_{tag}"] = med["dpa"] / med["head_major"]
    result.update({
        "command": "python " + " ".join(shlex.quote(a) for a in
                                        ["experiments/bench_attention_xla.py", *(sys.argv[1:] if argv is None else argv)]),
        "git_revision": _git_revision(),
        "config": {"preset": args.preset, "batch_size": b, "seq_len": s, "num_heads": h, "num_kv_heads": hkv,
                   "head_dim": d, "repeats": args.repeats, "backend": jax.default_backend()},
        "jax_version": jax.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_1min_start": load_start,
        "wall_s": time.perf_counter() - wall_start,
    })
    for key, value in result.items():
        print(f"{key:>36}: {value:.4g}" if isinstance(value, float) else f"{key:>36}: {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ratio_dpa_over_head_major_bias = {result['ratio_dpa_over_head_major_bias']:.3f}")
    return result


if __name__ == "__main__":
    main()
