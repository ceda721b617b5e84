"""The test run checks annotations: jaxtyping's import hook (installed in tests/conftest.py) makes
every annotated function of ling_jax and pallas_kernels check its arguments' types, shapes and
dtypes with beartype. These tests fail if the hook is not installed."""

import os

import jax.numpy as jnp
import jaxtyping
import pytest

from ling_jax.layers.attention import reference_attention
from pallas_kernels.grouped_matmul.reference import gmm_loop

pytestmark = pytest.mark.skipif(os.environ.get("LING_JAX_TYPECHECK") == "0",
                                reason="type checking switched off with LING_JAX_TYPECHECK=0")


def _qkv(dq=8, dk=8):
    q = jnp.zeros((1, 4, 2, dq))  # [B, Tq, H, D]
    k = jnp.zeros((1, 4, 2, dk))  # [B, Tk, Hkv, D]
    return q, k, jnp.zeros((1, 4, 2, 8)), jnp.ones((1, 4, 4), bool)


def test_well_typed_call_passes():
    q, k, v, mask = _qkv()
    assert reference_attention(q, k, v, mask).shape == (1, 4, 2, 8)


def test_mismatched_shapes_are_refused():
    q, k, v, mask = _qkv(dk=6)  # query and key head sizes differ: "D" binds to 8, then 6
    with pytest.raises(jaxtyping.TypeCheckError, match="reference_attention"):
        reference_attention(q, k, v, mask)


def test_wrong_dtype_is_refused():
    q, k, v, mask = _qkv()
    with pytest.raises(jaxtyping.TypeCheckError, match="mask"):
        reference_attention(q, k, v, mask.astype(jnp.float32))  # Bool mask annotated


def test_pallas_kernels_are_checked_too():
    lhs, rhs = jnp.zeros((6, 4)), jnp.zeros((2, 4, 3))  # [m, k], [g, k, n]
    with pytest.raises(jaxtyping.TypeCheckError, match="gmm_loop"):
        gmm_loop(lhs, rhs, jnp.array([3.0, 3.0]))  # group sizes annotated Int

