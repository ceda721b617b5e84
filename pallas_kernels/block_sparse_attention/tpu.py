"""Mosaic TPU kernels: block-sparse flash attention forward, dq and dk/dv.

Layout is head-major ``[B, H, T, D]`` with T padded to the block sizes (the API pads and
transposes). The block schedule is passed through `pltpu.PrefetchScalarGridSpec` as scalar
prefetch arguments (SMEM): the innermost grid axis walks the schedule list, and the K/V (or Q/dO
for dk/dv) index_maps read the listed block, so only listed blocks are DMA'd. Padding entries
repeat the last listed block (no new DMA) and are skipped with `pl.when(t < count)`. Each listed
tile is either full (no mask work) or partial (mask rebuilt from the per-token codes).

Schedule entries are packed as ``2 * block_index + is_full`` to halve SMEM use; SMEM must hold
``B * nq * nk`` int32 per direction, so long sequences want larger blocks.

Compiled (non-interpret) TPU tiling needs ``block_k % 128 == 0`` and ``block_q % 8 == 0``
(``% 16`` for 16-bit inputs): per-token codes travel as lane/sublane-broadcast int32 tiles
(``(block_q, 128)`` and ``(8, block_k)``) like jax's splash attention. `api.py` checks this.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from pallas_kernels.block_sparse_attention.common import MASK_VALUE, KernelConfig, pair_visible
from pallas_kernels.block_sparse_attention.schedule import BlockSchedule

LANES, SUBLANES = 128, 8
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _rep(x, width: int):
    """Lane-replicated [rows, 128] -> [rows, width] by tiling whole vregs (no lane broadcast)."""
    return jnp.tile(x, (1, pl.cdiv(width, LANES)))[:, :width]


def _tile_mask(cfg: KernelConfig, qc_ref, kvi_ref, qi, kj):
    """[bq, bk] visibility of a tile from the broadcast token codes."""
    shape = (cfg.block_q, cfg.block_k)
    q_pos = cfg.offset + qi * cfg.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
    k_pos = kj * cfg.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
    return pair_visible(
        _rep(qc_ref[...], cfg.block_k), kvi_ref[0:1, :], kvi_ref[1:2, :], q_pos, k_pos,
        causal=cfg.causal, window=cfg.window,
    )


def _entry(sched_ref, count_ref, r, c, t):
    """(block index, is_full, live) of schedule row (r, c) at step t."""
    e = sched_ref[r, c, t]
    return lax.div(e, 2), lax.rem(e, 2) == 1, t < count_ref[r, c]


def _run_tile(live, full, step):
    pl.when(jnp.logical_and(live, full))(functools.partial(step, False))
    pl.when(jnp.logical_and(live, jnp.logical_not(full)))(functools.partial(step, True))


# ----------------------------------------------------------------------------- forward
def _fwd_kernel(count_ref, sched_ref, q_ref, k_ref, v_ref, qc_ref, kvi_ref,
                o_ref, lse_ref, m_scr, l_scr, acc_scr, *, cfg: KernelConfig):
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(t == 0)
    def _init():
        m_scr[...] = jnp.full_like(m_scr, MASK_VALUE)
        l_scr[...] = jnp.zeros_like(l_scr)
        acc_scr[...] = jnp.zeros_like(acc_scr)

    kj, full, live = _entry(sched_ref, count_ref, b, i, t)

    def step(masked: bool):
        s = _dot(q_ref[...], k_ref[...], NT) * cfg.sm_scale  # [bq, bk] f32
        if masked:
            vis = _tile_mask(cfg, qc_ref, kvi_ref, i, kj)
            s = jnp.where(vis, s, MASK_VALUE)
        m_prev = m_scr[...]  # [bq, LANES], all lanes equal
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - _rep(m_next, cfg.block_k))
        if masked:
            p = jnp.where(vis, p, 0.0)  # rows with nothing visible yet stay at l = 0
        alpha = jnp.exp(m_prev - m_next)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=-1, keepdims=True)
        m_scr[...] = m_next
        pv = _dot(p.astype(v_ref.dtype), v_ref[...], NN)  # [bq, D]
        acc_scr[...] = _rep(alpha, pv.shape[-1]) * acc_scr[...] + pv

    _run_tile(live, full, step)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        l, m = l_scr[...], m_scr[...]
        has = l > 0.0
        l_safe = jnp.where(has, l, 1.0)
        o_ref[...] = (acc_scr[...] / _rep(l_safe, o_ref.shape[-1])).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(has, m + jnp.log(l_safe), jnp.inf)


def _kv_info(kv_seg, kv_keep):
    """[B, 8, Tkp] int32: row 0 segment code, row 1 keep flag (sublane-aligned tile)."""
    b, tk_p = kv_seg.shape
    pad = jnp.zeros((b, SUBLANES - 2, tk_p), jnp.int32)
    return jnp.concatenate([kv_seg[:, None], kv_keep[:, None].astype(jnp.int32), pad], axis=1)


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
    g = h // k.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = tq_p // bq, k.shape[2] // bk
    qc = jnp.broadcast_to(q_code[:, :, None], (bsz, tq_p, LANES))  # [B, Tqp, 128]
    kvi = _kv_info(kv_seg, kv_keep)  # [B, 8, Tkp]

    def q_map(b, hh, i, t, cnt, sch):
        return b, hh, i, 0

    def kv_map(b, hh, i, t, cnt, sch):
        return b, lax.div(hh, g), lax.div(sch[b, i, t], 2), 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(bsz, h, nq, nk),
        in_specs=[
            pl.BlockSpec((None, None, bq, d), q_map),
            pl.BlockSpec((None, None, bk, d), kv_map),
            pl.BlockSpec((None, None, bk, d), kv_map),
            pl.BlockSpec((None, bq, LANES), lambda b, hh, i, t, c, s: (b, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b, hh, i, t, c, s: (b, 0, lax.div(s[b, i, t], 2))),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, d), q_map),
            pl.BlockSpec((None, None, bq, LANES), q_map),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
    )
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((bsz, h, tq_p, LANES), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=cfg.interpret,
        name="block_sparse_attention_fwd",
    )(sched.kv_count, _pack(sched.kv_index, sched.kv_full), q, k, v, qc, kvi)
    return o, lse[..., 0]


# ----------------------------------------------------------------------------- backward
def _dq_kernel(count_ref, sched_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               qc_ref, kvi_ref, dq_ref, dq_scr, *, cfg: KernelConfig):
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(t == 0)
    def _init():
        dq_scr[...] = jnp.zeros_like(dq_scr)

    kj, full, live = _entry(sched_ref, count_ref, b, i, t)

    def step(masked: bool):
        k = k_ref[...]
        s = _dot(q_ref[...], k, NT) * cfg.sm_scale  # [bq, bk]
        if masked:
            vis = _tile_mask(cfg, qc_ref, kvi_ref, i, kj)
            s = jnp.where(vis, s, MASK_VALUE)
        p = jnp.exp(s - _rep(lse_ref[...], cfg.block_k))  # lse = +inf on empty rows -> p = 0
        if masked:
            p = jnp.where(vis, p, 0.0)
        dp = _dot(do_ref[...], v_ref[...], NT)  # [bq, bk]
        ds = p * (dp - _rep(delta_ref[...], cfg.block_k))
        dq_scr[...] += _dot(ds.astype(k.dtype), k, NN) * cfg.sm_scale

    _run_tile(live, full, step)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(count_ref, sched_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                qc_ref, kvi_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, cfg: KernelConfig):
    b, j, g, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when(jnp.logical_and(g == 0, t == 0))
    def _init():
        dk_scr[...] = jnp.zeros_like(dk_scr)
        dv_scr[...] = jnp.zeros_like(dv_scr)

    qi, full, live = _entry(sched_ref, count_ref, b, j, t)

    def step(masked: bool):
        q, do = q_ref[...], do_ref[...]
        s = _dot(q, k_ref[...], NT) * cfg.sm_scale  # [bq, bk]
        if masked:
            vis = _tile_mask(cfg, qc_ref, kvi_ref, qi, j)
            s = jnp.where(vis, s, MASK_VALUE)
        p = jnp.exp(s - _rep(lse_ref[...], cfg.block_k))
        if masked:
            p = jnp.where(vis, p, 0.0)
        dv_scr[...] += _dot(p.T.astype(do.dtype), do, NN)  # [bk, D] (transpose in f32)
        dp = _dot(do, v_ref[...], NT)  # [bq, bk]
        ds = p * (dp - _rep(delta_ref[...], cfg.block_k))
        dk_scr[...] += _dot(ds.T.astype(q.dtype), q, NN) * cfg.sm_scale

    _run_tile(live, full, step)

    @pl.when(jnp.logical_and(g == pl.num_programs(3) - 1, t == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


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
    qc = jnp.broadcast_to(q_code[:, :, None], (bsz, tq_p, LANES))  # [B, Tqp, 128]
    kvi = _kv_info(kv_seg, kv_keep)  # [B, 8, Tkp]
    lse_b = jnp.broadcast_to(lse[..., None], (bsz, h, tq_p, LANES))  # [B, H, Tqp, 128]
    delta_b = jnp.broadcast_to(delta[..., None], (bsz, h, tq_p, LANES))
    params4 = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

    # dq: same walk as the forward (per query block, its key blocks).
    def q_map(b, hh, i, t, cnt, sch):
        return b, hh, i, 0

    def kv_map(b, hh, i, t, cnt, sch):
        return b, lax.div(hh, g), lax.div(sch[b, i, t], 2), 0

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(bsz, h, nq, nk),
            in_specs=[
                pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, bq, LANES), q_map),
                pl.BlockSpec((None, None, bq, LANES), q_map),
                pl.BlockSpec((None, bq, LANES), lambda b, hh, i, t, c, s: (b, i, 0)),
                pl.BlockSpec((None, SUBLANES, bk), lambda b, hh, i, t, c, s: (b, 0, lax.div(s[b, i, t], 2))),
            ],
            out_specs=pl.BlockSpec((None, None, bq, d), q_map),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params4,
        interpret=cfg.interpret,
        name="block_sparse_attention_dq",
    )(sched.kv_count, _pack(sched.kv_index, sched.kv_full), q, k, v, do, lse_b, delta_b, qc, kvi)

    # dk/dv: per key block, walk the query blocks touching it, for every q head of the group.
    def qside_map(b, hk, j, gg, t, cnt, sch):
        return b, hk * g + gg, lax.div(sch[b, j, t], 2), 0

    def kside_map(b, hk, j, gg, t, cnt, sch):
        return b, hk, j, 0

    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(bsz, hkv, nk, g, nq),
            in_specs=[
                pl.BlockSpec((None, None, bq, d), qside_map),
                pl.BlockSpec((None, None, bk, d), kside_map),
                pl.BlockSpec((None, None, bk, d), kside_map),
                pl.BlockSpec((None, None, bq, d), qside_map),
                pl.BlockSpec((None, None, bq, LANES), qside_map),
                pl.BlockSpec((None, None, bq, LANES), qside_map),
                pl.BlockSpec((None, bq, LANES), lambda b, hk, j, gg, t, c, s: (b, lax.div(s[b, j, t], 2), 0)),
                pl.BlockSpec((None, SUBLANES, bk), lambda b, hk, j, gg, t, c, s: (b, 0, j)),
            ],
            out_specs=[
                pl.BlockSpec((None, None, bk, d), kside_map),
                pl.BlockSpec((None, None, bk, d), kside_map),
            ],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        interpret=cfg.interpret,
        name="block_sparse_attention_dkv",
    )(sched.q_count, _pack(sched.q_index, sched.q_full), q, k, v, do, lse_b, delta_b, qc, kvi)
    return dq, dk, dv
