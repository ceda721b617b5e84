"""Grouped matmul for MoE expert dispatch: `gmm` (differentiable) and `tgmm` (weight gradient).

Implementations (`impl=`): "reference" (per-group loop), "xla" (tiled XLA loop on CPU /
`jax.lax.ragged_dot` on accelerators), "pallas" (TPU Mosaic kernel `tpu.py` or GPU Triton kernel
`gpu.py`, interpret mode off-platform), "auto". See `api.py` for the exact contract.
"""

from pallas_kernels.grouped_matmul.api import IMPLS, gmm, tgmm

__all__ = ["gmm", "tgmm", "IMPLS"]
