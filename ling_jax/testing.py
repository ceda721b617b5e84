"""Test helpers shared by every test module: one dtype-aware tolerance table; fast compiles for
end-to-end tests."""

from __future__ import annotations

import contextlib
from typing import Iterator

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Tolerances by the *lowest-precision* dtype involved in a comparison. Gradients accumulate
# more rounding than forwards, so they get a looser factor (`kind="grad"`).
_TOLERANCES = {
    jnp.dtype(jnp.float32): dict(rtol=2e-5, atol=2e-5),
    jnp.dtype(jnp.bfloat16): dict(rtol=2e-2, atol=2e-2),
    jnp.dtype(jnp.float16): dict(rtol=5e-3, atol=5e-3),
}
# "external": against an independent implementation (Hugging Face transformers in torch), on the
# scale of the expected output: max |actual - expected| <= 0.1 x the forward atol x max |expected|
# (2e-6 in float32). Measured in float32 on the interop fixtures and five other weight draws of each
# family (transformers 5.24, CPU): 1.5e-7 to 8.2e-7 for logits and single layers; 5e-6 to 1.4e-5 with
# DeepSeek's latent norms at the config's epsilon instead of 1e-6. Logits of tied embeddings reach
# 40 where the others stay near 4, and the error grows with that scale, so an elementwise rtol/atol
# loose enough for them would hide such a defect in the others.
_KIND_FACTOR = {"forward": 1.0, "grad": 5.0, "external": 0.1}


def tolerances(dtype, kind: str = "forward") -> dict[str, float]:
    """rtol/atol for comparing results computed in `dtype` (forward or grad; for "external" the atol
    is relative to the expected output's largest magnitude, see `assert_close`)."""
    if kind not in _KIND_FACTOR:
        raise ValueError(f"kind must be one of {sorted(_KIND_FACTOR)}, got {kind!r}")
    base = _TOLERANCES.get(jnp.dtype(dtype))
    if base is None:
        raise ValueError(f"no tolerance defined for dtype {dtype}; known: {list(_TOLERANCES)}")
    f = _KIND_FACTOR[kind]
    return {k: v * f for k, v in base.items()}


def assert_close(actual, expected, dtype=None, kind: str = "forward") -> None:
    """Tree-wise allclose with the tolerance of `dtype` (default: lowest precision in `actual`);
    kind="external" compares each leaf on its expected values' scale (atol x max |expected|, no rtol)."""
    if dtype is None:
        leaves = [np.asarray(x) for x in _leaves(actual)]
        dtypes = [jnp.dtype(x.dtype) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
        dtype = min(dtypes, key=lambda d: jnp.finfo(d).bits) if dtypes else jnp.float32
    tol = tolerances(dtype, kind)
    to32 = lambda t: _tree_map(lambda x: np.asarray(x, dtype=np.float32), t)
    if kind == "external":
        scaled = lambda a, e: np.testing.assert_allclose(a, e, rtol=0, atol=tol["atol"] * np.max(np.abs(e), initial=0))
        _tree_map(scaled, to32(actual), to32(expected))
        return
    chex.assert_trees_all_close(to32(actual), to32(expected), **tol)


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def _tree_map(fn, tree, *rest):
    import jax

    return jax.tree_util.tree_map(fn, tree, *rest)


# End-to-end tests (the experiment scripts' smoke preset, the notebook) compile dozens of tiny
# programs and run each only a few steps, so XLA's optimization passes are most of their time.
FAST_COMPILE_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # the same, for a subprocess or kernel


@contextlib.contextmanager
def fast_compile() -> Iterator[None]:
    """Compile with most XLA optimizations off inside the block (several times faster to compile,
    slower to run; results equal up to float rounding). Only for tests that assert what a pipeline
    produces, not exact numbers; executables compiled inside stay cached for their jitted function."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


def greedy_by_forward(config, variables: dict, prompt, steps: int) -> np.ndarray:
    """``steps`` greedy tokens after ``prompt`` [B, P] by a loop of full forward passes of
    ``Transformer(config)``: the reference that KV-cache decoding is checked against. Each pass
    reads the logits after the last token chosen so far; the sequence is right-padded to
    ``P + steps`` so one compiled program serves every pass (a causal model's logits at a
    position do not depend on later tokens)."""
    from ling_jax.model import Transformer

    p = prompt.shape[1]
    seq = np.zeros((prompt.shape[0], p + steps), np.int32)
    seq[:, :p] = prompt
    forward = jax.jit(Transformer(config).apply)
    for i in range(steps):
        seq[:, p + i] = np.argmax(np.asarray(forward(variables, seq))[:, p + i - 1], axis=-1)
    return seq[:, p:]
