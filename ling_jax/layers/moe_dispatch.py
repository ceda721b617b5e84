"""MoE dispatch: run each token's chosen experts and combine, behind one ``impl`` switch.

Every impl computes the same function of flattened tokens ``x [N, E]``:

    y[n] = sum_k  weights[n, k] * swiglu_{ids[n, k]}(x[n])   over the slots with active[n, k]

where ``active`` already excludes invalid (padding) tokens, zero-compute experts and assignments
dropped by capacity (see :func:`capacity_keep`). Impls:

* ``reference``: loop over experts, each applied to every token and masked: the ground truth.
* ``dense``: GShard one-hot dispatch / combine einsums into ``[X, capacity, E]`` expert buffers,
  batched expert matmuls. Costs ``O(N * N k / X)`` extra (the one-hot einsums): fine for small N.
* ``sorted``: sort assignments by expert (:func:`ling_jax.routing.sort_by_group`), grouped SwiGLU
  over the sorted rows, scatter back (:mod:`ling_jax.layers.moe_sorted`). Dropless, no padding:
  the fastest impl on CPU.
* ``pallas``: sorted rows through the grouped-matmul kernel
  ``pallas_kernels.grouped_matmul.gmm(impl="pallas")`` (interpret mode off TPU/GPU).
* ``auto``: ``pallas`` on TPU/GPU, ``sorted`` on CPU.

Capacity policy (shared by all impls): each real expert accepts at most ``capacity`` assignments;
priority goes to all tokens' first choices, then all second choices, and so on, and within one
top-k slot to tokens earlier in the flattened batch (row-major ``[B, T]``). Assignments beyond the
capacity are dropped: they contribute zero (the token keeps its residual stream, its other experts
and the shared experts). ``capacity_factor == 0`` is dropless.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ling_jax.layers.moe_sorted import grouped_swiglu
from ling_jax.routing import expert_capacity, group_starts, rank_in_group, sort_by_group

__all__ = ["IMPLS", "capacity_keep", "dispatch", "expert_capacity", "resolve_impl"]

IMPLS = ("reference", "dense", "sorted", "pallas", "auto")
F32 = jnp.float32


def resolve_impl(impl: str) -> str:
    """`auto` -> `pallas` on TPU/GPU, `sorted` on CPU; other names pass through (validated)."""
    if impl not in IMPLS:
        raise ValueError(f"MoE dispatch impl must be one of {list(IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("tpu", "gpu") else "sorted"
    return impl


def _priority_ids(ids: Int[Array, "N K"], active: Bool[Array, "N K"], num_experts: int) -> Int[Array, " KN"]:
    """Expert id per assignment in priority order (slot-major: [K, N] flattened); inactive -> X."""
    return jnp.where(active, ids, num_experts).T.reshape(-1)  # [K*N]


def capacity_keep(
    ids: Int[Array, "N K"], active: Bool[Array, "N K"], num_experts: int, capacity: int
) -> Bool[Array, "N K"]:
    """Which active assignments fit their expert's capacity (priority policy in the module doc)."""
    n, k = ids.shape
    if capacity >= n:
        return active  # nothing can overflow
    gid = _priority_ids(ids, active, num_experts)  # [K*N]
    rank, _, _ = rank_in_group(gid, num_experts + 1)  # [K*N] position within the expert, in priority order
    keep = (gid < num_experts) & (rank < capacity)
    return keep.reshape(k, n).T  # [N, K]


def _swiglu(x, w_gate, w_up, w_down):
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


# ----------------------------------------------------------------------------- impls


def reference_dispatch(x, ids, weights, active, w_gate, w_up, w_down):
    """Loop over experts; each sees every token, masked by its combine coefficient."""
    y = jnp.zeros(x.shape, F32)
    for g in range(w_gate.shape[0]):
        coef = jnp.sum(jnp.where(active & (ids == g), weights, 0.0), axis=-1)  # [N]
        y = y + coef[:, None] * _swiglu(x, w_gate[g], w_up[g], w_down[g]).astype(F32)
    return y


def dense_dispatch(x, ids, weights, active, w_gate, w_up, w_down, *, capacity: int):
    """GShard: one-hot dispatch [N, X, C] -> expert buffers [X, C, E] -> one-hot combine."""
    n, k = ids.shape
    num_experts = w_gate.shape[0]
    gid = _priority_ids(ids, active, num_experts)  # [K*N] priority order
    pos, _, _ = rank_in_group(gid, num_experts + 1)  # [K*N] slot in the expert
    slot = jax.nn.one_hot(pos, capacity, dtype=F32) * (gid < num_experts)[:, None]  # [K*N, C]
    onehot = jax.nn.one_hot(gid, num_experts, dtype=F32).reshape(k, n, num_experts)  # [K, N, X]; inactive rows 0
    slot = slot.reshape(k, n, capacity)  # [K, N, C]
    dispatch = jnp.einsum("knx,knc->nxc", onehot, slot)  # [N, X, C] 0/1
    w = jnp.where(active, weights, 0.0).T  # [K, N]
    combine = jnp.einsum("knx,knc,kn->nxc", onehot, slot, w)  # [N, X, C]
    xe = jnp.einsum("nxc,ne->xce", dispatch.astype(x.dtype), x)  # [X, C, E]
    h = jax.nn.silu(jnp.einsum("xce,xef->xcf", xe, w_gate)) * jnp.einsum("xce,xef->xcf", xe, w_up)
    ye = jnp.einsum("xcf,xfe->xce", h, w_down)  # [X, C, E]
    return jnp.einsum("nxc,xce->ne", combine, ye.astype(F32))


def _sorted_rows(ids, weights, active, num_experts):
    """Assignments sorted by expert: (token of each row, its weight, starts [X], sizes [X])."""
    n, k = ids.shape
    gid = jnp.where(active, ids, num_experts).reshape(-1)  # [N*K] token-major; inactive -> group X
    order, _, sizes = sort_by_group(gid, num_experts + 1)
    sizes = sizes[:num_experts]  # [X]; group X (inactive) sorts last and is never computed
    starts = group_starts(sizes)
    tokens = order // k  # [N*K]
    w = jnp.where(active, weights, 0.0).reshape(-1)[order]  # [N*K]
    return tokens, w, starts, sizes


def sorted_dispatch(x, ids, weights, active, w_gate, w_up, w_down, *, tiles=None, contiguous=None):
    """Sorted rows through the fused gather-SwiGLU-scatter loop (`grouped_swiglu`, options ``tiles``,
    ``contiguous``)."""
    tokens, w, starts, sizes = _sorted_rows(ids, weights, active, w_gate.shape[0])
    return grouped_swiglu(x, tokens, w, starts, sizes, w_gate, w_up, w_down, tiles=tiles, contiguous=contiguous)


def pallas_dispatch(x, ids, weights, active, w_gate, w_up, w_down, *, gmm_impl="pallas", interpret=None):
    """Sorted rows [N*K, E] through three grouped matmuls; rows past the groups come back zero."""
    from pallas_kernels.grouped_matmul import gmm

    tokens, w, _, sizes = _sorted_rows(ids, weights, active, w_gate.shape[0])
    rows = x[tokens]  # [N*K, E] sorted by expert
    mm = lambda lhs, rhs: gmm(lhs, rhs, sizes, impl=gmm_impl, interpret=interpret)  # noqa: E731
    h = jax.nn.silu(mm(rows, w_gate)) * mm(rows, w_up)  # [N*K, F]
    y = mm(h, w_down)  # [N*K, E]
    return jnp.zeros(x.shape, F32).at[tokens].add(y.astype(F32) * w[:, None])


def dispatch(
    x: Float[Array, "N E"],
    ids: Int[Array, "N K"],
    weights: Float[Array, "N K"],
    active: Bool[Array, "N K"],
    w_gate: Float[Array, "X E F"],
    w_up: Float[Array, "X E F"],
    w_down: Float[Array, "X F E"],
    *,
    impl: str = "auto",
    capacity: int | None = None,
    **options,
) -> Float[Array, "N E"]:
    """Weighted sum of each token's active experts (float32). See the module docstring.

    ``capacity`` (static) sizes the ``dense`` impl's expert buffers and must be at least the
    largest number of active assignments of one expert (default N: always enough).
    """
    impl = resolve_impl(impl)
    n = x.shape[0]
    if ids.shape != weights.shape or ids.shape != active.shape or ids.shape[0] != n:
        raise ValueError(f"ids {ids.shape}, weights {weights.shape}, active {active.shape} must all be [N={n}, K]")
    weights = weights.astype(F32)
    if impl == "reference":
        return reference_dispatch(x, ids, weights, active, w_gate, w_up, w_down)
    if impl == "dense":
        cap = n if capacity is None else min(int(capacity), n)
        return dense_dispatch(x, ids, weights, active, w_gate, w_up, w_down, capacity=max(cap, 1))
    if impl == "sorted":
        return sorted_dispatch(x, ids, weights, active, w_gate, w_up, w_down, **options)
    return pallas_dispatch(x, ids, weights, active, w_gate, w_up, w_down, **options)
