"""Compressor baselines: hand-computed n-gram values, a loop reference, and sanity bounds."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from ling_jax.data import load_corpus, ngram_bpb, ngram_probs, zlib_bpb


def _bytes(text: bytes) -> np.ndarray:
    return np.frombuffer(text, dtype=np.uint8)


def reference_probs(train: bytes, valid: bytes, order: int) -> list[float]:
    """Interpolated Witten-Bell, written with dictionaries and loops."""
    grams = [Counter(train[i - k : i + 1] for i in range(k, len(train))) for k in range(order + 1)]
    probs = []
    for i in range(len(valid)):
        p = 1 / 256
        for k in range(min(order, i) + 1):
            ctx, x = valid[i - k : i], valid[i : i + 1]
            followers = {g: c for g, c in grams[k].items() if g[:-1] == ctx}
            total, types = sum(followers.values()), len(followers)
            if total:
                p = (followers.get(ctx + x, 0) + types * p) / (total + types)
        probs.append(p)
    return probs


def test_order0_hand_computed():
    # train "aab": C(a)=2, C(b)=1, total 3, 2 distinct bytes -> P(x) = (C(x) + 2/256) / 5
    p_a, p_b = (2 + 2 / 256) / 5, (1 + 2 / 256) / 5
    expected = -(math.log2(p_a) + math.log2(p_b)) / 2
    assert ngram_bpb(_bytes(b"aab"), _bytes(b"ab"), order=0) == pytest.approx(expected)


def test_order1_hand_computed():
    # train "abab": unigrams a:2 b:2; bigrams ab:2 ba:1. valid "ab":
    #   byte 0 "a" (no context): P0(a) = (2 + 2/256) / 6
    #   byte 1 "b" after "a": context "a" seen twice, 1 distinct follower -> (2 + 1 * P0(b)) / 3
    p0 = (2 + 2 / 256) / 6
    p1 = (2 + p0) / 3
    expected = -(math.log2(p0) + math.log2(p1)) / 2
    assert ngram_bpb(_bytes(b"abab"), _bytes(b"ab"), order=1) == pytest.approx(expected)


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])  # 0-2 count densely, 3-4 sparsely
def test_matches_loop_reference(order):
    rng = np.random.default_rng(order)
    alphabet = np.frombuffer(b"abcde \n", dtype=np.uint8)
    train = alphabet[rng.integers(0, len(alphabet), 300)]
    valid = np.concatenate([train[50:80], alphabet[rng.integers(0, len(alphabet), 40)], _bytes(b"xyz")])
    expected = reference_probs(train.tobytes(), valid.tobytes(), order)
    np.testing.assert_allclose(ngram_probs(train, valid, order), expected, rtol=1e-12)


def test_probabilities_normalise():
    train = _bytes(b"the cat sat on the mat; the dog sat on the log\n" * 3)
    for order in (1, 2, 3):
        # every 5th byte is one of the 256 possible bytes after the same context "the "
        valid = np.concatenate([np.append(_bytes(b"the "), np.uint8(x)) for x in range(256)])
        probs = ngram_probs(train, valid, order)[4::5]
        assert probs.sum() == pytest.approx(1.0)


def test_ngram_beats_uniform_and_higher_order_helps_on_repetitive_text():
    text = _bytes(b"to be or not to be, that is the question. " * 50)
    train, valid = text[:1800], text[1800:]
    bpb = {k: ngram_bpb(train, valid, order=k) for k in (0, 1, 2)}
    assert bpb[0] < 8.0
    assert bpb[2] <= bpb[1] <= bpb[0]
    assert bpb[2] < 0.5


def test_ngram_on_random_bytes_is_about_uniform():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 200_000, dtype=np.uint8)
    assert 7.9 < ngram_bpb(data[:150_000], data[150_000:], order=0) < 8.05


def test_zlib_constant_and_random():
    assert zlib_bpb(np.zeros(100_000, dtype=np.uint8)) < 0.01
    assert zlib_bpb(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8)) > 7.9
    assert zlib_bpb(np.zeros(1000, np.uint8), level=1) >= zlib_bpb(np.zeros(1000, np.uint8), level=9)


def test_errors():
    with pytest.raises(ValueError, match="order"):
        ngram_bpb(_bytes(b"abc"), _bytes(b"abc"), order=7)
    with pytest.raises(ValueError, match="empty"):
        ngram_bpb(_bytes(b"abc"), _bytes(b""), order=1)
    with pytest.raises(ValueError, match="empty"):
        zlib_bpb(np.zeros(0, np.uint8))


def test_default_corpus_baselines():
    train, valid = load_corpus(split="train"), load_corpus(split="validation")
    assert 1.3 < zlib_bpb(valid) < 2.0
    # fit on the first 8 MB of train to keep the suite fast (the full train split gives ~2.57)
    assert 2.3 < ngram_bpb(train[:8_000_000], valid, order=2) < 2.9
