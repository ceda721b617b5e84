"""MoE dispatch throughput as a fraction of a dense matmul with the same active FLOPs.

    python experiments/bench_moe.py --json experiments/results/bench_moe.json

For experts X in {8, 32, 64} and top-k in {1, 2, 8}, one jitted MoE forward on T tokens
(router matmul, softmax top-k routing, dispatch, expert SwiGLUs, weighted combine) is timed for
each dispatch impl against ONE dense matmul ``x [T, D] @ W [D, 3 F k + X]``, which does exactly
the MoE's active FLOPs (experts ``6 D F k`` + router ``2 D X`` per token). The figure per impl is
``t_dense / t_impl`` (1.0 = as fast as the ideal dense computation of the same FLOPs).

Impls: ``sorted`` (dropless; the CPU path), ``dense`` (GShard one-hot dispatch, capacity factor
1.25; skipped where its ``[T, X, C]`` dispatch tensor would exceed ``--dense-limit`` elements),
``reference`` (per-expert loop: costs X / k times the active FLOPs; only for X <= ``--reference-max``)
and ``pallas`` (the grouped-matmul kernel; on CPU it only runs in interpret mode, an emulator, so
it is not timed here: ``null``).

Timing: the dense matmul and every impl are called in interleaved rounds; a figure is the ratio of
their fastest rounds (on a shared machine other jobs only ever slow a call down). By default XLA runs single-threaded (``--threads 1``) and the figure is the ratio of
process CPU times: the work efficiency per core, which other jobs on a shared machine do not
distort (with several threads, a contended core stalls the dense matmul's thread barrier and the
ratio drifts in the MoE's favour). Wall-clock ratios are recorded too (``..._wall``).
``--threads 0`` keeps XLA's default threading (then wall-clock is the headline).

For top-k >= 2 the dense matmul's ``[T, 3Fk]`` output (>= 16 MB) no longer stays in cache and it
runs well below the machine's matmul rate, so an MoE (whose per-expert tiles do) can exceed 1.0.
``..._vs_peak`` therefore also compares each impl with a cache-friendly ``[T, D] @ [D, 3F]``
matmul, scaled by FLOPs: the fraction of the machine's dense matmul FLOP rate the MoE reaches
(``best_fraction_of_peak``: the minimum over configurations of the best impl's).
``best_fraction_of_dense`` is the minimum over configurations of the best impl's fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _single_threaded_xla() -> None:
    """Must run before jax is imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _threads_arg(argv) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=1)
    return pre.parse_known_args(argv)[0].threads


if __name__ == "__main__" and _threads_arg(sys.argv[1:]) == 1:
    _single_threaded_xla()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ling_jax.layers import moe_routers as routers  # noqa: E402
from ling_jax.layers.moe_dispatch import capacity_keep, dispatch, expert_capacity  # noqa: E402

EXPERTS = (8, 32, 64)
TOP_KS = (1, 2, 8)


def moe_forward(impl: str, top_k: int, capacity_factor: float):
    """Router + routing + dispatch of one MoE layer (no shared experts, no losses)."""

    def fn(x, router, w_gate, w_up, w_down):
        n, num_x = x.shape[0], w_gate.shape[0]
        r = routers.route(x.astype(jnp.float32) @ router, kind="softmax", top_k=top_k)
        cap = expert_capacity(n, top_k, num_x, capacity_factor)
        active = capacity_keep(r.ids, jnp.ones(r.ids.shape, bool), num_x, cap)
        return dispatch(x, r.ids, r.weights, active, w_gate, w_up, w_down, impl=impl, capacity=cap)

    return jax.jit(fn)


def interleaved(fns: dict, args: dict, rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    """(wall, cpu) seconds of every call of each function over interleaved rounds (after a warm-up)."""
    for name, f in fns.items():
        jax.block_until_ready(f(*args[name]))
    times = {name: ([], []) for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(f(*args[name]))
            times[name][0].append(time.perf_counter() - w0)
            times[name][1].append(time.process_time() - c0)
    return times


def ratio(base: list[float], other: list[float]) -> float:
    """Fastest base call / fastest other call: other jobs only ever slow a call down."""
    return float(np.min(base) / np.min(other))


def bench_config(num_x: int, top_k: int, a) -> dict:
    t, d, f = a.tokens, a.d_model, a.expert_dim
    keys = jax.random.split(jax.random.key(num_x * 100 + top_k), 6)
    x = jax.random.normal(keys[0], (t, d), jnp.float32)
    router = jax.random.normal(keys[1], (d, num_x), jnp.float32) * d**-0.5
    w_gate = jax.random.normal(keys[2], (num_x, d, f), jnp.float32) * d**-0.5
    w_up = jax.random.normal(keys[3], (num_x, d, f), jnp.float32) * d**-0.5
    w_down = jax.random.normal(keys[4], (num_x, f, d), jnp.float32) * f**-0.5
    w_dense = jax.random.normal(keys[5], (d, 3 * f * top_k + num_x), jnp.float32) * d**-0.5
    moe_args = (x, router, w_gate, w_up, w_down)

    w_peak = w_dense[:, : 3 * f]  # a [T, 3F] output stays cache-friendly: the machine's matmul rate
    fns = {"dense_matmul": jax.jit(jnp.matmul), "peak_matmul": jax.jit(jnp.matmul)}
    args = {"dense_matmul": (x, w_dense), "peak_matmul": (x, w_peak)}
    fns["sorted"], args["sorted"] = moe_forward("sorted", top_k, 0.0), moe_args
    cap = expert_capacity(t, top_k, num_x, a.capacity_factor)
    if t * num_x * cap <= a.dense_limit:
        fns["dense"], args["dense"] = moe_forward("dense", top_k, a.capacity_factor), moe_args
    if num_x <= a.reference_max:
        fns["reference"], args["reference"] = moe_forward("reference", top_k, 0.0), moe_args
    times = interleaved(fns, args, a.rounds)
    wall0, cpu0 = times.pop("dense_matmul")
    wallp, cpup = times.pop("peak_matmul")
    flop_ratio = (3 * f * top_k + num_x) / (3 * f)  # active FLOPs / peak-matmul FLOPs
    use_cpu = a.threads == 1
    out = {f"e{num_x}_k{top_k}_dense_matmul_ms": 1e3 * float(np.min(cpu0 if use_cpu else wall0))}
    for impl in ("sorted", "dense", "reference", "pallas"):
        key = f"e{num_x}_k{top_k}_{impl}"
        if impl not in times:
            out[key] = out[key + "_wall"] = out[key + "_vs_peak"] = None
            continue
        wall, cpu = times[impl]
        out[key] = ratio(cpu0, cpu) if use_cpu else ratio(wall0, wall)
        out[key + "_wall"] = ratio(wall0, wall)
        out[key + "_vs_peak"] = flop_ratio * (ratio(cpup, cpu) if use_cpu else ratio(wallp, wall))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per forward (batch x length)")
    p.add_argument("--d-model", dest="d_model", type=int, default=256)
    p.add_argument("--expert-dim", dest="expert_dim", type=int, default=256)
    p.add_argument("--experts", type=int, nargs="+", default=list(EXPERTS))
    p.add_argument("--top-k", dest="top_k", type=int, nargs="+", default=list(TOP_KS))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--capacity-factor", dest="capacity_factor", type=float, default=1.25, help="for impl=dense")
    p.add_argument("--dense-limit", dest="dense_limit", type=float, default=1.5e8,
                   help="skip impl=dense when T * X * capacity exceeds this")
    p.add_argument("--reference-max", dest="reference_max", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, choices=(0, 1),
                   help="1: single-threaded XLA, CPU-time ratios (default); 0: XLA default threads, wall-clock")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)

    result: dict = {"backend": jax.default_backend(), "tokens": a.tokens, "d_model": a.d_model,
                    "expert_dim": a.expert_dim, "rounds": a.rounds, "threads": a.threads,
                    "timing": "process CPU time, single-threaded XLA" if a.threads == 1 else "wall clock",
                    "load_average_1min": os.getloadavg()[0]}
    best, best_wall, best_peak = {}, {}, {}
    start = time.perf_counter()
    for num_x in a.experts:
        for top_k in a.top_k:
            r = bench_config(num_x, top_k, a)
            result.update(r)
            name = f"e{num_x}_k{top_k}"
            impls = {k[len(name) + 1:]: v for k, v in r.items()
                     if v is not None and not k.endswith(("_wall", "_ms", "_vs_peak"))}
            best[name] = max(impls.values())
            best_wall[name] = max(v for k, v in r.items() if k.endswith("_wall") and v is not None)
            best_peak[name] = max(v for k, v in r.items() if k.endswith("_vs_peak") and v is not None)
            shown = "  ".join(f"{k}={v:.2f}" for k, v in impls.items())
            print(f"{name:8s} dense matmul {r[name + '_dense_matmul_ms']:8.2f} ms   {shown}   "
                  f"(best: wall-clock {best_wall[name]:.2f}, vs peak rate {best_peak[name]:.2f})", flush=True)
    result["best_fraction_of_dense"] = min(best.values())
    result["best_fraction_of_dense_wall"] = min(best_wall.values())
    result["best_fraction_of_peak"] = min(best_peak.values())
    result["seconds"] = time.perf_counter() - start
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1)
    print(f"best_fraction_of_dense_wall = {result['best_fraction_of_dense_wall']:.3f}")
    print(f"best_fraction_of_peak = {result['best_fraction_of_peak']:.3f}")
    print(f"best_fraction_of_dense = {result['best_fraction_of_dense']:.3f}")
    return result


if __name__ == "__main__":
    main()
