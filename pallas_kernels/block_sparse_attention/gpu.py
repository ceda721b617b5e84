"""GPU kernels (generic Pallas, lowered by the Triton backend): block-sparse flash attention.

Same math and layout as `tpu.py` (``[B, H, T, D]``, T padded to blocks), GPU style: one program
per (query block, batch, head) holds its K/V sequence as a ref and runs a `fori_loop` whose trip
count is the schedule count, loading only the listed key blocks with `pl.ds`; dk/dv programs
(one per key block, batch, kv head) loop over the query heads of their group and the listed query
blocks. Full tiles skip the mask through `lax.cond`.

Backend: jax 0.10.2 lowers a plain `pl.pallas_call` for CUDA with Mosaic GPU by default, but that
`pallas_call` path is deprecated and rejects this generic kernel (lowering it for "cuda" fails with
``NotImplementedError: Only copies transferring a number of bytes divisible by the warpgroup size
are supported. Got bytes=8 but warpgroup size is 128`` on the small schedule/token blocks), so the
Triton backend is selected explicitly via `pallas.triton.CompilerParams`; it lowers the forward,
dq and dk/dv kernels (tested with `jax.export(..., platforms=("cuda",))`). jax 0.11 deprecates
Triton in favour of Mosaic GPU's `plgpu.kernel` (warpgroup-level code); that port is future work.
Compiled Triton needs power-of-two ``block_q``, ``block_k`` and head_dim, each >= 16; `api.py`
checks this. Interpret mode (CPU) has no such limits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, Int

from pallas_kernels.block_sparse_attention.common import MASK_VALUE, KernelConfig, pair_visible
from pallas_kernels.block_sparse_attention.schedule import BlockSchedule

NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _compiler_params(head_dim: int):
    return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _mask(cfg: KernelConfig, q_code, q_pos, kseg_ref, kkeep_ref, kj):
    """[bq, bk] visibility of the tile (query rows given, key block kj)."""
    sl = pl.ds(kj * cfg.block_k, cfg.block_k)
    k_pos = kj * cfg.block_k + jnp.arange(cfg.block_k, dtype=jnp.int32)
    return pair_visible(
        q_code[:, None], kseg_ref[sl][None, :], kkeep_ref[sl][None, :], q_pos[:, None], k_pos[None, :],
        causal=cfg.causal, window=cfg.window,
    )


def _masked(masked: bool, vis, x, fill):
    return jnp.where(vis, x, fill) if masked else x


# ----------------------------------------------------------------------------- forward
def _fwd_kernel(q_ref, k_ref, v_ref, qc_ref, kseg_ref, kkeep_ref, cnt_ref, sch_ref,
                o_ref, lse_ref, *, cfg: KernelConfig):
    i = pl.program_id(0)
    bq, bk = cfg.block_q, cfg.block_k
    q = q_ref[...]  # [bq, D]
    q_code = qc_ref[...]  # [bq]
    q_pos = cfg.offset + i * bq + jnp.arange(bq, dtype=jnp.int32)

    def tile(masked, kj, carry):
        acc, m, l = carry
        sl = pl.ds(kj * bk, bk)
        s = _dot(q, k_ref[sl, :], NT) * cfg.sm_scale  # [bq, bk]
        vis = _mask(cfg, q_code, q_pos, kseg_ref, kkeep_ref, kj) if masked else None
        s = _masked(masked, vis, s, MASK_VALUE)
        m_next = jnp.maximum(m, jnp.max(s, axis=-1))
        p = _masked(masked, vis, jnp.exp(s - m_next[:, None]), 0.0)
        alpha = jnp.exp(m - m_next)
        v = v_ref[sl, :]
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, NN)
        return acc, m_next, alpha * l + jnp.sum(p, axis=-1)

    def body(t, carry):
        e = sch_ref[t]
        kj, full = e // 2, e % 2 == 1
        return lax.cond(full, functools.partial(tile, False, kj), functools.partial(tile, True, kj), carry)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(0, cnt_ref[i], body, init)
    has = l > 0.0
    l_safe = jnp.where(has, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has, m + jnp.log(l_safe), jnp.inf)


def _pack(index, full):
    return (2 * index + full.astype(jnp.int32)).astype(jnp.int32)


def forward(
    cfg: KernelConfig,
    q: Float[Array, "B H Tqp D"],
    k: Float[Array, "B Hkv Tkp D"],
    v: Float[Array, "B Hkv Tkp D"],
    q_code: Int[Array, "B Tqp"],
    kv_seg: Int[Array, "B Tkp"],
    kv_keep: Int[Array, "B Tkp"],
    sched: BlockSchedule,
) -> tuple[Float[Array, "B H Tqp D"], Float[Array, "B H Tqp"]]:
    """Returns the output and the float32 logsumexp (+inf on rows with no visible key)."""
    bsz, h, tq_p, d = q.shape
    g, tk_p = h // k.shape[1], k.shape[2]
    bq = cfg.block_q
    nq, nk = tq_p // bq, tk_p // cfg.block_k
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(nq, bsz, h),
        in_specs=[
            pl.BlockSpec((None, None, bq, d), lambda i, b, hh: (b, hh, i, 0)),
            pl.BlockSpec((None, None, tk_p, d), lambda i, b, hh: (b, hh // g, 0, 0)),
            pl.BlockSpec((None, None, tk_p, d), lambda i, b, hh: (b, hh // g, 0, 0)),
            pl.BlockSpec((None, bq), lambda i, b, hh: (b, i)),
            pl.BlockSpec((None, tk_p), lambda i, b, hh: (b, 0)),
            pl.BlockSpec((None, tk_p), lambda i, b, hh: (b, 0)),
            pl.BlockSpec((None, nq), lambda i, b, hh: (b, 0)),
            pl.BlockSpec((None, None, nk), lambda i, b, hh: (b, i, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, d), lambda i, b, hh: (b, hh, i, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, hh: (b, hh, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((bsz, h, tq_p), jnp.float32),
        ],
        compiler_params=_compiler_params(d),
        interpret=cfg.interpret,
        name="block_sparse_attention_fwd",
    )(q, k, v, q_code, kv_seg, kv_keep, sched.kv_count, _pack(sched.kv_index, sched.kv_full))


# ----------------------------------------------------------------------------- backward
def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qc_ref, kseg_ref, kkeep_ref,
               cnt_ref, sch_ref, dq_ref, *, cfg: KernelConfig):
    i = pl.program_id(0)
    bq, bk = cfg.block_q, cfg.block_k
    q, do = q_ref[...], do_ref[...]  # [bq, D]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]  # [bq, 1]
    q_code = qc_ref[...]
    q_pos = cfg.offset + i * bq + jnp.arange(bq, dtype=jnp.int32)

    def tile(masked, kj, dq):
        sl = pl.ds(kj * bk, bk)
        k = k_ref[sl, :]
        s = _dot(q, k, NT) * cfg.sm_scale
        vis = _mask(cfg, q_code, q_pos, kseg_ref, kkeep_ref, kj) if masked else None
        s = _masked(masked, vis, s, MASK_VALUE)
        p = _masked(masked, vis, jnp.exp(s - lse), 0.0)  # lse = +inf on empty rows -> 0
        ds = p * (_dot(do, v_ref[sl, :], NT) - delta)
        return dq + _dot(ds.astype(k.dtype), k, NN) * cfg.sm_scale

    def body(t, dq):
        e = sch_ref[t]
        kj, full = e // 2, e % 2 == 1
        return lax.cond(full, functools.partial(tile, False, kj), functools.partial(tile, True, kj), dq)

    dq = lax.fori_loop(0, cnt_ref[i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qc_ref, kseg_ref, kkeep_ref,
                cnt_ref, sch_ref, dk_ref, dv_ref, *, cfg: KernelConfig, group: int):
    j = pl.program_id(0)
    bq, bk = cfg.block_q, cfg.block_k
    k, v = k_ref[...], v_ref[...]  # [bk, D]
    k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)
    kseg, kkeep = kseg_ref[...][None, :], kkeep_ref[...][None, :]  # [1, bk]
    count = cnt_ref[j]

    def tile(masked, gg, qi, carry):
        dk, dv = carry
        sl = pl.ds(qi * bq, bq)
        q, do = q_ref[gg, sl, :], do_ref[gg, sl, :]  # [bq, D]
        s = _dot(q, k, NT) * cfg.sm_scale  # [bq, bk]
        vis = None
        if masked:
            q_pos = cfg.offset + qi * bq + jnp.arange(bq, dtype=jnp.int32)
            vis = pair_visible(qc_ref[sl][:, None], kseg, kkeep, q_pos[:, None], k_pos[None, :],
                               causal=cfg.causal, window=cfg.window)
        s = _masked(masked, vis, s, MASK_VALUE)
        p = _masked(masked, vis, jnp.exp(s - lse_ref[gg, sl][:, None]), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, TN)  # [bk, D]
        ds = p * (_dot(do, v, NT) - delta_ref[gg, sl][:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, TN) * cfg.sm_scale
        return dk, dv

    def head_body(gg, carry):
        def body(t, carry):
            e = sch_ref[t]
            qi, full = e // 2, e % 2 == 1
            return lax.cond(full, functools.partial(tile, False, gg, qi),
                            functools.partial(tile, True, gg, qi), carry)

        return lax.fori_loop(0, count, body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, head_body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(
    cfg: KernelConfig,
    q: Float[Array, "B H Tqp D"],
    k: Float[Array, "B Hkv Tkp D"],
    v: Float[Array, "B Hkv Tkp D"],
    do: Float[Array, "B H Tqp D"],
    lse: Float[Array, "B H Tqp"],
    delta: Float[Array, "B H Tqp"],
    q_code: Int[Array, "B Tqp"],
    kv_seg: Int[Array, "B Tkp"],
    kv_keep: Int[Array, "B Tkp"],
    sched: BlockSchedule,
):
    """(dq, dk, dv); delta = rowsum(o * do) in float32."""
    bsz, h, tq_p, d = q.shape
    hkv, tk_p = k.shape[1], k.shape[2]
    g = h // hkv
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = tq_p // bq, tk_p // bk
    params = _compiler_params(d)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(nq, bsz, h),
        in_specs=[
            pl.BlockSpec((None, None, bq, d), lambda i, b, hh: (b, hh, i, 0)),
            pl.BlockSpec((None, None, tk_p, d), lambda i, b, hh: (b, hh // g, 0, 0)),
            pl.BlockSpec((None, None, tk_p, d), lambda i, b, hh: (b, hh // g, 0, 0)),
            pl.BlockSpec((None, None, bq, d), lambda i, b, hh: (b, hh, i, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, hh: (b, hh, i)),
            pl.BlockSpec((None, None, bq), lambda i, b, hh: (b, hh, i)),
            pl.BlockSpec((None, bq), lambda i, b, hh: (b, i)),
            pl.BlockSpec((None, tk_p), lambda i, b, hh: (b, 0)),
            pl.BlockSpec((None, tk_p), lambda i, b, hh: (b, 0)),
            pl.BlockSpec((None, nq), lambda i, b, hh: (b, 0)),
            pl.BlockSpec((None, None, nk), lambda i, b, hh: (b, i, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, bq, d), lambda i, b, hh: (b, hh, i, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=cfg.interpret,
        name="block_sparse_attention_dq",
    )(q, k, v, do, lse, delta, q_code, kv_seg, kv_keep, sched.kv_count,
      _pack(sched.kv_index, sched.kv_full))

    kv_block = pl.BlockSpec((None, None, bk, d), lambda j, b, hk: (b, hk, j, 0))
    group_seq = pl.BlockSpec((None, g, tq_p, d), lambda j, b, hk: (b, hk, 0, 0))  # q heads of the group
    group_row = pl.BlockSpec((None, g, tq_p), lambda j, b, hk: (b, hk, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, group=g),
        grid=(nk, bsz, hkv),
        in_specs=[
            group_seq, kv_block, kv_block, group_seq, group_row, group_row,
            pl.BlockSpec((None, tq_p), lambda j, b, hk: (b, 0)),
            pl.BlockSpec((None, bk), lambda j, b, hk: (b, j)),
            pl.BlockSpec((None, bk), lambda j, b, hk: (b, j)),
            pl.BlockSpec((None, nk), lambda j, b, hk: (b, 0)),
            pl.BlockSpec((None, None, nq), lambda j, b, hk: (b, j, 0)),
        ],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=cfg.interpret,
        name="block_sparse_attention_dkv",
    )(q, k, v, do, lse, delta, q_code, kv_seg, kv_keep, sched.q_count,
      _pack(sched.q_index, sched.q_full))
    return dq, dk, dv
