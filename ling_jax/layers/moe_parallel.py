"""Expert parallelism: routed SwiGLU experts sharded over the ``expert`` mesh axis.

The MoE layer routes; this module runs the routed experts when a mesh with ``expert > 1`` is
active (:func:`expert_mesh`). Tokens arrive split over the batch axes ``(data, fsdp, expert)``,
expert weights ``[X, E, F]`` split over ``expert`` (and their hidden units over ``tensor``).
Inside ``shard_map`` each device holds ``X / ep`` local experts and two dispatches are offered:

* **capacity** (``capacity_factor > 0``): each device packs its tokens into a buffer of ``C``
  slots per expert (top-1 choices first; overflow is dropped), ``all_to_all`` sends every expert's
  slots to the device that owns it, the local experts run as batched matmuls, and a second
  ``all_to_all`` brings results home. ``C = ceil(capacity_factor * tokens * k / X)`` per device.
* **dropless** (``capacity_factor == 0``): the tokens of the ``ep`` devices sharing local experts
  are all-gathered, sorted by expert and multiplied with ``gmm(..., group_offset=)`` so that each
  device computes its own experts' rows only; ``psum_scatter`` sums the partial outputs back to the
  token owners. Nothing is dropped.

:func:`reference_ffn` is the plain-jnp per-expert loop both paths are tested against.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from ling_jax.routing import expert_capacity, rank_in_group, sort_by_group

EXPERT_AXIS, TENSOR_AXIS = "expert", "tensor"
BATCH_AXES = ("data", "fsdp", "expert")  # as ling_jax.sharding.BATCH_AXES (kept import-free)


def expert_mesh() -> Optional[jax.sharding.AbstractMesh]:
    """The active mesh if it has an ``expert`` axis larger than one (else None)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(EXPERT_AXIS, 1) <= 1:
        return None
    return mesh


def _swiglu(x, w_gate, w_up, w_down, dtype):
    """Batched experts: x [X, S, E], w_gate/w_up [X, E, F], w_down [X, F, E] -> [X, S, E]."""
    x = x.astype(dtype)
    g = jnp.einsum("xse,xef->xsf", x, w_gate.astype(dtype))
    u = jnp.einsum("xse,xef->xsf", x, w_up.astype(dtype))
    return jnp.einsum("xsf,xfe->xse", jax.nn.silu(g) * u, w_down.astype(dtype))  # [X, S, E]


def reference_ffn(
    x: Float[Array, "B T E"], expert_ids: Int[Array, "B T K"], weights: Float[Array, "B T K"],
    w_gate: Float[Array, "X E F"], w_up: Float[Array, "X E F"], w_down: Float[Array, "X F E"],
    dtype=jnp.float32,
) -> Float[Array, "B T E"]:
    """``sum_k weights[..., k] * expert[ids[..., k]](x)`` by a loop over experts (ids >= X add nothing)."""
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(w_gate.shape[0]):
        y = _swiglu(x.reshape(1, -1, x.shape[-1]), w_gate[e:e + 1], w_up[e:e + 1], w_down[e:e + 1], dtype)[0]
        gate = jnp.sum(jnp.where(expert_ids == e, weights, 0.0), axis=-1)  # [B, T]
        out = out + gate[..., None].astype(jnp.float32) * y.reshape(x.shape).astype(jnp.float32)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- capacity + all_to_all


def _capacity_shard(x, ids, weights, w_gate, w_up, w_down, *, num_experts, cap, dtype):
    """One device: x [b, T, E] own tokens, ids/weights [b, T, K], weights of X/ep local experts."""
    b, t, e = x.shape
    k = ids.shape[-1]
    n = b * t
    xs = x.reshape(n, e)  # [n, E]
    gid = ids.reshape(n, k).T.reshape(-1)  # [K*n] k-major: every token's first choice is served first
    gid = jnp.where((gid >= 0) & (gid < num_experts), gid, num_experts)  # no-expert / zero experts: group X
    pos, _, _ = rank_in_group(gid, num_experts + 1)  # [K*n] slot within its expert, in priority order
    kept = (gid < num_experts) & (pos < cap)
    slot = jnp.where(kept, gid * cap + pos, num_experts * cap)  # out of range -> dropped
    token = jnp.tile(jnp.arange(n), k)  # [K*n]
    buf = jnp.zeros((num_experts * cap, e), x.dtype).at[slot].set(xs[token], mode="drop")
    buf = buf.reshape(num_experts, cap, e)  # [X, C, E], expert-major: device i owns experts [i*X/ep, ...)
    # Send every expert's slots to its owner; receive [X_loc, ep * C, E] ordered by source device.
    recv = jax.lax.all_to_all(buf, EXPERT_AXIS, split_axis=0, concat_axis=1, tiled=True)
    out = _swiglu(recv, w_gate, w_up, w_down, dtype)  # [X_loc, ep*C, E] (partial over tensor shards)
    back = jax.lax.all_to_all(out, EXPERT_AXIS, split_axis=1, concat_axis=0, tiled=True)  # [X, C, E]
    back = back.reshape(num_experts * cap, e)
    y = jnp.take(back, slot, axis=0, mode="fill", fill_value=0)  # [K*n, E]; dropped rows -> 0
    w = jnp.where(kept, weights.reshape(n, k).T.reshape(-1), 0.0)  # [K*n]
    combined = jnp.sum((w[:, None] * y.astype(jnp.float32)).reshape(k, n, e), axis=0)  # [n, E]
    combined = jax.lax.psum(combined, TENSOR_AXIS)  # hidden units were split over tensor (free if size 1)
    return combined.reshape(b, t, e).astype(x.dtype)


# ----------------------------------------------------------------------------- dropless + gmm


def _dropless_shard(x, ids, weights, w_gate, w_up, w_down, *, num_experts, dtype, gmm_impl):
    """One device: all-gather the tokens of the expert group, run local experts with gmm, reduce-scatter."""
    from pallas_kernels.grouped_matmul import gmm

    b, t, e = x.shape
    k = ids.shape[-1]
    x_all = jax.lax.all_gather(x.reshape(b * t, e), EXPERT_AXIS, tiled=True)  # [ep*n, E]
    ids_all = jax.lax.all_gather(ids.reshape(b * t, k), EXPERT_AXIS, tiled=True)  # [ep*n, K]
    n = x_all.shape[0]
    gid = ids_all.reshape(-1)  # [ep*n*K] token-major
    gid = jnp.where((gid >= 0) & (gid < num_experts), gid, num_experts)
    order, inverse, sizes = sort_by_group(gid, num_experts + 1)
    rows = x_all[order // k].astype(dtype)  # [M, E] sorted by expert; group X (no expert) last
    local = w_gate.shape[0]
    offset = jax.lax.axis_index(EXPERT_AXIS) * local
    mm = lambda lhs, rhs: gmm(lhs, rhs.astype(dtype), sizes[:num_experts], impl=gmm_impl, group_offset=offset,
                              preferred_element_type=jnp.float32)  # noqa: E731  rows of other experts -> 0
    h = jax.nn.silu(mm(rows, w_gate)) * mm(rows, w_up)  # [M, F_loc]
    y = mm(h.astype(dtype), w_down)[inverse]  # [ep*n*K, E] back in token-major order
    wts = jax.lax.all_gather(weights.reshape(b * t, k), EXPERT_AXIS, tiled=True).reshape(-1)  # [ep*n*K]
    partial = jnp.sum((wts[:, None] * y).reshape(n, k, e), axis=1)  # [ep*n, E] from local experts only
    combined = jax.lax.psum_scatter(partial, EXPERT_AXIS, scatter_dimension=0, tiled=True)  # [n / ep, E]: own tokens
    combined = jax.lax.psum(combined, TENSOR_AXIS)  # hidden units were split over tensor (free if size 1)
    return combined.reshape(b, t, e).astype(x.dtype)


# ----------------------------------------------------------------------------- public entry


def expert_parallel_ffn(
    x: Float[Array, "B T E"],
    expert_ids: Int[Array, "B T K"],
    weights: Float[Array, "B T K"],
    w_gate: Float[Array, "X E F"],
    w_up: Float[Array, "X E F"],
    w_down: Float[Array, "X F E"],
    *,
    capacity_factor: float = 0.0,
    valid: Optional[Bool[Array, "B T"]] = None,
    mesh: Optional[jax.sharding.AbstractMesh] = None,
    dtype=jnp.float32,
    gmm_impl: str = "auto",
) -> Float[Array, "B T E"]:
    """Routed experts over the expert mesh axis: ``sum_k weights * expert[ids](x)``.

    Args:
      expert_ids: chosen experts per token; ids outside ``[0, X)`` (zero-compute experts) add nothing.
      weights: combine weights of the choices (the router's gates).
      capacity_factor: > 0 selects the all_to_all capacity dispatch (overflow dropped), 0 dropless.
      valid: tokens that take part (others neither use capacity nor get output).
      mesh: default the active mesh (:func:`expert_mesh`); must have axes data, fsdp, tensor, expert.
    Returns:
      [B, T, E] in x.dtype; equals :func:`reference_ffn` whenever no token is dropped.
    """
    mesh = mesh if mesh is not None else expert_mesh()
    if mesh is None:
        raise ValueError("expert_parallel_ffn needs an active mesh with an 'expert' axis > 1 (ling_jax.sharding.activate)")
    missing = {*BATCH_AXES, TENSOR_AXIS} - set(mesh.axis_names)
    if missing:
        raise ValueError(f"mesh lacks axes {sorted(missing)}; expected {(*BATCH_AXES, TENSOR_AXIS)}")
    ep = mesh.shape[EXPERT_AXIS]
    num_experts = w_gate.shape[0]
    if num_experts % ep:
        raise ValueError(f"{num_experts} experts cannot be split over expert axis {ep}")
    if valid is not None:
        expert_ids = jnp.where(valid[..., None], expert_ids, -1)
        weights = jnp.where(valid[..., None], weights, 0.0)
    batch_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if x.shape[0] % batch_shards:
        raise ValueError(f"batch {x.shape[0]} cannot be split over {BATCH_AXES} = {batch_shards} devices")
    tokens_per_device = x.shape[0] // batch_shards * x.shape[1]
    if capacity_factor > 0:
        cap = expert_capacity(tokens_per_device, expert_ids.shape[-1], num_experts, capacity_factor)
        body = lambda *a: _capacity_shard(*a, num_experts=num_experts, cap=cap, dtype=dtype)  # noqa: E731
        check_vma = True
    else:
        body = lambda *a: _dropless_shard(*a, num_experts=num_experts, dtype=dtype, gmm_impl=gmm_impl)  # noqa: E731
        check_vma = False  # Pallas kernels carry no varying-axes types (jax 0.10)
    tokens = P(BATCH_AXES, None, None)
    fn = jax.shard_map(
        body, mesh=mesh, check_vma=check_vma,
        in_specs=(tokens, tokens, tokens, P(EXPERT_AXIS, None, TENSOR_AXIS), P(EXPERT_AXIS, None, TENSOR_AXIS),
                  P(EXPERT_AXIS, TENSOR_AXIS, None)),
        out_specs=tokens,
    )
    return fn(x, expert_ids.astype(jnp.int32), weights.astype(jnp.float32), w_gate, w_up, w_down)
