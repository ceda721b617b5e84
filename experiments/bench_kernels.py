"""Benchmarks for the Pallas kernels: block-sparse attention (+ grouped matmul section).

    python experiments/bench_kernels.py --json experiments/results/bench_kernels.json

On CPU it only checks numerics (kernels in interpret mode vs the reference, small shapes) and
writes the max abs errors. On GPU/TPU it also times the compiled kernel at block sparsity 50%,
75% and 90% against the same kernel with nothing pruned (dense) and reports each speedup as a
fraction of the ideal 1 / (1 - sparsity) (target >= 0.8), plus the dense kernel against
`jax.nn.dot_product_attention`. The JSON is one flat object; the headline ratio prints last.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ling_jax.provenance import Provenance  # noqa: E402
from ling_jax.testing import tolerances  # noqa: E402
from ling_jax.timing import median_time  # noqa: E402
from pallas_kernels.block_sparse_attention import (  # noqa: E402
    block_sparse_attention,
    count_visited_blocks,
    reference_attention,
)

SPARSITIES = (0.5, 0.75, 0.9)


# ----------------------------------------------------------------------------- attention
def _add_attention_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attention")
    g.add_argument("--attn-batch", type=int, default=4)
    g.add_argument("--attn-seq", type=int, default=4096)
    g.add_argument("--attn-heads", type=int, default=16)
    g.add_argument("--attn-kv-heads", type=int, default=8)
    g.add_argument("--attn-head-dim", type=int, default=128)
    g.add_argument("--attn-block-q", type=int, default=128)
    g.add_argument("--attn-block-k", type=int, default=128)
    g.add_argument("--attn-iters", type=int, default=20)
    g.add_argument("--attn-sweep-seqs", type=int, nargs="*", default=[],
                   help="also sweep these sequence lengths (keys attn_T{T}_{bq}x{bk}_...)")
    g.add_argument("--attn-sweep-tokens", type=int, default=32768, help="sweep batch = max(1, tokens // T)")
    g.add_argument("--attn-sweep-blocks", nargs="*", default=["128x128"],
                   help="block sizes of the sweep: QxK, or 'rule' (the TPU rule, pallas_kernels/tpu_tiling.py)")
    g.add_argument("--attn-sweep-sparsities", type=float, nargs="*", default=[0.5, 0.75, 0.9, 0.95])
    g.add_argument("--attn-sweep-iters", type=int, default=10)


def _time_ms(fn, *args, iters: int) -> float:
    return 1e3 * median_time(fn, *args, repeats=iters)


def _attn_numerics(impls, interpret) -> dict:
    """Max abs errors (forward and dq/dk/dv) of each impl vs the reference on small shapes."""
    b, tq, tk, h, hkv = 2, 72, 72, 4, 2  # ragged vs every block size used below
    d = 16 if interpret else 128  # compiled: a lane-dense head_dim
    rng = np.random.default_rng(0)
    q, do = (jnp.asarray(rng.normal(size=(b, tq, h, d)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(b, tk, hkv, d)), jnp.float32) for _ in range(2))
    q_mask = jnp.asarray(rng.random((b, tq)) < 0.9)
    kv_mask = jnp.asarray(np.repeat(rng.random((b, tk // 8 + 1)) < 0.5, 8, axis=1)[:, :tk])
    kw = dict(q_mask=q_mask, kv_mask=kv_mask, causal=True, window=8)
    with jax.default_matmul_precision("highest"):  # f32 reference exact on TPU/GPU too
        ref, ref_vjp = jax.vjp(lambda *a: reference_attention(*a, **kw), q, k, v)
        ref_grads = ref_vjp(do)
    out, ok = {}, True
    for impl in impls:
        # interpret: tiny tiles; compiled: tiles each backend can tile (see api._tiling_problem)
        blocks = dict(block_q=16, block_k=16) if interpret else dict(block_q=64, block_k=128)
        f = jax.jit(lambda q, k, v, do: (lambda o, vjp: (o, *vjp(do)))(*jax.vjp(
            lambda *a: block_sparse_attention(*a, impl=impl, interpret=interpret, **blocks, **kw), q, k, v)))
        with jax.default_matmul_precision("highest"):
            got = f(q, k, v, do)
        for name, a, r in zip(("fwd", "dq", "dk", "dv"), got, (ref, *ref_grads)):
            out[f"attn_{impl}_max_abs_err_{name}"] = float(jnp.max(jnp.abs(a - r)))
            tol = tolerances(jnp.float32, "forward" if name == "fwd" else "grad")
            ok = ok and bool(np.allclose(np.asarray(a), np.asarray(r), **tol))
    for name in ("fwd", "dq", "dk", "dv"):
        out[f"attn_max_abs_err_{name}"] = max(out[f"attn_{i}_max_abs_err_{name}"] for i in impls if i != "xla")
    out["attn_numerics_ok"] = ok  # within ling_jax.testing tolerances (float32)
    return out


def _attn_timing(args, kernel: str, *, b=None, t=None, bq=None, bk=None, sparsities=SPARSITIES, iters=None,
                 prefix: str = "attn_", compare_dpa: bool = True) -> dict:
    b, t = b or args.attn_batch, t or args.attn_seq
    h, hkv, d = args.attn_heads, args.attn_kv_heads, args.attn_head_dim
    bq, bk = bq or args.attn_block_q, bk or args.attn_block_k
    iters = iters or args.attn_iters
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(b, t, hkv, d)), jnp.bfloat16) for _ in range(2))
    q_mask = jnp.ones((b, t), bool)
    kw = dict(causal=False, block_q=bq, block_k=bk, impl=kernel, interpret=False)
    fwd = jax.jit(lambda q, k, v, qm, km: block_sparse_attention(q, k, v, q_mask=qm, kv_mask=km, **kw))
    loss = lambda q, k, v, qm, km: jnp.sum(  # noqa: E731
        block_sparse_attention(q, k, v, q_mask=qm, kv_mask=km, **kw).astype(jnp.float32))
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    out = {f"{prefix}shape": f"B{b} T{t} H{h} Hkv{hkv} D{d} bq{bq} bk{bk} bf16"}
    dense_mask = jnp.ones((b, t), bool)
    dense_fwd = _time_ms(fwd, q, k, v, q_mask, dense_mask, iters=iters)
    dense_fb = _time_ms(fwd_bwd, q, k, v, q_mask, dense_mask, iters=iters)
    out.update({f"{prefix}fwd_ms_dense": dense_fwd, f"{prefix}fwdbwd_ms_dense": dense_fb})
    nk = -(-t // bk)
    for s in sparsities:
        tag = f"s{round(s * 100)}"
        keep_blocks = np.zeros((b, nk), bool)  # drop exactly round(s * nk) key blocks per row (keep >= 1)
        for row in keep_blocks:
            row[rng.permutation(nk)[: max(nk - round(s * nk), 1)]] = True
        kv_mask = jnp.asarray(np.repeat(keep_blocks, bk, axis=1)[:, :t])
        visited = float(count_visited_blocks(q_mask, kv_mask, causal=False, block_q=bq, block_k=bk).mean())
        actual_s = 1.0 - visited / (-(-t // bq) * nk)
        t_fwd = _time_ms(fwd, q, k, v, q_mask, kv_mask, iters=iters)
        t_fb = _time_ms(fwd_bwd, q, k, v, q_mask, kv_mask, iters=iters)
        ideal = 1.0 / (1.0 - actual_s)
        out.update({
            f"{prefix}block_sparsity_{tag}": actual_s,
            f"{prefix}fwd_ms_{tag}": t_fwd,
            f"{prefix}fwdbwd_ms_{tag}": t_fb,
            f"{prefix}fraction_of_ideal_{tag}": (dense_fwd / t_fwd) / ideal,
            f"{prefix}fwdbwd_fraction_of_ideal_{tag}": (dense_fb / t_fb) / ideal,
        })
    if not compare_dpa:
        return out
    for name, impl in (("jax_dpa", None), ("cudnn", "cudnn")):  # default implementation, then cuDNN
        if impl == "cudnn" and jax.default_backend() != "gpu":
            continue
        dpa = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, implementation=impl))
        try:
            t_dpa = _time_ms(dpa, q, k, v, iters=iters)
        except Exception as e:  # e.g. cuDNN missing or shape unsupported
            out[f"{prefix}{name}_note"] = f"{impl or 'default'} failed: {type(e).__name__}: {str(e)[:200]}"
            if impl == "cudnn":
                continue
            dpa = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
            t_dpa = _time_ms(dpa, q, k, v, iters=iters)
        out[f"{prefix}fwd_ms_{name}"] = t_dpa
        out[f"{prefix}dense_speed_vs_{name}"] = t_dpa / dense_fwd  # > 1: our dense kernel is faster
    return out


def bench_attention(args) -> dict:
    backend = jax.default_backend()
    out = {"attn_backend": backend, "attn_jax_version": jax.__version__}
    if backend == "cpu":
        out["attn_mode"] = "numerics only (Pallas interpret mode)"
        out.update(_attn_numerics(("pallas_tpu", "pallas_gpu", "xla"), interpret=True))
        return out
    kernel = "pallas_tpu" if backend == "tpu" else "pallas_gpu"
    out["attn_mode"] = f"compiled {kernel}"
    out.update(_attn_numerics((kernel, "xla"), interpret=False))
    out.update(_attn_timing(args, kernel))
    out.update(_attn_sweep(args, kernel))
    return out


def _parse_blocks(spec: str, b: int, t: int, d: int) -> tuple[int, int]:
    if spec == "rule":
        from pallas_kernels.tpu_tiling import attention_blocks

        return attention_blocks(b, t, t, d, jnp.bfloat16)
    bq, bk = (int(x) for x in spec.lower().split("x"))
    return bq, bk


def _attn_sweep(args, kernel: str) -> dict:
    """Sequence length x block sparsity x block sizes; per (T, sparsity) the best blocks' figure."""
    out: dict = {}
    for t in args.attn_sweep_seqs:
        b = max(1, args.attn_sweep_tokens // t)
        best: dict[str, float] = {}
        for spec in args.attn_sweep_blocks:
            bq, bk = _parse_blocks(spec, b, t, args.attn_head_dim)
            prefix = f"attn_T{t}_{bq}x{bk}_"
            try:
                res = _attn_timing(args, kernel, b=b, t=t, bq=bq, bk=bk, sparsities=args.attn_sweep_sparsities,
                                   iters=args.attn_sweep_iters, prefix=prefix, compare_dpa=spec == args.attn_sweep_blocks[0])
            except Exception as e:  # one failing block size must not lose the others
                out[prefix + "error"] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            out.update(res)
            for s in args.attn_sweep_sparsities:
                tag = f"s{round(s * 100)}"
                val = res[f"{prefix}fraction_of_ideal_{tag}"]
                if val > best.get(tag, -1.0):
                    best[tag] = val
                    out[f"attn_T{t}_best_blocks_{tag}"] = f"{bq}x{bk}"
        for tag, val in best.items():
            out[f"attn_T{t}_best_fraction_of_ideal_{tag}"] = val
    s90 = [v for k, v in out.items() if k.endswith("best_fraction_of_ideal_s90") and int(k.split("_")[1][1:]) >= 8192]
    if s90:
        out["attn_min_fraction_of_ideal_s90_T8192plus"] = min(s90)  # acceptance: >= 0.8
    return out


# ----------------------------------------------------------------------------- grouped matmul
def _add_gmm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("grouped matmul")
    g.add_argument("--gmm-m", type=int, default=8192, help="rows (tokens x top-k)")
    g.add_argument("--gmm-k", type=int, default=2048)
    g.add_argument("--gmm-n", type=int, default=1024)
    g.add_argument("--gmm-groups", type=int, default=16, help="experts")
    g.add_argument("--gmm-tiling", default=None, help="tm,tk,tn (default: the kernel's own)")
    g.add_argument("--gmm-iters", type=int, default=20)
    g.add_argument("--gmm-sweep-tilings", nargs="*", default=[],
                   help="also time these tilings: tm,tk,tn or 'rule' (keys gmm_{tiling}_...)")
    g.add_argument("--gmm-time-on-cpu", action="store_true",
                   help="on CPU also time impl='xla' (the tiled XLA loop) vs ragged_dot and dense")


def _gmm_group_sizes(rng, m: int, groups: int) -> np.ndarray:
    """Imbalanced routing: Dirichlet(0.5) shares, one expert left empty, sizes summing to m."""
    share = rng.dirichlet(np.full(groups, 0.5))
    share[groups // 2] = 0.0
    sizes = np.floor(share / share.sum() * m).astype(np.int32)
    sizes[int(np.argmax(sizes))] += m - int(sizes.sum())
    return sizes


def _gmm_numerics(kernels, interpret: bool) -> dict:
    """Max abs errors (out, d lhs, d rhs) of each impl vs autodiff of the per-group loop."""
    from pallas_kernels.grouped_matmul import gmm
    from pallas_kernels.grouped_matmul import reference as gmm_ref

    m, k, n, groups = (200, 64, 48, 5) if interpret else (1000, 256, 256, 6)
    tiling = (16, 16, 16) if interpret else None  # compiled: each kernel's default tiles
    rng = np.random.default_rng(1)
    lhs, cot = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((m, k), (m, n)))
    rhs = jnp.asarray(rng.normal(size=(groups, k, n)), jnp.float32)
    sizes = jnp.asarray([37, 0, 81, 45, 20], jnp.int32) if interpret else jnp.asarray(
        [301, 0, 5, 444, 129, 100], jnp.int32)  # zeros, tile-ragged sizes, sum < m

    def fwd_bwd(fn):
        o, vjp = jax.vjp(fn, lhs, rhs)
        return (o, *vjp(cot))

    with jax.default_matmul_precision("highest"):
        want = fwd_bwd(lambda a, b: gmm_ref.gmm_loop(a, b, sizes))
    out, ok = {}, True
    for impl, kb in kernels:
        name = impl if kb is None else f"{impl}_{kb}"
        fn = lambda a, b, impl=impl, kb=kb: gmm(  # noqa: E731
            a, b, sizes, impl=impl, kernel_backend=kb, interpret=interpret if kb else None, tiling=tiling)
        with jax.default_matmul_precision("highest"):
            got = jax.jit(lambda: fwd_bwd(fn))()
        for tag, a, r in zip(("fwd", "dlhs", "drhs"), got, want):
            out[f"gmm_{name}_max_abs_err_{tag}"] = float(jnp.max(jnp.abs(a - r)))
            tol = tolerances(jnp.float32, "forward" if tag == "fwd" else "grad")
            ok = ok and bool(np.allclose(np.asarray(a), np.asarray(r), **tol))
    kernel_names = [f"{i}_{kb}" for i, kb in kernels if kb is not None]
    for tag in ("fwd", "dlhs", "drhs"):
        out[f"gmm_max_abs_err_{tag}"] = max(out[f"gmm_{nm}_max_abs_err_{tag}"] for nm in kernel_names)
    out["gmm_max_abs_err"] = out["gmm_max_abs_err_fwd"]
    out["gmm_numerics_ok"] = ok  # within ling_jax.testing tolerances (float32)
    return out


def _gmm_timing(args, impl: str, kernel_backend) -> dict:
    """bf16 kernel time vs jax.lax.ragged_dot and vs one dense matmul of the same FLOPs."""
    from pallas_kernels.grouped_matmul import gmm

    m, k, n, groups = args.gmm_m, args.gmm_k, args.gmm_n, args.gmm_groups
    if args.gmm_tiling == "rule":
        from pallas_kernels.tpu_tiling import gmm_tiling

        tiling = gmm_tiling(m, k, n, groups, jnp.bfloat16)
    else:
        tiling = tuple(int(t) for t in args.gmm_tiling.split(",")) if args.gmm_tiling else None
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    rhs = jnp.asarray(rng.normal(size=(groups, k, n)), jnp.bfloat16)
    sizes = jnp.asarray(_gmm_group_sizes(rng, m, groups))
    ours = lambda a, b, s: gmm(a, b, s, impl=impl, kernel_backend=kernel_backend,  # noqa: E731
                               interpret=False if kernel_backend else None, tiling=tiling)
    ragged = lambda a, b, s: jax.lax.ragged_dot(a, b, s)  # noqa: E731
    dense = lambda a, b, s: a @ b[0]  # noqa: E731  same 2*m*k*n FLOPs, no grouping
    out = {"gmm_shape": f"m{m} k{k} n{n} G{groups} bf16 tiling={tiling or 'default'}",
           "gmm_timed_impl": impl if kernel_backend is None else f"{impl}_{kernel_backend}"}
    for name, fn in (("kernel", ours), ("ragged_dot", ragged), ("dense", dense)):
        loss = lambda a, b, s, fn=fn: jnp.sum(fn(a, b, s).astype(jnp.float32))  # noqa: E731
        out[f"gmm_fwd_ms_{name}"] = _time_ms(jax.jit(fn), lhs, rhs, sizes, iters=args.gmm_iters)
        out[f"gmm_fwdbwd_ms_{name}"] = _time_ms(
            jax.jit(jax.grad(loss, argnums=(0, 1))), lhs, rhs, sizes, iters=args.gmm_iters)
    out["gmm_tflops_kernel"] = 2 * m * k * n / (out["gmm_fwd_ms_kernel"] * 1e-3) / 1e12
    out["gmm_fraction_of_dense"] = out["gmm_fwd_ms_dense"] / out["gmm_fwd_ms_kernel"]  # 1.0 = ideal
    out["gmm_fwdbwd_fraction_of_dense"] = out["gmm_fwdbwd_ms_dense"] / out["gmm_fwdbwd_ms_kernel"]
    out["gmm_speed_vs_ragged_dot"] = out["gmm_fwd_ms_ragged_dot"] / out["gmm_fwd_ms_kernel"]  # > 1: faster
    out["gmm_fwdbwd_speed_vs_ragged_dot"] = out["gmm_fwdbwd_ms_ragged_dot"] / out["gmm_fwdbwd_ms_kernel"]
    return out


def bench_gmm(args) -> dict:
    """Grouped matmul: numerics everywhere; on GPU/TPU also kernel time vs ragged_dot and dense."""
    backend = jax.default_backend()
    out = {"gmm_backend": backend}
    if backend == "cpu":
        out["gmm_mode"] = "numerics only (Pallas interpret mode)"
        out.update(_gmm_numerics((("pallas", "tpu"), ("pallas", "gpu"), ("xla", None)), interpret=True))
        if getattr(args, "gmm_time_on_cpu", False):
            out.update(_gmm_timing(args, "xla", None))
        return out
    kernel = "tpu" if backend == "tpu" else "gpu"
    out["gmm_mode"] = f"compiled pallas_{kernel}"
    out.update(_gmm_numerics((("pallas", kernel), ("xla", None)), interpret=False))
    out.update(_gmm_timing(args, "pallas", kernel))
    for spec in args.gmm_sweep_tilings:
        tag = spec.replace(",", "x")
        try:
            res = _gmm_timing(argparse.Namespace(**{**vars(args), "gmm_tiling": spec}), "pallas", kernel)
        except Exception as e:  # a tiling the kernel cannot take must not lose the others
            out[f"gmm_{tag}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        out.update({f"gmm_{tag}_{key[4:]}": val for key, val in res.items()})
    fractions = [v for key, v in out.items() if key.endswith("fraction_of_dense") and "fwdbwd" not in key]
    out["gmm_best_fraction_of_dense"] = max(fractions)  # acceptance (GPU): >= 0.6
    return out


# ----------------------------------------------------------------------------- main
HEADLINE_KEYS = ("attn_min_fraction_of_ideal_s90_T8192plus", "gmm_best_fraction_of_dense",
                 "attn_fraction_of_ideal_s75", "attn_max_abs_err_fwd")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write the flat results object here")
    p.add_argument("--sections", nargs="+", choices=("attention", "gmm"), default=["attention", "gmm"],
                   help="which kernels to check and time")
    p.add_argument("--tpu", action="store_true",
                   help="TPU host: require a TPU backend; sweep T 4096..32768 x sparsity 50..95%% with the TPU "
                        "rule's blocks and fixed 128 blocks, and the grouped matmul with the rule's and 128 tiles")
    _add_attention_args(p)
    _add_gmm_args(p)
    args = p.parse_args(argv)
    prov = Provenance("experiments/bench_kernels.py", argv)
    if args.tpu:
        if jax.default_backend() != "tpu":
            p.error(f"--tpu needs a TPU backend, found {jax.default_backend()!r} (devices: {jax.devices()})")
        args.attn_sweep_seqs = args.attn_sweep_seqs or [4096, 8192, 16384, 32768]
        args.attn_sweep_blocks = ["rule", "128x128"]
        args.gmm_sweep_tilings = args.gmm_sweep_tilings or ["rule", "128,128,128", "512,512,512"]
    results: dict = {}
    if "attention" in args.sections:
        results.update(bench_attention(args))
    if "gmm" in args.sections:
        results.update(bench_gmm(args))
    results.update(jax_version=jax.__version__, devices=str(jax.devices()))
    for key, val in results.items():
        print(f"{key}: {val:.6g}" if isinstance(val, float) else f"{key}: {val}")
    if args.json:
        prov.write(args.json, dict(sorted(results.items())), config=vars(args))
    headline = next((k for k in HEADLINE_KEYS if k in results), None)
    if headline is not None:
        print(f"headline {headline} = {results[headline]:.4g}")
    return results


if __name__ == "__main__":
    main()
