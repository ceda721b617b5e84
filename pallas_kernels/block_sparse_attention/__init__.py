"""Block-sparse flash attention (Pallas TPU + GPU kernels) that skips pruned blocks.

`block_sparse_attention` turns token keep masks into a block schedule and computes only the
(query block, key block) tiles holding at least one visible pair; see `api.py` for semantics.
"""

from pallas_kernels.block_sparse_attention.api import IMPLS, block_sparse_attention
from pallas_kernels.block_sparse_attention.reference import attention_mask, reference_attention
from pallas_kernels.block_sparse_attention.schedule import (
    BlockSchedule,
    build_block_schedule,
    count_visited_blocks,
)

__all__ = [
    "IMPLS",
    "BlockSchedule",
    "attention_mask",
    "block_sparse_attention",
    "build_block_schedule",
    "count_visited_blocks",
    "reference_attention",
]
