"""Data: byte-level text corpus, synthetic retrieval tasks, and compressor baselines.

Everything is byte-level (vocab 256). Sources return host-side numpy `Batch`es.
"""

from ling_jax.data.baselines import ngram_bpb, ngram_probs, zlib_bpb
from ling_jax.data.batch import Batch, host_rows
from ling_jax.data.corpus import (
    DOC_SEPARATOR,
    DataError,
    corpus_files,
    corpus_fingerprint,
    default_corpus_root,
    eval_batches,
    load_corpus,
    text_batch,
)
from ling_jax.data.tasks import (
    TASKS,
    AssociativeRecall,
    MultiHop,
    NeedleRetrieval,
    accuracy,
    make_batch,
    make_task,
)

VOCAB_SIZE = 256
"""Byte vocabulary: token ids 0..255 for text and synthetic tasks alike."""

__all__ = [
    "VOCAB_SIZE",
    "Batch",
    "host_rows",
    "DOC_SEPARATOR",
    "DataError",
    "corpus_files",
    "corpus_fingerprint",
    "default_corpus_root",
    "eval_batches",
    "load_corpus",
    "text_batch",
    "TASKS",
    "AssociativeRecall",
    "MultiHop",
    "NeedleRetrieval",
    "accuracy",
    "make_batch",
    "make_task",
    "ngram_bpb",
    "ngram_probs",
    "zlib_bpb",
]
