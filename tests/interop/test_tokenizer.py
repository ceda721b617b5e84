"""Subword tokenizers (tokenizer.json via the optional tokenizers package): byte accounting for
bits per byte, deterministic batches, and the vocabulary check."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from ling_jax.config import ConfigError, apply_overrides, get_preset  # noqa: E402
from ling_jax.data.subword import subword_batch, subword_eval  # noqa: E402
from ling_jax.interop.hf_config import InteropError  # noqa: E402
from ling_jax.interop.tokenizer import Tokenizer  # noqa: E402
from ling_jax.pipeline import build_data  # noqa: E402

TOKENIZER = pathlib.Path(__file__).parent / "fixtures" / "llama" / "tokenizer.json"
TEXT = ("def f(x):\n    return x + 1  # héllo wörld ✓\n\n" * 40).encode("utf-8")


def _big_tokenizer(path: pathlib.Path, vocab: int) -> pathlib.Path:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tok = RawTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = [f"w{i}x{i * 7}" for i in range(400)]
    tok.train_from_iterator([" ".join(words)] * 3, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>"]))
    assert tok.get_vocab_size() > 128
    tok.save(str(path))
    return path


def test_token_bytes_partition_the_text():
    tok = Tokenizer(TOKENIZER)
    assert tok.vocab_size == 128
    ids, nbytes = tok.encode_bytes(TEXT, chunk=100)  # several chunks, multi-byte characters
    assert ids.dtype == np.int32 and len(ids) == len(nbytes) and np.all(ids < 128)
    assert int(nbytes.sum()) == len(TEXT)
    assert np.all(nbytes >= 0)
    assert tok.decode(ids[:30]).startswith("def f(x):")


def test_subword_batches_are_deterministic_and_eval_counts_bytes():
    tok = Tokenizer(TOKENIZER)
    data = np.frombuffer(TEXT, np.uint8)
    a = subword_batch(data, tok, seed=1, step=5, batch_size=4, seq_len=16)
    b = subword_batch(data, tok, seed=1, step=5, batch_size=4, seq_len=16)
    c = subword_batch(data, tok, seed=1, step=6, batch_size=4, seq_len=16)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    assert a.inputs.shape == (4, 16) and not np.array_equal(a.inputs, c.inputs)
    np.testing.assert_array_equal(a.inputs[:, 1:], a.targets[:, :-1])
    batches, bytes_per_token = subword_eval(data, tok, batch_size=2, seq_len=16, num_batches=2)
    ids, nbytes = tok.encode_bytes(data)
    assert len(batches) == 2 and 1.0 < bytes_per_token < 10.0
    assert min(nbytes) <= bytes_per_token <= max(nbytes)


def test_build_data_with_a_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(TEXT * 4)
    base = get_preset("cpu-tiny")
    cfg = apply_overrides(base, {"model.vocab_size": "128", "data.path": str(corpus), "data.tokenizer": str(TOKENIZER),
                                 "train.seq_len": "16", "train.batch_size": "2", "train.eval_batches": "2"})
    data = build_data(cfg)
    assert data.metric == "bpb" and data.bytes_per_token() > 1.0
    assert data.train_batch(0).inputs.shape == (2, 16)
    # the tokenizer has 128 tokens: a 64-token model cannot take its ids
    small = apply_overrides(cfg, {"model.vocab_size": "64"})
    with pytest.raises(InteropError, match="128 tokens but the model's vocab_size is 64"):
        build_data(small)
    # byte-level text needs 256 ids
    with pytest.raises(ConfigError, match="vocab_size >= 256"):
        build_data(apply_overrides(cfg, {"data.tokenizer": ""}))
    with pytest.raises(ConfigError, match="task='text' only"):
        apply_overrides(cfg, {"data.task": "mqar"})


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(InteropError, match="does not exist"):
        Tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(InteropError, match="not a valid tokenizer.json"):
        Tokenizer(bad)
    big = Tokenizer(_big_tokenizer(tmp_path / "big.json", 300))
    with pytest.raises(InteropError, match=f"{big.vocab_size} tokens but the model's vocab_size is 128"):
        big.check_vocab(128)
