"""Public entry point: `block_sparse_attention` (validation, padding, dispatch, custom VJP)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels.block_sparse_attention import gpu, tpu
from pallas_kernels.block_sparse_attention.common import KernelConfig, encode_tokens, round_up
from pallas_kernels.block_sparse_attention.reference import (
    attention_mask,
    reference_attention,
    split_segment_ids,
)
from pallas_kernels.block_sparse_attention.schedule import BlockSchedule, schedule_from_codes
from pallas_kernels.tpu_tiling import attention_blocks

IMPLS = ("auto", "reference", "xla", "pallas", "pallas_tpu", "pallas_gpu")
_KERNELS = {"pallas_tpu": tpu, "pallas_gpu": gpu}


def block_sparse_attention(
    q: Float[Array, "B Tq H D"],
    k: Float[Array, "B Tk Hkv D"],
    v: Float[Array, "B Tk Hkv D"],
    *,
    q_mask: Bool[Array, "B Tq"] | None = None,
    kv_mask: Bool[Array, "B Tk"] | None = None,
    causal: bool = True,
    segment_ids: Int[Array, "B T"] | tuple | None = None,
    window: int = 0,
    sm_scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    impl: str = "auto",
    interpret: bool | None = None,
) -> Float[Array, "B Tq H D"]:
    """Masked (grouped-query) attention that skips key/query blocks with nothing visible.

    Query i may attend to key j iff ``q_mask[i]`` and the segment ids match and either
    ``kv_mask[j]`` (and ``j <= Tk - Tq + i`` when ``causal``) or ``0 <= (Tk - Tq + i) - j < window``.
    Causality is by index with queries aligned to the END of the keys: when Tq != Tk, query i
    sits at key position ``Tk - Tq + i`` (decode/chunked prefill convention). ``window > 0``
    keeps the ``window`` most recent keys (including the query's own position) visible even
    where ``kv_mask`` is False. Rows with no visible key return zeros (and zero gradients).

    Args:
      q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, H_kv, D]`` with ``H % H_kv == 0`` (GQA).
      q_mask, kv_mask: ``[B, Tq]`` / ``[B, Tk]`` booleans (None: all valid).
      segment_ids: None, one ``[B, T]`` int array (needs Tq == Tk), or a
        ``(q_segment_ids [B, Tq], kv_segment_ids [B, Tk])`` tuple. Ids must not be
        ``-2**31`` or ``-2**31 + 1`` (internal padding sentinels).
      sm_scale: logit scale (a static Python float), default ``1 / sqrt(D)``.
      block_q, block_k: kernel tile sizes; sequences are padded to multiples internally. None:
        the TPU kernel takes `pallas_kernels.tpu_tiling.attention_blocks` (docs/TPU.md), the GPU
        kernel and the rest 128.
        Compiled TPU needs ``block_k % 128 == 0`` and ``block_q % 8 == 0`` (``% 16`` for 16-bit
        dtypes); compiled GPU (Triton) needs powers of two >= 16 and a power-of-two head_dim
        >= 16. Interpret mode accepts any positive sizes.
      impl: ``"reference"`` (plain jnp), ``"xla"`` (dense mask + `jax.nn.dot_product_attention`),
        ``"pallas"`` (TPU kernel on TPU, GPU kernel on GPU, interpreted TPU kernel on CPU),
        ``"pallas_tpu"`` / ``"pallas_gpu"`` (force one kernel), ``"auto"`` (pallas on TPU/GPU,
        xla on CPU, and xla where the compiled kernel cannot tile the block sizes / head_dim).
      interpret: run the Pallas kernel in interpret mode; None means True exactly on CPU.

    Returns:
      ``[B, Tq, H, D]`` in q's dtype.
    """
    b, tq, h, d = _check_qkv(q, k, v)
    tk = k.shape[1]
    q_mask = _check_mask("q_mask", q_mask, (b, tq))
    kv_mask = _check_mask("kv_mask", kv_mask, (b, tk))
    q_seg, kv_seg = _check_segment_ids(segment_ids, b, tq, tk)
    if not _is_int(window) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0 disables it), got {window!r}")
    window = int(window)
    kernel = _resolve_impl(impl)
    if block_q is None or block_k is None:
        rule_q, rule_k = (attention_blocks(b, tq, tk, d, q.dtype) if kernel == "pallas_tpu" else (128, 128))
        block_q = rule_q if block_q is None else block_q
        block_k = rule_k if block_k is None else block_k
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if not _is_int(val) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    block_q, block_k = int(block_q), int(block_k)
    if interpret not in (None, True, False):
        raise ValueError(f"interpret must be None, True or False, got {interpret!r}")
    scale = d**-0.5 if sm_scale is None else float(sm_scale)
    interp = jax.default_backend() == "cpu" if interpret is None else bool(interpret)
    if kernel in _KERNELS and not interp:
        problem = _tiling_problem(kernel, block_q, block_k, d, q.dtype)
        if problem and impl == "auto":
            kernel = "xla"  # best effort: shapes the compiled kernel cannot tile run dense
        elif problem:
            raise ValueError(problem)
    masks = dict(q_mask=q_mask, kv_mask=kv_mask, causal=causal, window=window)
    if kernel == "reference":
        return reference_attention(q, k, v, segment_ids=segment_ids, sm_scale=scale, **masks)
    if kernel == "xla":
        return _xla_attention(q, k, v, segment_ids=segment_ids, scale=scale, **masks)

    q_mask = jnp.ones((b, tq), bool) if q_mask is None else q_mask
    kv_mask = jnp.ones((b, tk), bool) if kv_mask is None else kv_mask
    tokens = encode_tokens(q_mask, kv_mask, q_seg, kv_seg, block_q=block_q, block_k=block_k)
    sched = schedule_from_codes(
        *tokens, block_q=block_q, block_k=block_k, causal=causal, window=window, offset=tk - tq
    )
    cfg = KernelConfig(scale, bool(causal), window, tk - tq, block_q, block_k, bool(interp))
    tq_p, tk_p = round_up(tq, block_q), round_up(tk, block_k)
    qt = _pad_seq(q, tq_p).transpose(0, 2, 1, 3)  # [B, H, Tqp, D]
    kt = _pad_seq(k, tk_p).transpose(0, 2, 1, 3)  # [B, Hkv, Tkp, D]
    vt = _pad_seq(v, tk_p).transpose(0, 2, 1, 3)  # [B, Hkv, Tkp, D]
    out = _kernel_attention(kernel, cfg, qt, kt, vt, tokens, sched)  # [B, H, Tqp, D]
    return out[:, :, :tq].transpose(0, 2, 1, 3)  # [B, Tq, H, D]


# ----------------------------------------------------------------------------- kernels + VJP
def _pad_seq(x, length: int):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _kernel_attention(kernel: str, cfg: KernelConfig, q, k, v, tokens, sched: BlockSchedule):
    return _KERNELS[kernel].forward(cfg, q, k, v, *tokens, sched)[0]


def _kernel_attention_fwd(kernel, cfg, q, k, v, tokens, sched):
    out, lse = _KERNELS[kernel].forward(cfg, q, k, v, *tokens, sched)  # lse: [B, H, Tqp] f32
    return out, (q, k, v, tokens, sched, out, lse)


def _kernel_attention_bwd(kernel, cfg, res, do):
    q, k, v, tokens, sched, out, lse = res
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, H, Tqp]
    dq, dk, dv = _KERNELS[kernel].backward(cfg, q, k, v, do, lse, delta, *tokens, sched)
    return dq, dk, dv, None, None


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


def _xla_attention(q, k, v, *, q_mask, kv_mask, causal, segment_ids, window, scale):
    """Fast dense path: materialised [B, Tq, Tk] mask + one fused XLA softmax attention."""
    b, tq, _, _ = q.shape
    mask = attention_mask(
        b, tq, k.shape[1], q_mask=q_mask, kv_mask=kv_mask, causal=causal,
        segment_ids=segment_ids, window=window,
    )  # [B, Tq, Tk]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation="xla")
    has_key = jnp.any(mask, axis=-1)[:, :, None, None]  # [B, Tq, 1, 1]
    return jnp.where(has_key, out, jnp.zeros_like(out)).astype(q.dtype)


# ----------------------------------------------------------------------------- validation
def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    platform = jax.default_backend()
    if impl in ("pallas", "auto"):
        if platform == "tpu":
            return "pallas_tpu"
        if platform in ("gpu", "cuda", "rocm"):
            return "pallas_gpu"
        return "pallas_tpu" if impl == "pallas" else "xla"
    return impl


def _check_qkv(q, k, v) -> tuple[int, int, int, int]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            want = "[B, Tq, H, D]" if name == "q" else "[B, Tk, H_kv, D]"
            raise ValueError(f"{name} must have shape {want}, got shape {getattr(x, 'shape', None)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Tk, H_kv, D], got {k.shape} and {v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, tq, h, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"batch size mismatch: q has B={b}, k/v have B={k.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"head_dim mismatch: q has D={d}, k/v have D={k.shape[3]}")
    if h % k.shape[2] != 0:
        raise ValueError(
            f"num heads: H={h} (q) must be a multiple of H_kv={k.shape[2]} (k/v) for grouped-query attention"
        )
    if tq == 0 or k.shape[1] == 0:
        raise ValueError(f"sequence lengths must be >= 1, got Tq={tq}, Tk={k.shape[1]}")
    return b, tq, h, d


def _check_mask(name, mask, shape):
    if mask is None:
        return None
    if tuple(getattr(mask, "shape", ())) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} (batch, length), got {getattr(mask, 'shape', None)}")
    return jnp.asarray(mask).astype(bool)


def _check_segment_ids(segment_ids, b, tq, tk):
    if isinstance(segment_ids, (tuple, list)) and len(segment_ids) != 2:
        raise ValueError("segment_ids tuple must be (q_segment_ids [B, Tq], kv_segment_ids [B, Tk])")
    q_seg, kv_seg = split_segment_ids(segment_ids, tq, tk)
    for name, ids, shape in (("q segment_ids", q_seg, (b, tq)), ("kv segment_ids", kv_seg, (b, tk))):
        if ids is None:
            continue
        if tuple(ids.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {ids.shape}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers, got {ids.dtype}")
    return q_seg, kv_seg


def _tiling_problem(kernel: str, block_q: int, block_k: int, d: int, dtype) -> str | None:
    """Why the compiled backend cannot tile these sizes (None if it can; interpret skips this)."""
    if kernel == "pallas_tpu":
        sub = 8 if jnp.dtype(dtype).itemsize >= 4 else 16
        if block_q % sub:
            return f"block_q must be a multiple of {sub} for the TPU kernel with {jnp.dtype(dtype)}, got {block_q}"
        if block_k % 128:
            return f"block_k must be a multiple of 128 for the TPU kernel, got {block_k}"
        return None
    for name, val in (("block_q", block_q), ("block_k", block_k), ("head_dim", d)):
        if val < 16 or val & (val - 1):
            return f"{name} must be a power of two >= 16 for the GPU (Triton) kernel, got {val}"
    return None
