"""The rule that picks TPU block sizes for both Pallas kernels (see docs/TPU.md, "Block sizes").

One rule, two kernels. Each function returns sizes that satisfy Mosaic's tiling constraints
(last dimension a multiple of the 128 lanes, second-to-last a multiple of the 8 sublanes, 16 for
16-bit dtypes) and an estimated VMEM footprint under ``VMEM_BUDGET``:

1. **Start from the shape.** Larger blocks amortise the fixed cost of a grid step (~0.35 us) and
   fill the MXU (128 x 128 on v4/v5e, 256 x 256 on v6e); smaller blocks waste less on padding,
   on tiles straddling two groups (grouped matmul), and skip pruned tokens at a finer grain
   (attention). So blocks grow with the work per block: 128 / 256 / 512.
2. **Clamp to the (padded) dimension**, so short inputs are not padded to a large block.
3. **Fit the memories.** Halve the largest block until the double-buffered inputs, the outputs,
   the float32 accumulators and the ``[bq, bk]`` logits fit ``VMEM_BUDGET`` (the 16 MiB default
   scoped VMEM of v5e: the smallest of v4/v5e/v5p/v6e). For attention, grow both blocks while
   the block schedule (``B * nq * nk`` int32 per direction, scalar-prefetched into SMEM) exceeds
   ``SMEM_BUDGET_ENTRIES``.

Grid order is fixed per kernel and follows from the same costs (documented in docs/TPU.md):
attention walks ``(batch, heads, q blocks, kv schedule)`` (the reduction over listed kv blocks is
innermost so the accumulators stay in VMEM; the three outer axes are ``parallel`` for megacore);
the grouped matmul walks ``(n tiles, group steps, k tiles)`` (k innermost: the reduction;
consecutive group steps of one group keep the same rhs block index, so Mosaic skips its DMA).
"""

from __future__ import annotations

import jax.numpy as jnp

LANES = 128
VMEM_BUDGET = 16 * 2**20  # bytes: default scoped VMEM on v5e (v6e: 32 MiB)
SMEM_BUDGET_ENTRIES = 2**16  # int32 schedule entries per direction (256 KiB)
MAX_BLOCK = 1024


def sublanes(dtype) -> int:
    """Second-to-last block dimension multiple: 8 for 32-bit dtypes, 16 for 16-bit ones."""
    return 8 if jnp.dtype(dtype).itemsize >= 4 else 16


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _target(work: int) -> int:
    """128 / 256 / 512 by the extent a block covers (sequence length or rows per group)."""
    return 512 if work >= 8192 else 256 if work >= 2048 else 128


def attention_vmem_bytes(block_q: int, block_k: int, head_dim: int, dtype) -> int:
    """VMEM of one forward grid step of the block-sparse attention kernel (the larger direction):
    double-buffered q, k, v and token-code tiles, double-buffered o and lse, the m / l / acc
    scratch and ~3 live ``[bq, bk]`` float32 temporaries (logits, probabilities, mask)."""
    item = jnp.dtype(dtype).itemsize
    inputs = 2 * ((block_q + 2 * block_k) * head_dim * item + (block_q * LANES + 8 * block_k) * 4)
    outputs = 2 * (block_q * head_dim * item + block_q * LANES * 4)
    scratch = (2 * block_q * LANES + block_q * head_dim) * 4
    return inputs + outputs + scratch + 3 * block_q * block_k * 4


def attention_blocks(batch: int, seq_q: int, seq_k: int, head_dim: int, dtype) -> tuple[int, int]:
    """(block_q, block_k) for the TPU block-sparse attention kernel (rule: module docstring).

    ``block_k`` is a multiple of 128, ``block_q`` of 8 (16 for 16-bit dtypes).
    """
    for name, val in (("batch", batch), ("seq_q", seq_q), ("seq_k", seq_k), ("head_dim", head_dim)):
        if int(val) <= 0:
            raise ValueError(f"attention_blocks: {name} must be positive, got {val}")
    sub = sublanes(dtype)
    target = _target(max(seq_q, seq_k))
    bq = min(target, _round_up(seq_q, sub))
    bk = min(target, _round_up(seq_k, LANES))

    def entries(bq, bk):
        return batch * -(-seq_q // bq) * -(-seq_k // bk)

    while entries(bq, bk) > SMEM_BUDGET_ENTRIES and max(bq, bk) < MAX_BLOCK:
        bq = min(2 * bq, _round_up(seq_q, sub), MAX_BLOCK)
        bk = min(2 * bk, _round_up(seq_k, LANES), MAX_BLOCK)
        if entries(bq, bk) == entries(bq // 2, bk // 2):
            break
    while attention_vmem_bytes(bq, bk, head_dim, dtype) > VMEM_BUDGET and max(bq, bk) > LANES:
        if bq >= bk and bq > sub:
            bq = max(sub, _round_up(bq // 2, sub))
        else:
            bk = max(LANES, bk // 2)
    return bq, bk


def gmm_vmem_bytes(tm: int, tk: int, tn: int, dtype, out_dtype=None) -> int:
    """VMEM of one grouped-matmul grid step: double-buffered lhs / rhs / out tiles and the float32
    accumulator."""
    item = jnp.dtype(dtype).itemsize
    out_item = jnp.dtype(out_dtype or dtype).itemsize
    return 2 * (tm * tk + tk * tn) * item + 2 * tm * tn * out_item + tm * tn * 4


def gmm_tiling(m: int, k: int, n: int, num_groups: int, dtype, out_dtype=None) -> tuple[int, int, int]:
    """(tm, tk, tn) for the TPU grouped matmul ``[m, k] x [G, k, n]`` (rule: module docstring).

    ``tm`` follows the mean rows per group (a tile straddling two groups is visited once per
    group), ``tk`` / ``tn`` the matrix sizes; ``tm`` is a multiple of 8 (16 for 16-bit), ``tk``
    and ``tn`` of 128 (or the whole dimension when it is smaller than 128).
    """
    for name, val in (("m", m), ("k", k), ("n", n), ("num_groups", num_groups)):
        if int(val) <= 0:
            raise ValueError(f"gmm_tiling: {name} must be positive, got {val}")
    sub = sublanes(dtype)
    tm = min(_target(4 * (m // num_groups)) if m // num_groups >= 256 else 128, _round_up(m, sub))
    tk = min(_target(4 * k), _round_up(k, LANES)) if k >= LANES else k
    tn = min(_target(4 * n), _round_up(n, LANES)) if n >= LANES else n
    while gmm_vmem_bytes(tm, tk, tn, dtype, out_dtype) > VMEM_BUDGET:
        if tk >= max(tn, tm) and tk > LANES:
            tk //= 2
        elif tn >= tm and tn > LANES:
            tn //= 2
        elif tm > sub:
            tm = max(sub, _round_up(tm // 2, sub))
        else:
            break
    return tm, tk, tn
