"""Bucketed grouped SwiGLU for the CPU ``sorted`` dispatch: one batched matmul over experts plus a
tile loop for the overflow.

Input is the same as :func:`ling_jax.layers.moe_sorted.grouped_swiglu` (rows sorted by expert,
expert ``g`` owning rows ``[starts[g], starts[g] + sizes[g])``). Each expert's first ``capacity``
rows (default: the mean load rounded up to 8) go into a bucket ``[X, C, E]``; the expert SwiGLUs
run as three *batched* matmuls over all buckets at once, and the weighted results are
scatter-added into ``[T, E]``. The rows past an expert's bucket (``sizes[g] - C`` when positive)
go through the dynamic-trip-count tile loop of ``moe_sorted``. Nothing is dropped: the result is
the sorted dispatch's, exactly.

Why: with many small experts (e.g. 64 experts of 256 x 256 at top-1, ~128 rows each) the tile
loop runs one small matmul per iteration, each on one core with ~10 us of loop overhead; a
batched matmul runs them as one op over all cores, and the weights are read once in a stream.
The cost is the padding of under-loaded buckets (rows computed and weighted by zero), a few
percent when routing is balanced; a skewed routing sends its excess through the loop.
Gradients: plain autodiff through the bucket (gathers, batched einsums, scatter-add) and the
loop's own custom VJP for the overflow.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ling_jax.layers.moe_sorted import grouped_swiglu

F32 = jnp.float32
OVERFLOW_TILES = (64, 32, 16, 8)


def bucket_capacity(rows: int, num_experts: int, multiple: int = 8) -> int:
    """Bucket rows per expert: the mean load ``ceil(rows / X)`` rounded up to ``multiple``."""
    mean = math.ceil(max(rows, 1) / max(num_experts, 1))
    return multiple * math.ceil(mean / multiple)


def bucketed_swiglu(
    x: Float[Array, "T E"],
    tokens: Int[Array, " M"],
    weights: Float[Array, " M"],
    starts: Int[Array, " X"],
    sizes: Int[Array, " X"],
    w_gate: Float[Array, "X E F"],
    w_up: Float[Array, "X E F"],
    w_down: Float[Array, "X F E"],
    *,
    capacity: int | None = None,
) -> Float[Array, "T E"]:
    """``out[tokens[r]] += weights[r] * swiglu_{g(r)}(x[tokens[r]])``, as ``grouped_swiglu`` (float32)."""
    m, num_x = tokens.shape[0], w_gate.shape[0]
    cap = bucket_capacity(m, num_x) if capacity is None else int(capacity)
    if cap <= 0:
        raise ValueError(f"bucket capacity must be positive, got {cap}")
    starts, sizes = starts.astype(jnp.int32), sizes.astype(jnp.int32)
    slot = jnp.arange(cap, dtype=jnp.int32)
    own = slot[None, :] < sizes[:, None]  # [X, C]
    rows = jnp.where(own, starts[:, None] + slot[None, :], 0)  # [X, C] sorted-row index of each slot
    tok = tokens.astype(jnp.int32)[rows]  # [X, C]
    wt = jnp.where(own, weights.astype(F32)[rows], 0.0)  # [X, C]; empty slots weigh 0
    a = x[tok]  # [X, C, E]
    gate = jnp.einsum("xce,xef->xcf", a, w_gate.astype(a.dtype))  # [X, C, F]
    up = jnp.einsum("xce,xef->xcf", a, w_up.astype(a.dtype))
    y = jnp.einsum("xcf,xfe->xce", jax.nn.silu(gate) * up, w_down.astype(a.dtype))  # [X, C, E]
    contrib = (y.astype(F32) * wt[..., None]).reshape(num_x * cap, -1)  # [X*C, E]
    out = jnp.zeros((x.shape[0], x.shape[1]), F32).at[tok.reshape(-1)].add(contrib)
    overflow = jnp.maximum(sizes - cap, 0)  # rows past each bucket: the tile loop
    return out + grouped_swiglu(x, tokens, weights, starts + cap, overflow, w_gate, w_up, w_down,
                                tiles=OVERFLOW_TILES, contiguous=False)
