"""Prefill compaction for token pruning: later layers run on the kept tokens only.

After a block whose pruner set ``carry[COMPACT_SELECT]``, :func:`compact_after_block` gathers the
selected tokens into a static capacity ``min(T, budget)`` with a validity mask
(:func:`ling_jax.routing.selection_indices` / :func:`~ling_jax.routing.compact`). Their positions,
mask fields and per-token carry travel with them, so RoPE and causality are unchanged, and the
following blocks compute ``C`` tokens and ``C x C`` query-key pairs instead of ``T`` and ``T x T``.
Dropped tokens stop at their current hidden state; :func:`expand_compacted` scatters the survivors
back into ``[B, T, E]`` before the output head.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ling_jax.config import ModelConfig
from ling_jax.layers.attention import AttentionMask
from ling_jax.layers.pruning import COMPACT_SELECT
from ling_jax.routing import compact, expand, selection_indices


@flax.struct.dataclass
class Compaction:
    """Where the current (compacted) sequence lives in the original one."""

    full: Float[Array, "B T E"]  # hidden states of the original sequence (dropped tokens frozen)
    index: Int[Array, "B C"]  # original index of each current token
    valid: Bool[Array, "B C"]


def _per_token(value, b: int, t: int) -> bool:
    return hasattr(value, "shape") and value.ndim >= 2 and value.shape[:2] == (b, t)


def compact_after_block(
    config: ModelConfig, x: Float[Array, "B T E"], mask: AttentionMask, carry: dict, state: Optional[Compaction]
) -> tuple[Array, AttentionMask, dict, Optional[Compaction]]:
    """Drops the tokens the block's pruner did not select (no-op if it selected nothing)."""
    if COMPACT_SELECT not in carry:
        return x, mask, carry, state
    if config.depth.mod_enabled or config.depth.exit_enabled:
        raise ValueError("pruning compaction is not combined with adaptive depth yet: set "
                         "model.pruning.compaction=false, or model.depth.mod_enabled=false and "
                         "model.depth.exit_enabled=false")
    select = carry[COMPACT_SELECT]
    carry = {k: v for k, v in carry.items() if k != COMPACT_SELECT}
    b, t = x.shape[:2]
    if state is None:
        state = Compaction(full=x, index=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), valid=mask.q_valid)
    else:  # freeze the tokens dropped now at their current state
        state = state.replace(full=expand(x, state.index, state.valid, state.full))
    capacity = min(t, config.pruning.budget)
    local, local_valid = selection_indices(select & mask.q_valid, capacity)  # [B, C] each
    x = compact(x, local)  # [B, C, E]
    mask = mask.gather(local, local_valid)
    carry = {k: compact(v, local) if _per_token(v, b, t) else v for k, v in carry.items()}
    state = Compaction(full=state.full, index=compact(state.index, local), valid=compact(state.valid, local) & local_valid)
    return x, mask, carry, state


def expand_compacted(x: Float[Array, "B C E"], state: Optional[Compaction]) -> Float[Array, "B T E"]:
    """The full-length hidden states: compacted tokens scattered back over the frozen ones."""
    if state is None:
        return x
    return expand(x, state.index, state.valid, state.full)
