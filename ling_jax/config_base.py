"""Validation helpers shared by every config dataclass (the mechanism configs beside their
layers and the composition in :mod:`ling_jax.config`)."""

from __future__ import annotations

import math
from typing import Any, Sequence


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""



# ----------------------------------------------------------------------------- validation helpers


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


def _non_negative(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
            raise ConfigError(f"{type(obj).__name__}.{name} must be >= 0 and finite, got {value!r}")


def _positive_float(obj, *names: str) -> None:
    """Finite and > 0 (rejects NaN and inf, which would train to NaN)."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
            raise ConfigError(f"{type(obj).__name__}.{name} must be > 0 and finite, got {value!r}")


def _one_of(obj, name: str, allowed: Sequence[Any]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(f"{type(obj).__name__}.{name} must be one of {list(allowed)}, got {value!r}")


def _in_range(obj, name: str, lo: float, hi: float, *, lo_open=False, hi_open=False) -> None:
    value = getattr(obj, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"{type(obj).__name__}.{name} must be in {interval}, got {value!r}")


def layer_list(spec: str | Sequence[int], num_layers: int, *, field_name: str) -> tuple[int, ...]:
    """Parses a layer selection: "all", "none", "from:2", "every:2", "every:2:1" (offset), "0,3,5"."""
    if not isinstance(spec, str):
        layers = tuple(int(i) for i in spec)
    elif spec == "all":
        layers = tuple(range(num_layers))
    elif spec == "none" or spec == "":
        layers = ()
    elif spec.startswith("from:"):
        layers = tuple(range(int(spec[5:]), num_layers))
    elif spec.startswith("every:"):
        parts = [int(p) for p in spec[6:].split(":")]
        step, offset = parts[0], parts[1] if len(parts) > 1 else 0
        if step <= 0:
            raise ConfigError(f"{field_name}: step in {spec!r} must be positive")
        layers = tuple(range(offset, num_layers, step))
    else:
        try:
            layers = tuple(int(p) for p in spec.split(","))
        except ValueError:
            raise ConfigError(
                f"{field_name} must be 'all', 'none', 'from:L', 'every:N[:offset]' or a comma list "
                f"of layer indices, got {spec!r}"
            ) from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"{field_name} selects layers {bad} that do not exist (model has {num_layers} layers: 0..{num_layers - 1})")
    return tuple(sorted(set(layers)))

