"""Public grouped matmul: `gmm` (differentiable, custom VJP) and `tgmm` (weight gradient).

Contract of `gmm(lhs [m, k], rhs [G_local, k, n], group_sizes [G])`:

* Rows of `lhs` are sorted by group; global group `g` owns rows `[offsets[g], offsets[g + 1])`
  with `offsets = [0, cumsum(group_sizes)]`.
* `rhs` holds the weights of the local groups `g = group_offset + j`, `j < G_local`
  (`group_offset=None` means 0 and requires `G_local == G`).
* `out[r] = lhs[r] @ rhs[g(r) - group_offset]` if row `r` belongs to a local group, else **0**:
  rows of other shards' groups and rows `>= sum(group_sizes)` are zero. Hence summing the outputs
  of shards that together own all groups gives the unsharded result (same for `d lhs`).
* Products accumulate in float32; the output has `preferred_element_type` (default: the promoted
  input dtype). `transpose_rhs=True` takes `rhs` as `[G_local, n, k]`.
* Gradients flow to `lhs` and `rhs`; `group_sizes` and `group_offset` are non-differentiable.
  `d rhs` is `[G_local, ...]` (local experts only), computed by `tgmm`.

Expert parallelism: inside `jax.shard_map`, compute `group_offset` from `jax.lax.axis_index`
(it may be traced) and `psum` the outputs. The Pallas impls need `check_vma=False` on the
shard_map in jax 0.10 (`pallas_call` outputs carry no varying-axes type).

Validation: shapes, dtypes, `impl`, `tiling` and a concrete `group_offset` are always checked
(ValueError naming the argument). `group_sizes` values (no negatives, sum <= m) can only be
checked when concrete; under `jit` they are unchecked and sanitised instead (negative sizes count
as 0, groups are truncated at row m), which keeps every implementation memory-safe.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from pallas_kernels.grouped_matmul import gpu, reference, tpu, xla
from pallas_kernels.grouped_matmul.metadata import sanitize_group_sizes
from pallas_kernels.tpu_tiling import gmm_tiling

Impl = Literal["auto", "reference", "xla", "pallas"]
IMPLS = ("auto", "reference", "xla", "pallas")
KERNEL_BACKENDS = ("tpu", "gpu")
DEFAULT_TILING = {"tpu": (128, 128, 128), "gpu": (64, 64, 64)}


@dataclasses.dataclass(frozen=True)
class _Config:
    impl: str  # resolved: "reference" | "xla" | "pallas"
    kernel_backend: str  # pallas kernel family: "tpu" | "gpu"
    interpret: Any
    tiling: tuple[int, int, int] | None
    transpose_rhs: bool
    out_dtype: Any


# --------------------------------------------------------------------------- validation


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_rank(name, x, rank, what):
    if not hasattr(x, "ndim") or x.ndim != rank:
        raise ValueError(f"{name} must be a rank-{rank} array {what}, got shape {np.shape(x)}")


def _check_float(name, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating array, got dtype {x.dtype}")


def _check_group_sizes(group_sizes, m):
    _check_rank("group_sizes", group_sizes, 1, "[G]")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integer (int32), got dtype {group_sizes.dtype}")
    if group_sizes.shape[0] == 0:
        raise ValueError("group_sizes must hold at least one group")
    if _is_concrete(group_sizes):  # under jit this cannot be checked (see module docstring)
        sizes = np.asarray(group_sizes)
        if (sizes < 0).any():
            raise ValueError(f"group_sizes must be non-negative, got {sizes.tolist()}")
        if sizes.sum() > m:
            raise ValueError(f"group_sizes sum to {int(sizes.sum())} > m={m} rows of lhs")


def _check_group_offset(group_offset, num_groups, num_local):
    if group_offset is None:
        if num_local != num_groups:
            raise ValueError(
                f"rhs holds {num_local} groups but group_sizes has {num_groups}; pass "
                "group_offset to compute a shard of the groups"
            )
        return jnp.zeros((), jnp.int32)
    off = jnp.asarray(group_offset)
    if off.ndim != 0 or not jnp.issubdtype(off.dtype, jnp.integer):
        raise ValueError(f"group_offset must be an integer scalar, got {group_offset!r}")
    if _is_concrete(off) and not 0 <= int(off) <= num_groups - num_local:
        raise ValueError(
            f"group_offset={int(off)} out of range [0, {num_groups - num_local}] for "
            f"{num_local} local groups of {num_groups}"
        )
    return off.astype(jnp.int32)


def _resolve(impl, kernel_backend, interpret, tiling, transpose_rhs, out_dtype) -> _Config:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if kernel_backend not in (None, *KERNEL_BACKENDS):
        raise ValueError(f"kernel_backend must be None or one of {KERNEL_BACKENDS}, got {kernel_backend!r}")
    if tiling is not None:
        ok = isinstance(tiling, (tuple, list)) and len(tiling) == 3
        if not ok or not all(isinstance(t, (int, np.integer)) and t > 0 for t in tiling):
            raise ValueError(f"tiling must be None or three positive ints (tm, tk, tn), got {tiling!r}")
        tiling = tuple(int(t) for t in tiling)
    platform = jax.default_backend()
    if impl == "auto":
        impl = "pallas" if platform in KERNEL_BACKENDS else "xla"
    kernel_backend = kernel_backend or ("gpu" if platform == "gpu" else "tpu")
    if impl == "pallas" and kernel_backend == "gpu" and tiling is not None:
        gpu.check_gpu_tiling(tiling)
    if interpret is None:
        interpret = platform != kernel_backend  # e.g. always interpret on CPU
    return _Config(impl, kernel_backend, interpret, tiling, bool(transpose_rhs), jnp.dtype(out_dtype))


# --------------------------------------------------------------------------- padding


def _round_up(x, t):
    return -(-x // t) * t


def _fit_tile(dim, tile, kernel_backend, rows=False):
    """Effective tile for `dim`: shrink to the dimension when it is smaller than the tile."""
    if dim >= tile:
        return tile
    if kernel_backend == "gpu":
        return max(16, 1 << max(dim - 1, 0).bit_length())  # Triton: powers of two, dots >= 16
    return _round_up(dim, 8) if rows else dim  # TPU: a full-dimension block is always legal


def _pad_to(x, shape):
    pads = [(0, s - d) for d, s in zip(x.shape, shape)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x  # zero padding only


def _pallas_tiles(cfg, m, k, n, groups, dtype):
    """The caller's tiling, else the TPU rule (`pallas_kernels.tpu_tiling.gmm_tiling`) or the GPU default."""
    if cfg.tiling:
        tm, tk, tn = cfg.tiling
    elif cfg.kernel_backend == "tpu":
        tm, tk, tn = gmm_tiling(m, k, n, groups, dtype, cfg.out_dtype)
    else:
        tm, tk, tn = DEFAULT_TILING[cfg.kernel_backend]
    fit = lambda d, t, rows=False: _fit_tile(d, t, cfg.kernel_backend, rows)
    tm, tk, tn = fit(m, tm, True), fit(k, tk), fit(n, tn)
    return (tm, tk, tn), (_round_up(m, tm), _round_up(k, tk), _round_up(n, tn))


# --------------------------------------------------------------------------- dispatch


def _gmm_impl(lhs, rhs, group_sizes, group_offset, cfg: _Config):
    m, k = lhs.shape
    n = rhs.shape[1] if cfg.transpose_rhs else rhs.shape[2]
    group_sizes = sanitize_group_sizes(group_sizes, m)
    kw = dict(transpose_rhs=cfg.transpose_rhs, preferred_element_type=cfg.out_dtype, group_offset=group_offset)
    if cfg.impl == "reference" or 0 in (m, k, n, rhs.shape[0]):
        return reference.gmm_loop(lhs, rhs, group_sizes, **kw)
    if cfg.impl == "xla":
        return xla.gmm_xla(lhs, rhs, group_sizes, tm=cfg.tiling and cfg.tiling[0], **kw)
    tiling, (mp, kp, np_) = _pallas_tiles(cfg, m, k, n, rhs.shape[0], lhs.dtype)
    lhs_p = _pad_to(lhs, (mp, kp))  # [m_pad, k_pad]
    rhs_p = _pad_to(rhs, (rhs.shape[0], np_, kp) if cfg.transpose_rhs else (rhs.shape[0], kp, np_))
    kernel = tpu.gmm_tpu if cfg.kernel_backend == "tpu" else gpu.gmm_gpu
    out = kernel(
        lhs_p, rhs_p, group_sizes, tiling=tiling, transpose_rhs=cfg.transpose_rhs,
        out_dtype=cfg.out_dtype, group_offset=group_offset, interpret=cfg.interpret,
    )  # [m_pad, n_pad]
    return out[:m, :n]


def _tgmm_impl(lhs, grad, group_sizes, group_offset, num_local, cfg: _Config):
    m, k = lhs.shape
    n = grad.shape[1]
    group_sizes = sanitize_group_sizes(group_sizes, m)
    kw = dict(group_offset=group_offset, num_local_groups=num_local, preferred_element_type=cfg.out_dtype)
    if cfg.impl == "reference" or 0 in (m, k, n, num_local):
        return reference.tgmm_loop(lhs, grad, group_sizes, **kw)
    if cfg.impl == "xla":
        return xla.tgmm_xla(lhs, grad, group_sizes, tm=cfg.tiling and cfg.tiling[0], **kw)
    tiling, (mp, kp, np_) = _pallas_tiles(cfg, m, k, n, num_local, lhs.dtype)
    kernel = tpu.tgmm_tpu if cfg.kernel_backend == "tpu" else gpu.tgmm_gpu
    out = kernel(
        _pad_to(lhs, (mp, kp)), _pad_to(grad, (mp, np_)), group_sizes, tiling=tiling,
        out_dtype=cfg.out_dtype, group_offset=group_offset, num_local_groups=num_local,
        interpret=cfg.interpret,
    )  # [G_local, k_pad, n_pad]
    return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm_vjp(lhs, rhs, group_sizes, group_offset, cfg):
    return _gmm_impl(lhs, rhs, group_sizes, group_offset, cfg)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, cfg):
    out = _gmm_impl(lhs, rhs, group_sizes, group_offset, cfg)
    return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(cfg, residuals, g):
    lhs, rhs, group_sizes, group_offset = residuals
    # d lhs = g @ rhs^T per group: the same grouped matmul with the rhs transpose flipped.
    lhs_cfg = dataclasses.replace(cfg, transpose_rhs=not cfg.transpose_rhs, out_dtype=lhs.dtype)
    d_lhs = _gmm_impl(g, rhs, group_sizes, group_offset, lhs_cfg)
    # d rhs[j] = lhs_g^T @ g_g ([k, n]); for a transposed rhs ([n, k]) swap the operands.
    rhs_cfg = dataclasses.replace(cfg, out_dtype=rhs.dtype)
    a, b = (g, lhs) if cfg.transpose_rhs else (lhs, g)
    d_rhs = _tgmm_impl(a, b, group_sizes, group_offset, rhs.shape[0], rhs_cfg)
    return d_lhs, d_rhs, None, None


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)
_gmm_diff = jax.jit(_gmm_vjp, static_argnums=(4,))  # group sizes stay data: one compile per shape


# --------------------------------------------------------------------------- public API


def gmm(
    lhs: Float[Array, "m k"],
    rhs: Float[Array, "gl k n"] | Float[Array, "gl n k"],
    group_sizes: Int[Array, " g"],
    *,
    impl: Impl = "auto",
    interpret: Any = None,
    tiling: tuple[int, int, int] | None = None,
    transpose_rhs: bool = False,
    preferred_element_type: Any = None,
    group_offset: Int[Array, ""] | int | None = None,
    kernel_backend: Literal["tpu", "gpu"] | None = None,
) -> Float[Array, "m n"]:
    """Grouped matmul `out[r] = lhs[r] @ rhs[group(r) - group_offset]` (see module docstring).

    Args:
      impl: "reference" (per-group masked loop), "xla" (tiled XLA loop on CPU, ragged_dot on
        accelerators), "pallas" (TPU or GPU kernel), "auto" (pallas on TPU/GPU, xla on CPU).
      interpret: Pallas interpret mode; None = interpret unless running on the kernel's platform.
      tiling: (tm, tk, tn); None = (128, 128, 128) for the TPU kernel, (64, 64, 64) for the GPU
        kernel (tm only, 128, for impl="xla" on CPU). Tiles larger than a dimension shrink to it;
        dimensions that are not tile multiples are zero-padded (a copy; pick dividing tiles).
      group_offset: first global group held by `rhs` (expert-parallel shard); may be traced.
      kernel_backend: Pallas kernel family for impl="pallas"; None = GPU kernel on GPU, else TPU.
    """
    _check_rank("lhs", lhs, 2, "[m, k]")
    _check_rank("rhs", rhs, 3, "[G_local, n, k]" if transpose_rhs else "[G_local, k, n]")
    _check_float("lhs", lhs)
    _check_float("rhs", rhs)
    k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k_rhs:
        raise ValueError(f"k mismatch: lhs is {lhs.shape} but rhs {rhs.shape} has k={k_rhs}"
                         f" (transpose_rhs={transpose_rhs})")
    _check_group_sizes(group_sizes, lhs.shape[0])
    if rhs.shape[0] > group_sizes.shape[0]:
        raise ValueError(f"rhs holds {rhs.shape[0]} groups, more than group_sizes ({group_sizes.shape[0]})")
    offset = _check_group_offset(group_offset, group_sizes.shape[0], rhs.shape[0])
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    cfg = _resolve(impl, kernel_backend, interpret, tiling, transpose_rhs, out_dtype)
    return _gmm_diff(lhs, rhs, group_sizes.astype(jnp.int32), offset, cfg)


def tgmm(
    lhs: Float[Array, "m k"],
    grad: Float[Array, "m n"],
    group_sizes: Int[Array, " g"],
    *,
    impl: Impl = "auto",
    interpret: Any = None,
    tiling: tuple[int, int, int] | None = None,
    preferred_element_type: Any = None,
    group_offset: Int[Array, ""] | int | None = None,
    num_local_groups: int | None = None,
    kernel_backend: Literal["tpu", "gpu"] | None = None,
) -> Float[Array, "gl k n"]:
    """Per-group `lhs_g^T @ grad_g` -> `[G_local, k, n]` (the weight gradient of `gmm`).

    `out[j]` sums the rows of global group `group_offset + j`; empty groups give zeros.
    `num_local_groups` defaults to all groups and is required with `group_offset`. Not itself
    differentiable for impl="pallas" (it is the backward pass).
    """
    _check_rank("lhs", lhs, 2, "[m, k]")
    _check_rank("grad", grad, 2, "[m, n]")
    _check_float("lhs", lhs)
    _check_float("grad", grad)
    if lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"m mismatch: lhs is {lhs.shape} but grad is {grad.shape}")
    _check_group_sizes(group_sizes, lhs.shape[0])
    num_groups = group_sizes.shape[0]
    if num_local_groups is None:
        if group_offset is not None:
            raise ValueError("num_local_groups is required when group_offset is given")
        num_local_groups = num_groups
    if not isinstance(num_local_groups, (int, np.integer)) or not 1 <= num_local_groups <= num_groups:
        raise ValueError(f"num_local_groups must be an int in [1, {num_groups}], got {num_local_groups!r}")
    offset = _check_group_offset(group_offset, num_groups, int(num_local_groups))
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, grad.dtype)
    cfg = _resolve(impl, kernel_backend, interpret, tiling, False, out_dtype)
    return _tgmm_jit(lhs, grad, group_sizes.astype(jnp.int32), offset, int(num_local_groups), cfg)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _tgmm_jit(lhs, grad, group_sizes, group_offset, num_local, cfg):
    return _tgmm_impl(lhs, grad, group_sizes, group_offset, num_local, cfg)


__all__ = ["gmm", "tgmm", "IMPLS", "Impl"]
