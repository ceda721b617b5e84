"""Token encoding and the in-block visibility rule shared by the schedule and the kernels.

Masking semantics (identical in `reference.py`, which builds them independently):
query i (key position ``p_i = Tk - Tq + i``, i.e. queries aligned to the END of the keys)
may attend to key j iff

    q_mask[i]
    and q_seg[i] == kv_seg[j]                               (segment ids, if given)
    and ( (kv_mask[j] and (not causal or j <= p_i))       (token keep mask + causal)
          or (0 <= p_i - j < window) )                       (local window, window > 0)

so a local window of recent keys stays visible even where ``kv_mask`` pruned them.
Rows without any visible key produce zeros (not NaN) and zero gradients.

Kernels do not see a ``[Tq, Tk]`` mask. They get three per-token int32 vectors:
``q_code`` (segment id, or ``Q_INVALID`` for masked or padded queries), ``kv_seg`` (segment id,
or ``KV_PAD`` for padded keys) and ``kv_keep`` (kv_mask as 0/1). Padded positions can never
match, so padding is masked for free. Segment ids must not take the two sentinel values.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

# Large finite negative logit for masked entries (finite: avoids inf - inf = NaN).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
Q_INVALID = int(np.iinfo(np.int32).min)
KV_PAD = Q_INVALID + 1


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def encode_tokens(
    q_mask: Bool[Array, "B Tq"],
    kv_mask: Bool[Array, "B Tk"],
    q_segment_ids: Int[Array, "B Tq"] | None,
    kv_segment_ids: Int[Array, "B Tk"] | None,
    *,
    block_q: int,
    block_k: int,
) -> tuple[Int[Array, "B Tqp"], Int[Array, "B Tkp"], Int[Array, "B Tkp"]]:
    """Per-token codes, padded to multiples of the block sizes: (q_code, kv_seg, kv_keep)."""
    b, tq = q_mask.shape
    tk = kv_mask.shape[1]
    tq_p, tk_p = round_up(tq, block_q), round_up(tk, block_k)
    q_seg = jnp.zeros((b, tq), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    k_seg = jnp.zeros((b, tk), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    q_code = jnp.where(q_mask, q_seg, Q_INVALID)
    q_code = jnp.pad(q_code, ((0, 0), (0, tq_p - tq)), constant_values=Q_INVALID)  # [B, Tqp]
    kv_seg = jnp.pad(k_seg, ((0, 0), (0, tk_p - tk)), constant_values=KV_PAD)  # [B, Tkp]
    kv_keep = jnp.pad(kv_mask.astype(jnp.int32), ((0, 0), (0, tk_p - tk)))  # [B, Tkp]
    return q_code, kv_seg, kv_keep


def pair_visible(q_code, kv_seg, kv_keep, q_pos, k_pos, *, causal: bool, window: int):
    """Visibility of (query, key) pairs; all arguments broadcast against each other.

    Works on plain jnp arrays and inside Pallas kernels (only elementwise ops).
    ``q_pos`` is the query's position on the key axis (index + Tk - Tq).
    """
    visible = kv_keep != 0
    if causal:
        visible = jnp.logical_and(visible, k_pos <= q_pos)
    if window > 0:
        dist = q_pos - k_pos
        visible = jnp.logical_or(visible, jnp.logical_and(dist >= 0, dist < window))
    return jnp.logical_and(visible, q_code == kv_seg)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static (hashable) kernel parameters shared by the TPU and GPU kernels."""

    sm_scale: float
    causal: bool
    window: int
    offset: int  # Tk - Tq: query i sits at key position offset + i
    block_q: int
    block_k: int
    interpret: bool
