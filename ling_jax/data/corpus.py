"""Byte-level text corpus: load a train/validation split as uint8 bytes, and cut batches from it.

Corpus sources (`load_corpus(path)`):

* `path=None` — the default corpus: every `.py` file under the running interpreter's standard
  library (`default_corpus_root()`), recursively, excluding `site-packages`, about 30 MB.
* a directory — every regular, non-hidden text file under it, recursively (hidden files and
  directories, i.e. names starting with ".", and symlinks are skipped; binary files are skipped).
* a single text file.

A file is *text* when it decodes as UTF-8 and has no NUL byte anywhere (stricter than the usual
"no NUL in the first 8 KB" sniff, so that the NUL separator below is unambiguous). Directory
files are taken in order of their relative POSIX path and
assigned to a split by a stable hash of that relative path (sha256; the first 8 bytes read as a
fraction in [0, 1): below `validation_fraction` means validation), so a file is never in both
splits and the assignment does not depend on which other files exist. A directory with too few
files for that (one split would get no file) holds out the tail bytes of every file instead,
as a single file does, and logs a warning saying so. Within a split, files are
joined with `DOC_SEPARATOR` (one NUL byte, which never occurs inside a text file, so it marks
document boundaries unambiguously). A single file is split by position: its last
`validation_fraction` of bytes, moved back to the start of a line, are validation.

Loaded splits are cached in-process (read-only arrays) keyed by resolved path, source kind and
fraction, so files edited during a run are not re-read.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import pathlib
import sysconfig

import numpy as np

from ling_jax.data.batch import Batch, host_rows

DOC_SEPARATOR = b"\x00"
"""Byte placed between two files of a directory corpus (never occurs inside a text file)."""

SPLITS = ("train", "validation")

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A data problem (missing/empty/binary/unreadable input, a split too small, ...)."""


def default_corpus_root() -> pathlib.Path:
    """The running interpreter's standard library directory (`sysconfig` "stdlib" path)."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


# ----------------------------------------------------------------------------- files and splits


def _is_validation(relpath: str, validation_fraction: float) -> bool:
    """Stable split assignment: sha256 of the relative path, first 8 bytes as a fraction of 2**64."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < validation_fraction


def _walk(root: pathlib.Path, *, default: bool) -> list[tuple[str, pathlib.Path]]:
    """(relative POSIX path, path) of candidate files under `root`, sorted by relative path.

    default=True: `*.py` files, skipping any `site-packages` directory.
    default=False: all regular files, skipping hidden names and symlinks.
    """
    def unreadable(error: OSError) -> None:
        raise DataError(f"{error.filename}: unreadable directory: {error.strerror}") from error

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=False):
        if default:
            dirnames[:] = [d for d in dirnames if d != "site-packages"]
            names = [f for f in filenames if f.endswith(".py")]
        else:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            names = [f for f in filenames if not f.startswith(".")]
        for name in names:
            path = pathlib.Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                continue
            found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found


def _read(path: pathlib.Path) -> bytes:
    """The file's bytes; DataError naming the path if it cannot be read."""
    try:
        return path.read_bytes()
    except PermissionError as e:
        raise DataError(f"{path}: unreadable (permission denied): {e}") from e
    except OSError as e:
        raise DataError(f"{path}: unreadable: {e}") from e


def _text_problem(raw: bytes) -> str | None:
    """Why `raw` is not text (None if it is text)."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        return f"binary file (NUL byte at offset {nul})"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"binary file (not UTF-8: {e.reason} at offset {e.start})"
    return None


def _check_fraction(validation_fraction: float) -> None:
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split must be one of {list(SPLITS)}, got {split!r}")


def _resolve(path: str | os.PathLike | None) -> tuple[pathlib.Path, bool]:
    """(resolved source path, is_default) — DataError if a given path does not exist."""
    if path is None:
        root = default_corpus_root().resolve()
        if not root.is_dir():
            raise DataError(f"{root}: default corpus root (the standard library) is not a directory")
        return root, True
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: missing path (no such file or directory)")
    return p.resolve(), False


def _directory_texts(root: pathlib.Path, default: bool) -> tuple[tuple[str, pathlib.Path, bytes], ...]:
    """(relpath, path, bytes) of every text file of a directory corpus, sorted by relpath."""
    texts, skipped = [], 0
    for rel, path in _walk(root, default=default):
        raw = _read(path)
        if not raw or _text_problem(raw) is not None:
            skipped += 1
            continue
        texts.append((rel, path, raw))
    if not texts:
        raise DataError(
            f"{root}: directory has no text to use (no non-empty UTF-8 text files; "
            f"{skipped} empty or binary files skipped)"
        )
    return tuple(texts)


@functools.lru_cache(maxsize=8)
def _note_tail_split(root: pathlib.Path, files: int, fraction: float) -> None:
    """Says once per directory that it is split by tail bytes (the log, not an error)."""
    logger.warning(
        f"{root}: {files} text file(s) are too few to split by file at validation_fraction={fraction} "
        f"(one split would get none); holding out the last {fraction:.0%} of each file's bytes as validation instead"
    )


def _directory_split(
    root: pathlib.Path, default: bool, split: str, fraction: float
) -> list[tuple[pathlib.Path, bytes]]:
    """(path, bytes) of the directory's text in `split`; DataError if there is none.

    Files are assigned to a split by their path hash; when that leaves a split without files (a
    small directory), every file is split by position like a single file (its tail bytes are
    validation) and a warning says so.
    """
    texts = _directory_texts(root, default)
    held_out = [_is_validation(rel, fraction) for rel, _, _ in texts]
    if fraction > 0 and (all(held_out) or not any(held_out)):
        _note_tail_split(root, len(texts), fraction)
        parts = []
        for _, p, raw in texts:
            cut = _file_cut(raw, fraction)
            part = raw[:cut] if split == "train" else raw[cut:]
            if part:
                parts.append((p, part))
        if not parts:
            raise DataError(f"{root}: split {split!r} would be empty: too little data "
                            f"({sum(len(raw) for _, _, raw in texts)} bytes in {len(texts)} text files)")
        return parts
    chosen = [(p, raw) for (rel, p, raw), v in zip(texts, held_out) if v == (split == "validation")]
    if not chosen:
        share = fraction if split == "validation" else 1.0 - fraction
        need = f"about {math.ceil(1 / share)} or more files" if share > 0 else "a validation_fraction > 0"
        raise DataError(
            f"{root}: split {split!r} would be empty: too little data, none of the {len(texts)} text files "
            f"hashes into it at validation_fraction={fraction} (expect {need})"
        )
    return chosen


def _file_cut(raw: bytes, fraction: float) -> int:
    """Train/validation boundary of a single file: validation = raw[cut:], starting at a line start.

    The nominal cut leaves ceil(fraction * len) bytes for validation; it is moved back to just after
    the previous newline (or forward to the next one if there is none before it; a file without
    newlines is cut at the nominal byte).
    """
    nominal = len(raw) - math.ceil(fraction * len(raw))
    if nominal >= len(raw):
        return len(raw)
    back = raw.rfind(b"\n", 0, nominal)
    if back >= 0:
        return back + 1
    forward = raw.find(b"\n", nominal)
    if 0 <= forward < len(raw) - 1:
        return forward + 1
    return nominal


def _file_split(path: pathlib.Path, split: str, fraction: float) -> bytes:
    raw = _read(path)
    if not raw:
        raise DataError(f"{path}: empty file")
    problem = _text_problem(raw)
    if problem is not None:
        raise DataError(f"{path}: {problem}")
    cut = _file_cut(raw, fraction)
    part = raw[:cut] if split == "train" else raw[cut:]
    if not part:
        if split == "validation" and fraction == 0:
            hint = "validation_fraction=0 holds out no bytes"
        else:
            hint = f"at least {math.ceil(1 / (1 - fraction))} bytes are needed"
        raise DataError(
            f"{path}: split {split!r} would be empty: too little data ({len(raw)} bytes at "
            f"validation_fraction={fraction}; {hint})"
        )
    return part


@functools.lru_cache(maxsize=8)
def _load_cached(source: pathlib.Path, default: bool, split: str, fraction: float) -> np.ndarray:
    if source.is_dir():
        data = DOC_SEPARATOR.join(raw for _, raw in _directory_split(source, default, split, fraction))
    elif source.is_file():
        data = _file_split(source, split, fraction)
    else:
        raise DataError(f"{source}: neither a regular file nor a directory")
    return np.frombuffer(data, dtype=np.uint8)  # a read-only view: the cached array cannot be mutated


def load_corpus(
    path: str | os.PathLike | None = None, split: str = "train", validation_fraction: float = 0.05
) -> np.ndarray:
    """One split of a byte corpus as a read-only uint8 array of shape [N].

    Args:
      path: a directory or a text file; None for the default corpus (stdlib `.py` files).
      split: "train" or "validation".
      validation_fraction: in [0, 1); share of files (directory) or trailing bytes (file) held out.

    Raises:
      DataError: missing path, empty file, unreadable file, binary single file, a directory with no
        text files, an unknown split, or a split that would be empty.
    """
    _check_split(split)
    _check_fraction(validation_fraction)
    source, default = _resolve(path)
    return _load_cached(source, default, split, float(validation_fraction))


def corpus_files(
    path: str | os.PathLike | None = None, split: str = "train", validation_fraction: float = 0.05
) -> list[pathlib.Path]:
    """The files whose bytes make up `load_corpus(path, split, validation_fraction)`, in order.

    For a single-file corpus this is `[that file]` for both splits (it is split by position), and
    a directory split by tail bytes lists every file with a non-empty part in both splits.
    """
    _check_split(split)
    _check_fraction(validation_fraction)
    source, default = _resolve(path)
    if source.is_dir():
        return [p for p, _ in _directory_split(source, default, split, float(validation_fraction))]
    _file_split(source, split, float(validation_fraction))  # same errors as load_corpus
    return [source]


def corpus_fingerprint(path: str | os.PathLike | None = None, validation_fraction: float = 0.05) -> dict:
    """What a corpus is, independent of where it lies: ``{"files", "bytes", "sha256"}`` over its
    file list (paths relative to its root) and the bytes of both splits. ``path=None`` (this
    interpreter's standard library) differs between Pythons; a workdir records this to notice."""
    source, _ = _resolve(path)
    digest = hashlib.sha256()
    files = []
    for split in ("train", "validation"):
        for p in corpus_files(path, split, validation_fraction):
            files.append(p.relative_to(source).as_posix() if source.is_dir() else p.name)
    for name in sorted(set(files)):
        digest.update(name.encode() + b"\0")
    data = [load_corpus(path, split, validation_fraction) for split in ("train", "validation")]
    for part in data:
        digest.update(len(part).to_bytes(8, "little") + part.tobytes())
    return {"files": len(set(files)), "bytes": int(sum(len(d) for d in data)), "sha256": digest.hexdigest()}


# ----------------------------------------------------------------------------- batches


def _check_positive(**kwargs: int) -> None:
    for name, value in kwargs.items():
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_seed_step(seed: int, step: int) -> None:
    for name, value in (("seed", seed), ("step", step)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _windows_to_batch(data: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    """Batch of the windows data[s : s + seq_len + 1] for s in starts ([B]) -> [B, seq_len]."""
    window = data[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
    shape = (len(starts), seq_len)
    return Batch(
        inputs=window[:, :-1],
        targets=window[:, 1:],
        loss_mask=np.ones(shape, np.float32),
        oracle_mask=np.zeros(shape, np.bool_),
    )


def _as_bytes(data: np.ndarray) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim != 1:
        raise ValueError(f"data must be a 1-D byte array, got shape {data.shape}")
    return data


def text_batch(
    data: np.ndarray,
    *,
    seed: int,
    step: int,
    batch_size: int,
    seq_len: int,
    host_index: int = 0,
    host_count: int = 1,
) -> Batch:
    """This host's rows of a random global batch of byte windows — a pure function of (seed, step).

    `np.random.default_rng([seed, step])` draws `batch_size` window starts uniformly; each window
    holds seq_len + 1 bytes: inputs = window[:-1], targets = window[1:]. loss_mask is all ones and
    oracle_mask all False. Host `host_index` gets rows [host_index * B/host_count, ...) of the
    global batch, so concatenating all hosts' batches gives the global batch.

    Args:
      data: [N] uint8 corpus bytes (from `load_corpus`).
    Returns:
      Batch of shape [batch_size // host_count, seq_len].
    Raises:
      DataError: data shorter than seq_len + 1 bytes.
      ValueError: bad seed/step/sizes, or batch_size not divisible by host_count.
    """
    data = _as_bytes(data)
    _check_seed_step(seed, step)
    _check_positive(batch_size=batch_size, seq_len=seq_len)
    start, stop = host_rows(batch_size, host_index, host_count)
    if len(data) < seq_len + 1:
        raise DataError(f"data has {len(data)} bytes; seq_len={seq_len} needs at least {seq_len + 1}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - seq_len, size=batch_size)  # window start in [0, N - seq_len - 1]
    return _windows_to_batch(data, starts[start:stop], seq_len)


def eval_batches(data: np.ndarray, *, batch_size: int, seq_len: int, num_batches: int) -> list[Batch]:
    """`num_batches` fixed batches of non-overlapping windows spread evenly over `data`.

    There are n = batch_size * num_batches windows of seq_len + 1 bytes; window i starts at
    floor(i * (N - seq_len - 1) / (n - 1)), so the first starts at byte 0, the last ends at byte N,
    and no two overlap. Batch j holds windows [j * batch_size, (j + 1) * batch_size).

    Args:
      data: [N] uint8 bytes (normally the validation split).
    Returns:
      num_batches Batches of shape [batch_size, seq_len].
    Raises:
      DataError: N < n * (seq_len + 1), the bytes needed for n non-overlapping windows.
    """
    data = _as_bytes(data)
    _check_positive(batch_size=batch_size, seq_len=seq_len, num_batches=num_batches)
    n, width = batch_size * num_batches, seq_len + 1
    if len(data) < n * width:
        raise DataError(
            f"data has {len(data)} bytes; {num_batches} eval batches of {batch_size} x "
            f"(seq_len={seq_len} + 1) non-overlapping windows need at least {n * width}"
        )
    span = len(data) - width
    starts = np.arange(n, dtype=np.int64) * span // max(n - 1, 1)
    return [
        _windows_to_batch(data, starts[j * batch_size : (j + 1) * batch_size], seq_len)
        for j in range(num_batches)
    ]
