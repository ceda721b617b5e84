"""Subword tokenizers from a Hugging Face ``tokenizer.json`` (the optional ``tokenizers`` package).

Bits per byte stays the quality unit: a subword model's nats are divided by the UTF-8 bytes of
the text its scored tokens cover (:func:`token_bytes`), so byte-level and subword models compare.
"""

from __future__ import annotations

import pathlib

import numpy as np
from jaxtyping import UInt8

from ling_jax.interop.hf_config import InteropError


class Tokenizer:
    """A ``tokenizer.json`` loaded with the ``tokenizers`` package: ``encode`` text to int32 ids,
    ``decode`` ids to text, ``vocab_size`` (including added/special tokens)."""

    def __init__(self, path: str | pathlib.Path):
        try:
            import tokenizers
        except ImportError:
            raise InteropError("subword tokenizers need the tokenizers package: pip install 'ling-jax[hf]'") from None
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise InteropError(f"tokenizer file {path} does not exist (expected a Hugging Face tokenizer.json)")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises its own exception type
            raise InteropError(f"{path} is not a valid tokenizer.json: {e}") from None
        self.path = path
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids [N] and the UTF-8 byte length of the text each token covers [N] (their sum is
        the text's byte length: the gap before a token is counted with it)."""
        return self._encode_chunks([text])

    def encode_bytes(self, data: bytes | UInt8[np.ndarray, " n"], *, with_bytes: bool = True, chunk: int = 1 << 20):
        """:meth:`encode_with_bytes` of a UTF-8 corpus (invalid bytes replaced), encoded in ~1 MB
        chunks cut at line ends (in parallel by the tokenizers library); ``data`` is bytes or a uint8
        array (a corpus split); ``with_bytes=False``
        returns the ids alone (faster: no offsets)."""
        text = bytes(data).decode("utf-8", errors="replace")
        chunks, start = [], 0
        while start < len(text):
            stop = text.find("\n", start + chunk)
            stop = len(text) if stop < 0 else stop + 1
            chunks.append(text[start:stop])
            start = stop
        if not with_bytes:
            encs = self._tok.encode_batch(chunks, add_special_tokens=False)
            return np.concatenate([np.asarray(e.ids, np.int32) for e in encs] or [np.zeros(0, np.int32)])
        return self._encode_chunks(chunks)

    def _encode_chunks(self, chunks: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids_out, bytes_out = [], []
        for text, enc in zip(chunks, self._tok.encode_batch(chunks, add_special_tokens=False)):
            if not enc.ids:
                continue
            buf = np.frombuffer(text.encode("utf-8"), np.uint8)
            char_to_byte = np.append(np.flatnonzero((buf & 0xC0) != 0x80), len(buf))  # [chars + 1]
            ends = np.maximum.accumulate(np.asarray([end for _, end in enc.offsets], np.int64))
            ends[-1] = len(text)  # trailing text (e.g. whitespace) counts with the last token
            byte_ends = char_to_byte[ends]
            ids_out.append(np.asarray(enc.ids, np.int32))
            bytes_out.append(np.diff(np.concatenate([[0], byte_ends])))
        if not ids_out:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        return np.concatenate(ids_out), np.concatenate(bytes_out).astype(np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def check_vocab(self, model_vocab: int) -> None:
        """A tokenizer whose ids reach past the model's embedding table is an error."""
        if self.vocab_size > model_vocab:
            raise InteropError(f"tokenizer {self.path} has {self.vocab_size} tokens but the model's vocab_size is "
                               f"{model_vocab}: ids >= {model_vocab} have no embedding (use the model's own tokenizer)")
