"""Ground-truth masked attention in plain jnp (float32 softmax, masked rows give zeros).

Deliberately written independently of the kernels' token encoding (`common.py`): it builds the
dense ``[B, Tq, Tk]`` mask straight from the user-level masks, so encoding bugs show up in tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def split_segment_ids(segment_ids, tq: int, tk: int):
    """``segment_ids`` is None, one ``[B, T]`` array (needs Tq == Tk) or a (q_ids, kv_ids) pair."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        return segment_ids[0], segment_ids[1]
    if tq != tk:
        raise ValueError(
            "segment_ids: a single [B, T] array needs Tq == Tk "
            f"(got Tq={tq}, Tk={tk}); pass a (q_segment_ids, kv_segment_ids) tuple instead"
        )
    return segment_ids, segment_ids


def attention_mask(
    batch: int,
    tq: int,
    tk: int,
    *,
    q_mask: Bool[Array, "B Tq"] | None = None,
    kv_mask: Bool[Array, "B Tk"] | None = None,
    causal: bool = True,
    segment_ids=None,
    window: int = 0,
) -> Bool[Array, "B Tq Tk"]:
    """Dense boolean mask: True where query i may attend to key j (see `common.py` docstring)."""
    qpos = jnp.arange(tq)[:, None] + (tk - tq)  # [Tq, 1] position on the key axis
    kpos = jnp.arange(tk)[None, :]  # [1, Tk]
    kv_vis = jnp.ones((batch, 1, tk), bool) if kv_mask is None else kv_mask[:, None, :]
    if causal:
        kv_vis = kv_vis & (kpos <= qpos)[None]  # [B, Tq, Tk]
    if window > 0:
        in_window = (qpos - kpos >= 0) & (qpos - kpos < window)
        kv_vis = kv_vis | in_window[None]
    mask = jnp.broadcast_to(kv_vis, (batch, tq, tk))
    if q_mask is not None:
        mask = mask & q_mask[:, :, None]
    q_seg, kv_seg = split_segment_ids(segment_ids, tq, tk)
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
    return mask


def reference_attention(
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
) -> Float[Array, "B Tq H D"]:
    """softmax(q k^T * scale + mask) v in float32; rows with no visible key are zero."""
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if sm_scale is None else sm_scale
    mask = attention_mask(
        b, tq, tk, q_mask=q_mask, kv_mask=kv_mask, causal=causal, segment_ids=segment_ids, window=window
    )[:, None]  # [B, 1, Tq, Tk]
    kf = jnp.repeat(k.astype(jnp.float32), h // hkv, axis=2)  # [B, Tk, H, D]
    vf = jnp.repeat(v.astype(jnp.float32), h // hkv, axis=2)  # [B, Tk, H, D]
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kf) * scale  # [B, H, Tq, Tk]
    s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, vf)  # [B, Tq, H, D]
    return out.astype(q.dtype)
