"""Connects a :class:`DataConfig` to batches: text corpus windows or synthetic task batches.

Batches are a pure function of (seed, step), so a resumed run sees exactly the data it would
have seen; evaluation batches are fixed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from ling_jax.config import Config, ConfigError
from ling_jax.data import Batch, corpus_fingerprint, default_corpus_root, eval_batches, load_corpus, make_task, text_batch
from ling_jax.data import tasks as task_lib

# Evaluation batches of synthetic tasks use seeds far from any training seed.
_EVAL_SEED_OFFSET = 1_000_003


def _coerce_task_options(task: str, raw: dict[str, str]) -> dict:
    """Converts "name=value" strings to the task config's field types."""
    fields = {f.name: f for f in dataclasses.fields(task_lib.TASKS[task])}
    out = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown option {key!r} for task {task!r}; allowed: {sorted(fields)}")
        default = fields[key].default
        kind = float if default is None else type(default)  # None defaults are optional floats (needle depth)
        try:
            if default is None and value.lower() == "none":
                out[key] = None
            elif isinstance(default, bool):
                out[key] = value.lower() in ("1", "true", "yes")
            else:
                out[key] = kind(value)
        except ValueError:
            raise ConfigError(f"DataConfig.task_options: {key}={value!r} is not a valid {kind.__name__}") from None
    return out


def _make_task(task: str, raw: dict[str, str], seq_len: int):
    """The task config, with its validation errors as one-line ConfigErrors naming the option."""
    try:
        task_cfg = make_task(task, **_coerce_task_options(task, raw))
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"DataConfig.task_options for task {task!r}: {e}") from None
    if seq_len < task_cfg.min_seq_len():
        raise ConfigError(f"TrainConfig.seq_len ({seq_len}) is too short for task {task!r} with these task_options: "
                          f"need seq_len >= {task_cfg.min_seq_len()}")
    return task_cfg


@dataclasses.dataclass(frozen=True)
class DataSource:
    metric: str  # "bpb" for text, "accuracy" for tasks
    train_batch: Callable[[int], Batch]  # step -> batch
    eval_batches: Callable[[], list[Batch]]
    # text: UTF-8 bytes per scored evaluation token (1 for bytes; subword: exact over the eval batches),
    # so bpb = nats per token / ln 2 / bytes_per_token for byte-level and subword models alike
    bytes_per_token: Callable[[], float] = lambda: 1.0


def _subword_source(config: Config, train_bytes, valid_bytes, host_index: int, host_count: int) -> DataSource:
    """Text through a tokenizer.json (``data.tokenizer``): see :mod:`ling_jax.data.subword`."""
    from ling_jax.data.subword import subword_batch, subword_eval
    from ling_jax.interop.tokenizer import Tokenizer

    train = config.train
    tokenizer = Tokenizer(config.data.tokenizer)
    tokenizer.check_vocab(config.model.vocab_size)
    cache: dict = {}

    def evals() -> tuple[list[Batch], float]:
        if "eval" not in cache:
            cache["eval"] = subword_eval(valid_bytes, tokenizer, batch_size=train.batch_size, seq_len=train.seq_len,
                                         num_batches=train.eval_batches)
        return cache["eval"]

    def train_batch(step: int) -> Batch:
        return subword_batch(train_bytes, tokenizer, seed=train.seed, step=step, batch_size=train.batch_size,
                             seq_len=train.seq_len, host_index=host_index, host_count=host_count)

    return DataSource("bpb", train_batch, lambda: evals()[0], lambda: evals()[1])


def build_data(config: Config, *, host_index: int = 0, host_count: int = 1) -> DataSource:
    data, train = config.data, config.train
    if data.task == "text":
        train_bytes = load_corpus(data.path or None, "train", data.validation_fraction)
        valid_bytes = load_corpus(data.path or None, "validation", data.validation_fraction)
        if len(valid_bytes) < train.seq_len + 1:
            raise ConfigError(
                f"validation split of {data.path or 'the default corpus'} has {len(valid_bytes)} bytes; "
                f"need at least seq_len + 1 = {train.seq_len + 1}"
            )
        need = train.batch_size * train.eval_batches * (train.seq_len + 1)
        if len(valid_bytes) < need:  # fail now, not in the evaluation after training
            raise ConfigError(
                f"validation split of {data.path or 'the default corpus'} has {len(valid_bytes)} bytes; "
                f"TrainConfig.eval_batches={train.eval_batches} x batch_size={train.batch_size} x (seq_len + 1) "
                f"needs {need}: lower --train.eval_batches or use more data"
            )
        if data.tokenizer:
            return _subword_source(config, train_bytes, valid_bytes, host_index, host_count)
        if config.model.vocab_size < 256:
            raise ConfigError(f"byte-level text needs ModelConfig.vocab_size >= 256, got {config.model.vocab_size}; "
                              "a subword model reads text through its tokenizer: set data.tokenizer")

        def train_batch(step: int) -> Batch:
            return text_batch(train_bytes, seed=train.seed, step=step, batch_size=train.batch_size,
                              seq_len=train.seq_len, host_index=host_index, host_count=host_count)

        def evals() -> list[Batch]:
            return eval_batches(valid_bytes, batch_size=train.batch_size, seq_len=train.seq_len,
                                num_batches=train.eval_batches)

        return DataSource("bpb", train_batch, evals)

    task_cfg = _make_task(data.task, data.task_kwargs(), train.seq_len)

    def task_batch(step: int) -> Batch:
        return task_lib.make_batch(task_cfg, seed=train.seed, step=step, batch_size=train.batch_size,
                                   seq_len=train.seq_len)

    def task_evals() -> list[Batch]:
        return [task_lib.make_batch(task_cfg, seed=train.seed + _EVAL_SEED_OFFSET, step=i,
                                    batch_size=train.batch_size, seq_len=train.seq_len)
                for i in range(train.eval_batches)]

    return DataSource("accuracy", task_batch, task_evals)


def data_fingerprint(config: Config) -> dict | None:
    """The text corpus a config trains on (:func:`ling_jax.data.corpus_fingerprint`) with where it
    was read; None for synthetic tasks, which are a pure function of their settings."""
    data = config.data
    if data.task != "text":
        return None
    where = data.path or f"{default_corpus_root()} (this Python's standard library)"
    return {**corpus_fingerprint(data.path or None, data.validation_fraction), "read_from": where}
