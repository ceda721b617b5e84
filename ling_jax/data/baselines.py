"""Classic-compressor baselines in bits per byte (bpb), to put model losses in context.

A uniform model over 256 byte values costs 8.0 bpb. `zlib_bpb` is what DEFLATE achieves on the
bytes themselves; `ngram_bpb` is the cross-entropy of a smoothed byte n-gram model fit on train.
"""

from __future__ import annotations

import zlib

import numpy as np

MAX_ORDER = 6  # (order + 1) bytes must fit in an int64 n-gram code
_DENSE_MAX_BYTES = 3  # n-grams up to 3 bytes (256**3 = 16.7M counters) use dense bincount


def _as_uint8(data: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(data)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D byte array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"{name} must hold byte values 0..255")
        arr = arr.astype(np.uint8)
    return arr


def zlib_bpb(data: np.ndarray, level: int = 9) -> float:
    """zlib-compressed size in bits divided by the number of bytes of `data` ([N] uint8)."""
    arr = _as_uint8(data, "data")
    return 8.0 * len(zlib.compress(arr.tobytes(), level)) / arr.size


def _codes(data: np.ndarray, k: int) -> np.ndarray:
    """[N - k] int64 codes of the (k+1)-grams data[i-k .. i] for i >= k (big-endian base 256)."""
    n = len(data)
    codes = np.zeros(n - k, dtype=np.int64)
    for j in range(k + 1):
        codes = (codes << 8) | data[j : n - k + j].astype(np.int64)
    return codes


class _Counts:
    """(k+1)-gram counts of a byte string, queried per n-gram code.

    `lookup(codes)` returns, for each [M] code (context c followed by byte x):
    C(c x), C(c) = sum_x C(c x), and T(c) = number of distinct x with C(c x) > 0.
    """

    def __init__(self, train: np.ndarray, k: int):
        codes = _codes(train, k)
        self.dense = k + 1 <= _DENSE_MAX_BYTES
        if self.dense:
            self.counts = np.bincount(codes, minlength=256 ** (k + 1))
            table = self.counts.reshape(-1, 256)
            self.ctx_total = table.sum(axis=1)
            self.ctx_types = (table > 0).sum(axis=1)
        else:
            self.grams, self.counts = np.unique(codes, return_counts=True)
            ctx = self.grams >> 8  # sorted, since grams are
            self.ctxs, first, self.ctx_types = np.unique(ctx, return_index=True, return_counts=True)
            self.ctx_total = np.add.reduceat(self.counts, first) if len(first) else np.zeros(0, np.int64)

    @staticmethod
    def _find(sorted_keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
        if len(sorted_keys) == 0:
            return np.zeros(len(queries), dtype=np.int64)
        idx = np.minimum(np.searchsorted(sorted_keys, queries), len(sorted_keys) - 1)
        return np.where(sorted_keys[idx] == queries, values[idx], 0)

    def lookup(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ctx = codes >> 8
        if self.dense:
            return self.counts[codes], self.ctx_total[ctx], self.ctx_types[ctx]
        return (
            self._find(self.grams, self.counts, codes),
            self._find(self.ctxs, self.ctx_total, ctx),
            self._find(self.ctxs, self.ctx_types, ctx),
        )


def ngram_probs(train: np.ndarray, valid: np.ndarray, order: int = 2) -> np.ndarray:
    """[len(valid)] probability of each valid byte under an interpolated Witten-Bell byte n-gram.

    P_k(x | c) = (C(c x) + T(c) P_{k-1}(x | c')) / (C(c) + T(c)) for context c of the previous k bytes
    (c' drops its oldest byte), with counts from train, P_{-1} = 1/256, and P_k = P_{k-1} when c never
    occurs in train. Valid byte i uses context length min(i, order) (no context crosses into train).
    """
    train = _as_uint8(train, "train")
    valid = _as_uint8(valid, "valid")
    if not isinstance(order, (int, np.integer)) or not 0 <= order <= MAX_ORDER:
        raise ValueError(f"order must be an int in [0, {MAX_ORDER}], got {order!r}")
    probs = np.full(len(valid), 1.0 / 256.0)
    for k in range(min(order, len(valid) - 1) + 1):
        if len(train) <= k:
            break  # no (k+1)-grams in train: higher orders add nothing
        c_gram, c_ctx, types = _Counts(train, k).lookup(_codes(valid, k))
        lower = probs[k:]
        seen = c_ctx > 0
        mixed = (c_gram + types * lower) / np.maximum(c_ctx + types, 1)
        probs[k:] = np.where(seen, mixed, lower)
    return probs


def ngram_bpb(train: np.ndarray, valid: np.ndarray, order: int = 2) -> float:
    """Cross-entropy in bits per byte on `valid` ([M] uint8) of an order-`order` byte n-gram model
    (context = the previous `order` bytes) fit on `train` ([N] uint8); see `ngram_probs`."""
    return float(-np.mean(np.log2(ngram_probs(train, valid, order))))
