"""Byte corpus: split assignment, caching, error cases, and text / eval batches."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

from ling_jax.data import (
    DOC_SEPARATOR,
    Batch,
    DataError,
    corpus_files,
    default_corpus_root,
    eval_batches,
    load_corpus,
    text_batch,
)


@pytest.fixture(scope="module")
def default_splits() -> dict[str, np.ndarray]:
    return {split: load_corpus(split=split) for split in ("train", "validation")}


def _random_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)


def _text_dir(root: pathlib.Path, n: int) -> list[str]:
    names = []
    for i in range(n):
        name = f"sub{i % 3}/file_{i:03d}.txt"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"file {i}\nline two of {i}\n")
        names.append(name)
    return sorted(names)


# ----------------------------------------------------------------------------- default corpus


def test_default_corpus_splits_are_disjoint_sorted_and_complete(default_splits):
    root = default_corpus_root().resolve()
    train, valid = corpus_files(split="train"), corpus_files(split="validation")
    assert not set(train) & set(valid)
    rel = lambda files: [p.relative_to(root).as_posix() for p in files]
    for files in (rel(train), rel(valid)):
        assert files == sorted(files)
        assert all(f.endswith(".py") and "site-packages" not in f.split("/") for f in files)
    assert len(valid) > 10 and len(train) > 20 * len(valid) / 2
    # every UTF-8 .py file is in exactly one split
    all_py = {
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if "site-packages" not in p.relative_to(root).parts
    }
    assert set(rel(train)) | set(rel(valid)) <= all_py
    for skipped in all_py - set(rel(train)) - set(rel(valid)):  # only empty and non-UTF-8 files
        raw = (root / skipped).read_bytes()
        with pytest.raises(UnicodeDecodeError) if raw else pytest.raises(AssertionError):
            assert raw.decode("utf-8") and False
    # the validation bytes are exactly the validation files joined by the separator
    sizes = sum(p.stat().st_size for p in valid)
    assert len(default_splits["validation"]) == sizes + (len(valid) - 1) * len(DOC_SEPARATOR)
    assert 10_000_000 < len(default_splits["train"]) < 100_000_000


def test_default_corpus_is_cached_and_read_only(default_splits):
    again = load_corpus()
    assert again is default_splits["train"]
    assert default_splits["train"].dtype == np.uint8 and default_splits["train"].ndim == 1
    with pytest.raises(ValueError):
        again[0] = 1


# ----------------------------------------------------------------------------- directories and files


def test_directory_corpus_skips_binary_and_hidden_files(tmp_path):
    names = _text_dir(tmp_path, 60)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / ".hidden").write_text("hidden text\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    train = [p.relative_to(tmp_path.resolve()).as_posix() for p in corpus_files(tmp_path, "train", 0.2)]
    valid = [p.relative_to(tmp_path.resolve()).as_posix() for p in corpus_files(tmp_path, "validation", 0.2)]
    assert sorted(train + valid) == names and not set(train) & set(valid)
    assert train == sorted(train) and valid == sorted(valid)
    assert 0 < len(valid) < len(train)
    expected = DOC_SEPARATOR.join((tmp_path / n).read_bytes() for n in valid)
    assert load_corpus(tmp_path, "validation", 0.2).tobytes() == expected


def test_split_assignment_is_stable_when_files_are_added(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _text_dir(a, 40)
    _text_dir(b, 80)  # a superset of a's relative paths
    valid_a = {p.relative_to(a.resolve()) for p in corpus_files(a, "validation", 0.3)}
    valid_b = {p.relative_to(b.resolve()) for p in corpus_files(b, "validation", 0.3)}
    assert valid_a == {p for p in valid_b if p in {q.relative_to(a) for q in a.rglob("*.txt")}}


def test_single_file_is_split_at_a_line_boundary(tmp_path):
    path = tmp_path / "text.txt"
    content = "".join(f"line number {i}\n" for i in range(200)).encode()
    path.write_bytes(content)
    train = load_corpus(path, "train", 0.1).tobytes()
    valid = load_corpus(path, "validation", 0.1).tobytes()
    assert train + valid == content
    assert train.endswith(b"\n") and valid.startswith(b"line number")
    assert len(valid) >= 0.1 * len(content)
    assert corpus_files(path, "validation", 0.1) == [path.resolve()]


# ----------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="missing path"):
        load_corpus(tmp_path / "nope")


def test_empty_file(tmp_path):
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        load_corpus(tmp_path / "e.txt")


@pytest.mark.parametrize(
    "raw, problem", [(b"abc\x00def\n" * 10, "NUL"), ("caf\xe9\n".encode("latin-1") * 10, "not UTF-8")]
)
def test_binary_file(tmp_path, raw, problem):
    path = tmp_path / "b.dat"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=f"binary file.*{problem}") as err:
        load_corpus(path)
    assert str(path) in str(err.value)


def test_directory_with_only_binary_files(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "b.bin").write_bytes(b"\xff\xfe\x00x")
    with pytest.raises(DataError, match="no text"):
        load_corpus(tmp_path)


def test_empty_directory(tmp_path):
    with pytest.raises(DataError, match="no text"):
        load_corpus(tmp_path)


def test_unknown_split(tmp_path):
    with pytest.raises(DataError, match="split must be one of"):
        load_corpus(split="test")


def test_split_that_would_be_empty(tmp_path):
    one_byte = tmp_path / "one.txt"
    one_byte.write_bytes(b"x")
    with pytest.raises(DataError, match="would be empty.*at least 2 bytes"):
        load_corpus(one_byte, "train")
    text = tmp_path / "t.txt"
    text.write_text("hello\nworld\n")
    with pytest.raises(DataError, match="would be empty"):
        load_corpus(text, "validation", 0.0)
    single = tmp_path / "dir"
    single.mkdir()
    (single / "only.txt").write_text("just one file\n")
    assert len(load_corpus(single, "train", 0.0)) == len("just one file\n")
    with pytest.raises(DataError, match="'validation' would be empty: too little data"):
        load_corpus(single, "validation", 0.0)


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("secret\n" * 10)
    real_read = pathlib.Path.read_bytes

    def deny(self):
        if self.name == "secret.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", deny)
    with pytest.raises(DataError, match="unreadable.*permission") as err:
        load_corpus(path)
    assert "secret.txt" in str(err.value)
    with pytest.raises(DataError, match="unreadable"):
        load_corpus(tmp_path)


def test_unreadable_directory(tmp_path, monkeypatch):
    (tmp_path / "ok.txt").write_text("fine\n")
    (tmp_path / "locked").mkdir()
    real_scandir = os.scandir

    def deny(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", deny)
    with pytest.raises(DataError, match="locked: unreadable directory"):
        load_corpus(tmp_path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read chmod 000 files")
def test_unreadable_file_by_mode(tmp_path):
    path = tmp_path / "locked.txt"
    path.write_text("locked\n" * 10)
    path.chmod(0)
    locked_dir = tmp_path / "locked_dir"
    locked_dir.mkdir()
    locked_dir.chmod(0)
    try:
        with pytest.raises(DataError, match="unreadable"):
            load_corpus(path)
        with pytest.raises(DataError, match="unreadable directory"):
            load_corpus(tmp_path)
    finally:
        path.chmod(0o600)
        locked_dir.chmod(0o700)


def test_bad_validation_fraction():
    with pytest.raises(ValueError, match="validation_fraction"):
        load_corpus(validation_fraction=1.0)


# ----------------------------------------------------------------------------- text batches


def test_text_batch_is_a_pure_function_of_seed_and_step():
    data = _random_bytes(5000)
    kw = dict(batch_size=8, seq_len=32)
    a, b = text_batch(data, seed=1, step=3, **kw), text_batch(data, seed=1, step=3, **kw)
    for k, v in a.as_dict().items():
        np.testing.assert_array_equal(v, b.as_dict()[k])
    assert not np.array_equal(a.inputs, text_batch(data, seed=1, step=4, **kw).inputs)
    assert not np.array_equal(a.inputs, text_batch(data, seed=2, step=3, **kw).inputs)


def test_text_batch_rows_are_shifted_windows_of_the_data():
    data = _random_bytes(5000)
    batch = text_batch(data, seed=0, step=0, batch_size=16, seq_len=24)
    assert batch.inputs.shape == (16, 24) and batch.inputs.dtype == np.int32
    assert batch.targets.dtype == np.int32 and batch.loss_mask.dtype == np.float32
    assert batch.oracle_mask.dtype == np.bool_ and not batch.oracle_mask.any()
    assert (batch.loss_mask == 1).all()
    np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    raw = data.tobytes()
    for inp, tgt in zip(batch.inputs, batch.targets):
        window = bytes(inp.astype(np.uint8)) + bytes([tgt[-1]])
        assert raw.find(window) >= 0


def test_text_batch_host_slices_concatenate_to_the_global_batch():
    data = _random_bytes(3000)
    kw = dict(seed=5, step=7, batch_size=12, seq_len=16)
    whole = text_batch(data, **kw)
    parts = [text_batch(data, host_index=i, host_count=3, **kw) for i in range(3)]
    assert all(p.batch_size == 4 for p in parts)
    joined = Batch.concatenate(parts)
    for k, v in whole.as_dict().items():
        np.testing.assert_array_equal(v, joined.as_dict()[k])


def test_text_batch_errors():
    with pytest.raises(DataError, match="needs at least 17"):
        text_batch(_random_bytes(16), seed=0, step=0, batch_size=2, seq_len=16)
    with pytest.raises(ValueError, match="divisible by host_count"):
        text_batch(_random_bytes(100), seed=0, step=0, batch_size=6, seq_len=8, host_count=4)
    with pytest.raises(ValueError, match="host_index"):
        text_batch(_random_bytes(100), seed=0, step=0, batch_size=8, seq_len=8, host_index=4, host_count=4)
    with pytest.raises(ValueError, match="seed"):
        text_batch(_random_bytes(100), seed=-1, step=0, batch_size=8, seq_len=8)


def test_text_batch_on_default_corpus(default_splits):
    batch = text_batch(default_splits["train"], seed=0, step=0, batch_size=4, seq_len=128)
    assert batch.inputs.shape == (4, 128) and 0 <= batch.inputs.min() and batch.inputs.max() < 256


# ----------------------------------------------------------------------------- eval batches


def test_eval_batches_are_fixed_non_overlapping_and_spread():
    data = _random_bytes(10_000, seed=3)
    batches = eval_batches(data, batch_size=4, seq_len=31, num_batches=5)
    again = eval_batches(data, batch_size=4, seq_len=31, num_batches=5)
    assert len(batches) == 5 and all(b.inputs.shape == (4, 31) for b in batches)
    raw = data.tobytes()
    starts = []
    for b, b2 in zip(batches, again):
        np.testing.assert_array_equal(b.inputs, b2.inputs)
        for inp, tgt in zip(b.inputs, b.targets):
            starts.append(raw.find(bytes(inp.astype(np.uint8)) + bytes([tgt[-1]])))
    assert starts[0] == 0 and starts[-1] == len(data) - 32
    assert all(b - a >= 32 for a, b in zip(starts, starts[1:]))
    gaps = np.diff(starts)
    assert gaps.max() - gaps.min() <= 1  # evenly spread


def test_eval_batches_exact_fit_and_too_little_data():
    data = _random_bytes(2 * 3 * 9)
    batches = eval_batches(data, batch_size=3, seq_len=8, num_batches=2)
    windows = [np.concatenate([b.inputs, b.targets[:, -1:]], axis=1) for b in batches]
    flat = np.concatenate(windows).reshape(-1)
    np.testing.assert_array_equal(flat, data)  # windows tile the data exactly
    with pytest.raises(DataError, match="need at least 54"):
        eval_batches(data[:-1], batch_size=3, seq_len=8, num_batches=2)
