"""`Batch`: the one container every data source (text corpus, synthetic tasks) returns."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: array fields have no scalar ==
class Batch:
    """A batch of next-token examples, host-side numpy arrays, all of shape [B, T].

    Attributes:
      inputs: [B, T] int32 token ids (bytes, 0..255) fed to the model.
      targets: [B, T] int32 next-token ids; `targets[:, t]` is the token following `inputs[:, t]`.
      loss_mask: [B, T] float32, 1.0 where the prediction of `targets[:, t]` is scored.
      oracle_mask: [B, T] bool over *input* positions: the tokens that carry the answer (what an
        ideal token-pruning policy must keep). All False for plain text.

    The constructor casts to these dtypes and checks that all four are 2-D with one shape.
    """

    inputs: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    oracle_mask: np.ndarray

    def __post_init__(self) -> None:
        casts = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32, "oracle_mask": np.bool_}
        for name, dtype in casts.items():
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype))
        shape = self.inputs.shape
        if len(shape) != 2:
            raise ValueError(f"Batch.inputs must be 2-D [B, T], got shape {shape}")
        for name in casts:
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"Batch.{name} has shape {getattr(self, name).shape}, expected {shape} (the inputs shape)"
                )

    @property
    def batch_size(self) -> int:
        """B."""
        return self.inputs.shape[0]

    @property
    def seq_len(self) -> int:
        """T."""
        return self.inputs.shape[1]

    def as_dict(self) -> dict[str, np.ndarray]:
        """The four [B, T] arrays keyed by field name (e.g. to pass to a jitted step as a pytree)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def rows(self, start: int, stop: int) -> Batch:
        """The sub-batch of rows [start, stop), e.g. one host's slice of a global batch."""
        return Batch(**{k: v[start:stop] for k, v in self.as_dict().items()})

    @staticmethod
    def concatenate(batches: list[Batch]) -> Batch:
        """Stack batches along B (the inverse of slicing a global batch into host slices)."""
        if not batches:
            raise ValueError("Batch.concatenate needs at least one batch")
        names = [f.name for f in dataclasses.fields(Batch)]
        return Batch(**{n: np.concatenate([getattr(b, n) for b in batches]) for n in names})


def host_rows(batch_size: int, host_index: int, host_count: int) -> tuple[int, int]:
    """Rows [start, stop) of a global batch of `batch_size` rows that host `host_index` reads.

    Raises ValueError unless 0 <= host_index < host_count and host_count divides batch_size.
    """
    for name, value in (("batch_size", batch_size), ("host_count", host_count)):
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(host_index, (int, np.integer)) or not 0 <= host_index < host_count:
        raise ValueError(f"host_index must be an int in [0, host_count={host_count}), got {host_index!r}")
    if batch_size % host_count:
        raise ValueError(f"batch_size={batch_size} must be divisible by host_count={host_count}")
    per_host = batch_size // host_count
    return host_index * per_host, (host_index + 1) * per_host
