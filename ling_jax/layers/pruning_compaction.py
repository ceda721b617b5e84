"""Prefill compaction for token pruning: later layers run on the kept tokens only.

After a block whose pruner set ``TokenState.prune_select``, :func:`compact_after_block` gathers
the selected tokens into a static capacity ``min(T, budget)`` with a validity mask
(:func:`ling_jax.routing.selection_indices` / :func:`~ling_jax.routing.compact`). Their positions,
mask fields and per-token state (:meth:`TokenState.gather`) travel with them, so RoPE and
causality are unchanged, and the following blocks compute ``C`` tokens and ``C x C`` query-key
pairs instead of ``T`` and ``T x T``. Dropped tokens stop at their current hidden state and
per-token state; :func:`expand_compacted` scatters the survivors back into ``[B, T, ...]`` before
the output head.

Adaptive depth composes with it: Mixture-of-Depths routing and early exit run on whatever
sequence reaches a layer (the compacted one after a compacting pruner), and their per-token state
(exit decisions, layers used) is compacted and expanded with everything else. A dropped token is
not "exited": it reaches the output head from the state it had when it was dropped.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ling_jax.config import ModelConfig
from ling_jax.layers.attention import AttentionMask
from ling_jax.routing import compact, expand, selection_indices, token_capacity
from ling_jax.token_state import TokenState


@flax.struct.dataclass
class Compaction:
    """Where the current (compacted) sequence lives in the original one."""

    full: Float[Array, "B T E"]  # hidden states of the original sequence (dropped tokens frozen)
    full_state: TokenState  # per-token state of the original sequence (dropped tokens frozen)
    index: Int[Array, "B C"]  # original index of each current token
    valid: Bool[Array, "B C"]


def compact_after_block(
    config: ModelConfig, x: Float[Array, "B T E"], mask: AttentionMask, state: TokenState, record: Optional[Compaction]
) -> tuple[Array, AttentionMask, TokenState, Optional[Compaction]]:
    """Drops the tokens the block's pruner did not select (no-op if it selected nothing)."""
    if state.prune_select is None:
        return x, mask, state, record
    select, state = state.prune_select, state.replace(prune_select=None)
    b, t = x.shape[:2]
    if record is None:
        record = Compaction(full=x, full_state=state, index=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
                            valid=mask.q_valid)
    else:  # freeze the tokens dropped now at their current state
        record = record.replace(full=expand(x, record.index, record.valid, record.full),
                                full_state=record.full_state.scatter(state, record.index, record.valid, record.full.shape[1]))
    capacity = token_capacity(t, budget=config.pruning.budget)
    local, local_valid = selection_indices(select & mask.q_valid, capacity)  # [B, C] each
    x = compact(x, local)  # [B, C, E]
    mask = mask.gather(local, local_valid)
    state = state.gather(local)
    record = record.replace(index=compact(record.index, local), valid=compact(record.valid, local) & local_valid)
    return x, mask, state, record


def expand_compacted(x: Float[Array, "B C E"], state: TokenState,
                     record: Optional[Compaction]) -> tuple[Float[Array, "B T E"], TokenState]:
    """The full-length hidden states and token state: compacted tokens scattered back over the
    frozen ones."""
    if record is None:
        return x, state
    t = record.full.shape[1]
    return (expand(x, record.index, record.valid, record.full),
            record.full_state.scatter(state, record.index, record.valid, t))
