"""Subword text data: batches of a byte corpus tokenized with a ``tokenizer.json``.

Training batches stay a pure function of (seed, step): each row draws a byte offset with
``np.random.default_rng([seed, step])`` (as :func:`ling_jax.data.text_batch` does), tokenizes the
bytes from there and keeps the first ``seq_len + 1`` tokens, so the 30 MB default corpus is never
tokenized as a whole. Evaluation tokenizes the validation split once and takes the same fixed,
non-overlapping windows as byte-level evaluation; :func:`eval_bytes_per_token` is the exact
number of UTF-8 bytes the scored target tokens cover, which turns nats per token into bits per
byte (``bpb = nats / ln 2 / bytes_per_token``).
"""

from __future__ import annotations

import numpy as np

from ling_jax.data.batch import Batch, host_rows
from ling_jax.data.corpus import DataError, eval_batches


def _row(data: np.ndarray, start: int, tokenizer, seq_len: int) -> np.ndarray:
    width = 8 * (seq_len + 1)
    while True:  # widen the byte window until it holds seq_len + 1 tokens (or the corpus ends)
        chunk = bytes(data[start:start + width])
        ids = tokenizer.encode(chunk.decode("utf-8", errors="replace"))
        if len(ids) >= seq_len + 1 or start + width >= len(data):
            break
        width *= 2
    if len(ids) < seq_len + 1:  # near the end of the corpus: pad by wrapping to its start
        ids = np.concatenate([ids, _row(data, 0, tokenizer, seq_len)])
    return ids[: seq_len + 1]


def subword_batch(data: np.ndarray, tokenizer, *, seed: int, step: int, batch_size: int, seq_len: int,
                  host_index: int = 0, host_count: int = 1) -> Batch:
    """This host's rows of a global batch of ``seq_len + 1``-token windows (see the module docstring)."""
    start, stop = host_rows(batch_size, host_index, host_count)
    if len(data) < 2:
        raise DataError(f"the corpus has {len(data)} bytes: too little text to tokenize")
    offsets = np.random.default_rng([seed, step]).integers(0, max(len(data) - 8 * (seq_len + 1), 1), size=batch_size)
    rows = np.stack([_row(data, int(o), tokenizer, seq_len) for o in offsets[start:stop]])  # [B, T + 1]
    shape = (stop - start, seq_len)
    return Batch(inputs=rows[:, :-1], targets=rows[:, 1:], loss_mask=np.ones(shape, np.float32),
                 oracle_mask=np.zeros(shape, np.bool_))


def subword_eval(valid: np.ndarray, tokenizer, *, batch_size: int, seq_len: int, num_batches: int) -> tuple[list[Batch], float]:
    """Fixed evaluation batches of the tokenized validation split, and their bytes per scored token."""
    ids, nbytes = tokenizer.encode_bytes(valid)
    try:
        batches = eval_batches(ids, batch_size=batch_size, seq_len=seq_len, num_batches=num_batches)
        positions = eval_batches(np.arange(len(ids)), batch_size=batch_size, seq_len=seq_len, num_batches=num_batches)
    except DataError as e:
        raise DataError(f"the tokenized validation split has {len(ids)} tokens, too few for the evaluation "
                        f"batches: {e}") from None
    covered = sum(int(np.sum(nbytes[b.targets])) for b in positions)
    scored = sum(int(b.targets.size) for b in positions)
    return batches, covered / max(scored, 1)
