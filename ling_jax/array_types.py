"""Array types for jaxtyping annotations of entry points that take host or device arrays.

Functions called from the data pipeline or from tests receive NumPy batches as well as JAX arrays
(``model.apply(variables, batch.inputs)``); annotate them with :data:`HostArray` inside a dtype,
e.g. ``Int[HostArray, "B T"]``, so the run-time checker (jaxtyping's import hook, on in the test
run: ``tests/conftest.py``) accepts both. Traced values are ``jax.Array`` instances.
"""

from __future__ import annotations

from typing import Union

import jax
import numpy as np

HostArray = Union[jax.Array, np.ndarray]
