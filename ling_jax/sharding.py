"""Device meshes and sharding by logical axis names.

Every parameter carries logical axis names (``param_with_axes``); one rules table,
:data:`LOGICAL_RULES`, maps them to the mesh axes ``data``, ``fsdp``, ``tensor``, ``expert``.
Flax resolves the rules in order and gives each mesh axis to at most one array dimension, so
the same table serves weights and activations::

    batch    -> (data, fsdp, expert)   activations: data parallel over every batch-carrying axis
    embed    -> fsdp                   weights: ZeRO-3 (in activations fsdp is taken by batch)
    heads, kv_heads, mlp, vocab -> tensor   Megatron-style tensor parallelism
    expert   -> expert                 MoE experts (outside MoE layers the axis carries batch)
    length, head_dim, latent, layers -> replicated

Parameter, optimizer-state and batch shardings come from ``jax.eval_shape`` of the boxed
``init_state``; nothing is allocated to compute them. Activation constraints
(``nn.with_logical_constraint`` in the layers) resolve when a step is traced inside
:func:`activate`; ``ling_jax.train.jit_train_step`` and ``jit_eval_step`` do that for you.

This module sits below :mod:`ling_jax.train`: it reads the state's shape from
:mod:`ling_jax.train_state` and never imports the training loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ling_jax.config import Config, ConfigError
from ling_jax.model import Transformer
from ling_jax.train_state import init_state

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")  # mesh axes that split the batch outside MoE layers

# The one rules table: (logical axis, mesh axis | tuple of mesh axes | None = replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("latent", None),  # low-rank bottlenecks of multi-head latent attention (small: replicated)
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("vocab", "tensor"),
    ("layers", None),
)
RULED_NAMES = frozenset(name for name, _ in LOGICAL_RULES)


# ----------------------------------------------------------------------------- mesh


def make_mesh(config: Config, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The device mesh of ``config.mesh`` over `devices` (default: all devices of all hosts).

    Raises ConfigError if the axis sizes do not multiply to the device count or the model/batch
    does not split evenly over them.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.mesh.resolve(len(devices))
    config.mesh.check_fits(config.model, config.train.batch_size, sizes)
    shape = tuple(sizes[a] for a in MESH_AXES)
    # jax.make_mesh orders devices by the physical topology (TPU ICI) when it can.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return {name: int(size) for name, size in mesh.shape.items()}


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[None]:
    """Makes `mesh` and the rules table current, so ``nn.with_logical_constraint`` resolves.

    Usable inside a jitted function while it is traced (this is how :func:`within` uses it).
    """
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def within(mesh: Mesh, fn: Callable) -> Callable:
    """`fn` traced under :func:`activate` (wrap a step function before ``jax.jit``)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activate(mesh):
            return fn(*args, **kwargs)

    return wrapped


# ----------------------------------------------------------------------------- logical specs


def logical_state_specs(config: Config, model: Optional[nn.Module] = None) -> Any:
    """TrainState of logical PartitionSpecs (axis names like ``P('embed', 'mlp')``).

    Derived with ``jax.eval_shape`` from the boxed ``init_state``: optimizer moments inherit the
    names of their parameters; scalars and unboxed collections get ``P()``.
    """
    model = model or Transformer(config.model)
    boxed = jax.eval_shape(functools.partial(init_state, config, model, unbox=False), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def unruled_names(specs: Any) -> set[str]:
    """Logical axis names in `specs` that have no rule (they would silently replicate)."""
    names = set()
    for spec in jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P)):
        names.update(n for n in tuple(spec) if isinstance(n, str))
    return names - RULED_NAMES


def to_mesh_spec(logical: P) -> P:
    """A logical PartitionSpec resolved by the rules table."""
    return nn.logical_to_mesh_axes(tuple(logical), LOGICAL_RULES)


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def partition_table(config: Config) -> dict[str, dict[str, list]]:
    """``{param path: {"logical": [...], "mesh": [...]}}`` for every parameter (golden files)."""
    specs = logical_state_specs(config).params
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    as_list = lambda spec: [list(a) if isinstance(a, tuple) else a for a in tuple(spec)]  # noqa: E731
    return {_path_name(path): {"logical": as_list(spec), "mesh": as_list(to_mesh_spec(spec))}
            for path, spec in flat}


def replicated_params(config: Config) -> list[str]:
    """Parameters that every device holds whole (no dimension maps to a mesh axis)."""
    return sorted(name for name, row in partition_table(config).items() if all(a is None for a in row["mesh"]))


# ----------------------------------------------------------------------------- shardings


def _check_even(abstract: Any, shardings: Any, logical: Any) -> None:
    """Every sharded dimension must split evenly (jit refuses uneven input shardings)."""
    flat_a = jax.tree_util.tree_flatten_with_path(abstract)[0]
    flat_s = jax.tree_util.tree_leaves(shardings)
    flat_l = jax.tree_util.tree_leaves(logical, is_leaf=lambda x: isinstance(x, P))
    for (path, leaf), sharding, names in zip(flat_a, flat_s, flat_l):
        sizes = mesh_sizes(sharding.mesh)
        for dim, (n, axes) in enumerate(zip(leaf.shape, sharding.spec)):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            shards = math.prod(sizes[a] for a in axes)
            if n % shards:
                raise ConfigError(
                    f"parameter {_path_name(path)} dimension {dim} ({tuple(names)[dim]!r}, size {n}) cannot be "
                    f"split over mesh axes {axes} of total size {shards}; change MeshConfig or the model size"
                )


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a sharded run needs: the mesh, TrainState shardings and the batch sharding."""

    mesh: Mesh
    state: Any  # TrainState of NamedSharding
    batch: NamedSharding  # every [B, T] batch array

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())


def state_shardings(config: Config, mesh: Mesh, model: Optional[nn.Module] = None) -> Any:
    """TrainState of NamedShardings on `mesh` (params, optimizer state, step, extra collections)."""
    model = model or Transformer(config.model)
    logical = logical_state_specs(config, model)
    missing = unruled_names(logical)
    if missing:
        raise ConfigError(f"logical axis names {sorted(missing)} have no rule in ling_jax.sharding.LOGICAL_RULES "
                          f"(ruled: {sorted(RULED_NAMES)})")
    shardings = nn.logical_to_mesh_sharding(logical, mesh, LOGICAL_RULES)
    abstract = jax.eval_shape(functools.partial(init_state, config, model), jax.random.key(0))
    if jax.tree_util.tree_structure(abstract) != jax.tree_util.tree_structure(shardings):
        raise AssertionError("sharding tree does not match the TrainState tree (init_state changed?)")
    _check_even(abstract, shardings, logical)
    return shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of every ``[B, T]`` batch array: rows over the batch axes, positions replicated."""
    return NamedSharding(mesh, to_mesh_spec(P("batch", "length")))


def plan(config: Config, model: Optional[nn.Module] = None, devices: Optional[Sequence[jax.Device]] = None) -> Plan:
    mesh = make_mesh(config, devices)
    return Plan(mesh=mesh, state=state_shardings(config, mesh, model), batch=batch_sharding(mesh))


def abstract_state(config: Config, model: nn.Module, shardings: Any) -> Any:
    """TrainState of ShapeDtypeStructs carrying `shardings` (a restore target for another mesh)."""
    shapes = jax.eval_shape(functools.partial(init_state, config, model), jax.random.key(0))
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_sharded_state(config: Config, model: nn.Module, rng: jax.Array, shardings: Any) -> Any:
    """``init_state`` computed directly into its shards (no device ever holds the whole model)."""
    # Traced without the mesh context: init runs the model on a batch of one (no activation rules,
    # no expert-parallel dispatch); the out_shardings place every parameter.
    return jax.jit(functools.partial(init_state, config, model), out_shardings=shardings)(rng)


# ----------------------------------------------------------------------------- batches and hosts


def host_slice(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
    """(host_index, host_count) for reading this process's rows of the global batch.

    Processes whose devices hold the same rows (replicas along non-batch axes) read the same
    slice; distinct slices are numbered in row order, matching ``build_data(host_index=, host_count=)``.
    """
    blocks: dict[int, set[tuple[int, int]]] = {}
    for device, index in sharding.devices_indices_map((batch_size, 1)).items():
        start, stop, _ = index[0].indices(batch_size)
        blocks.setdefault(device.process_index, set()).add((start, stop))
    spans = {process: _contiguous_span(process, b) for process, b in blocks.items()}
    distinct = sorted(set(spans.values()))
    width = batch_size // len(distinct)
    if distinct != [(i * width, (i + 1) * width) for i in range(len(distinct))]:
        raise ValueError(f"hosts hold uneven or overlapping batch rows {distinct} of {batch_size}")
    return distinct.index(spans[jax.process_index()]), len(distinct)


def _contiguous_span(process: int, blocks: set[tuple[int, int]]) -> tuple[int, int]:
    ordered = sorted(blocks)
    lo, hi = ordered[0]
    for start, stop in ordered[1:]:
        if start > hi:
            raise ValueError(f"process {process} holds non-contiguous batch rows {ordered}; order the mesh so "
                             "that each host's devices hold one block of rows")
        hi = max(hi, stop)
    return lo, hi


def global_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding, batch_size: int) -> dict[str, jax.Array]:
    """Assembles global ``[batch_size, T]`` arrays from this host's rows.

    A host may pass either its own rows (from ``build_data(host_index=, host_count=)``) or the
    whole global batch (every host the same), e.g. evaluation batches.
    """
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (batch_size,) + np.shape(v)[1:])
            for k, v in batch.items()}
