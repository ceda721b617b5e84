"""Synthetic retrieval tasks over the 256-id byte vocabulary, as next-token `Batch`es.

Token ids (disjoint ranges inside 0..255, shared by all tasks):

  id        name        use
  0         PAD         left padding of sequences shorter than seq_len + 1
  1         MARK        starts a needle ("MARK key value") and the needle query ("MARK key")
  2         QUERY       starts a multi-hop query ("QUERY start HOP_h")
  3         (reserved)  unused
  4..15     HOP_h       hop count h = id - HOP_BASE (h in 1..MAX_HOPS = 12)
  16..63    FILLER      haystack / filler tokens (uniform random; ``filler="vocab"``)
  64..159   KEY         keys; multi-hop node i as an edge *source* / query start
  160..255  VALUE       values; multi-hop node i as an edge *destination* / answer

Every task builds, per example, a token sequence of seq_len + 1 ids; inputs = seq[:-1] and
targets = seq[1:]. `loss_mask` is 1 only where the target is an answer; `oracle_mask` (over input
positions) marks the tokens that carry the answer — the evidence (queried pairs, the queried
needle, the edges on the path) and the query tokens — i.e. what a token-pruning policy must keep.
All evidence precedes its query, so each task is solvable by a causal model.

How much the filler looks like evidence is a knob of every task:

* ``filler="vocab"`` (default): filler from its own id range 16..63, which no evidence uses;
* ``filler="code"``: a contiguous window of real source bytes from the default corpus (the
  standard library's ``.py`` files, train split): letters (65..122) share ids with keys and
  UTF-8/tab/newline bytes with values and hop counts, so filler tokens look like evidence;
* ``filler="mixed"``: each example draws one of the two (half each), for a model that should
  read both;
* distractors from the same vocabulary as the evidence, never queried: context pairs beyond the
  queried ones (``num_pairs > num_queries`` in MQAR), needles beyond the asked one
  (``num_needles > 1``), and the edges off the query's path in multi-hop (every graph is one
  cycle over ``num_nodes`` nodes).

Generation is a pure function of (seed, step, row): row r of a batch uses
`np.random.default_rng([seed, step, r])`, so a host slice of a global batch is generated alone.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ling_jax.data.batch import Batch, host_rows

PAD = 0
MARK = 1
QUERY = 2
HOP_BASE = 3
MAX_HOPS = 12
FILLER_START, FILLER_SIZE = 16, 48
KEY_START, KEY_SIZE = 64, 96
VALUE_START, VALUE_SIZE = 160, 96


def hop_token(h: int) -> int:
    """Token id for the hop count h (1 <= h <= MAX_HOPS)."""
    if not 1 <= h <= MAX_HOPS:
        raise ValueError(f"hop count must be in [1, {MAX_HOPS}], got {h}")
    return HOP_BASE + h


# ----------------------------------------------------------------------------- sequence helpers


@dataclasses.dataclass
class _Example:
    """One example: seq [T+1] ids, answer positions (indices into seq whose token is scored),
    oracle positions (indices into seq, all < T)."""

    seq: np.ndarray
    answers: list[int]
    oracle: list[int]


FILLERS = ("vocab", "code", "mixed")


@functools.lru_cache(maxsize=1)
def _code_bytes() -> np.ndarray:
    """The default corpus's train split (read once per process)."""
    from ling_jax.data.corpus import load_corpus

    return load_corpus(None, split="train")


def _filler(rng: np.random.Generator, n: int, kind: str = "vocab") -> np.ndarray:
    """``n`` filler tokens: uniform over the filler ids, or a random window of real code bytes.

    Both draw the same numbers from ``rng`` (the code window's offset comes from a child seed), so
    a task's evidence, queries and layout are the same for either kind: only the filler changes."""
    tokens = rng.integers(FILLER_START, FILLER_START + FILLER_SIZE, size=n)
    if kind == "vocab":
        return tokens
    child = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])
    code = _code_bytes()
    if len(code) <= n:
        raise ValueError(f"the code corpus ({len(code)} bytes) is too short for {n} filler tokens")
    start = int(child.integers(0, len(code) - n))
    if kind == "mixed" and child.random() < 0.5:  # mixed: half the examples each kind
        return tokens
    return code[start : start + n].astype(np.int64)


def _check_filler(value: Any) -> None:
    if value not in FILLERS:
        raise ValueError(f"filler must be one of {FILLERS}, got {value!r}")


def _interleave(
    rng: np.random.Generator, blocks: list[np.ndarray], n_filler: int, kind: str = "vocab"
) -> tuple[np.ndarray, np.ndarray]:
    """Blocks (kept in the given order, never split) scattered uniformly among n_filler filler tokens.

    Returns (tokens [n_filler + sum(len(b))], starts [len(blocks)]: token offset of each block).
    """
    k = len(blocks)
    lengths = np.array([len(b) for b in blocks], dtype=np.int64)
    slots = np.sort(rng.choice(n_filler + k, size=k, replace=False))  # unit index of each block
    starts = slots - np.arange(k) + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = _filler(rng, n_filler + int(lengths.sum()), kind)
    for block, s in zip(blocks, starts):
        tokens[s : s + len(block)] = block
    return tokens, starts


def _left_pad(parts: list[np.ndarray], total: int) -> tuple[np.ndarray, int]:
    """PAD-prefixed concatenation of `parts` to length `total`; also returns the pad length."""
    body = np.concatenate(parts)
    pad = total - len(body)
    assert pad >= 0, (total, len(body))
    return np.concatenate([np.full(pad, PAD, dtype=np.int64), body]), pad


def _filler_count(evidence_tokens: int, filler_fraction: float) -> int:
    """Filler tokens so that filler is `filler_fraction` of the context (evidence + filler)."""
    return int(round(evidence_tokens * filler_fraction / (1.0 - filler_fraction)))


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")


def _check_fraction(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")


@runtime_checkable
class TaskConfig(Protocol):
    """What `make_batch` needs from a task config."""

    def min_seq_len(self) -> int: ...

    def sample(self, rng: np.random.Generator, seq_len: int) -> _Example: ...


# ----------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class AssociativeRecall:
    """Multi-query associative recall (MQAR).

    Layout: [PAD...] [context] [k_1 v_1 k_2 v_2 ... k_q v_q], where the context holds `num_pairs`
    "key value" pairs (keys distinct, drawn from the first `num_keys` KEY ids; values from the first
    `num_values` VALUE ids, repeats allowed) in random order, scattered among filler tokens (never
    inside a pair), filler being `filler_fraction` of the context. The `num_queries` queried keys are
    distinct context keys. At a query the input is k_i and the target is v_i (loss_mask = 1 only
    there). oracle_mask: the key and value tokens of the queried pairs, and the query keys.

    The defaults are the easy setting meant for a tiny (2-layer, d_model 64) model at seq_len 64:
    8 pairs, 8 queries, 16 keys, 16 values, no filler — 32 task tokens (needs seq_len >= 31), the
    rest of a 64-token row is front PAD. Solving it still takes an induction circuit (a previous-
    token head feeding a matching head), so it needs >= 2 layers; fewer pairs/keys make it easier.
    """

    num_pairs: int = 8
    num_queries: int = 8
    filler_fraction: float = 0.0
    num_keys: int = 16
    num_values: int = 16
    filler: str = "vocab"  # vocab | code | mixed (see the module docstring)

    def __post_init__(self) -> None:
        _check_filler(self.filler)
        _check_int("num_pairs", self.num_pairs, 1, KEY_SIZE)
        _check_int("num_queries", self.num_queries, 1, self.num_pairs)
        _check_fraction("filler_fraction", self.filler_fraction)
        _check_int("num_keys", self.num_keys, self.num_pairs, KEY_SIZE)
        _check_int("num_values", self.num_values, 1, VALUE_SIZE)

    def min_seq_len(self) -> int:
        """Smallest seq_len holding context and queries (sequence = seq_len + 1 tokens)."""
        context = 2 * self.num_pairs + _filler_count(2 * self.num_pairs, self.filler_fraction)
        return context + 2 * self.num_queries - 1

    def sample(self, rng: np.random.Generator, seq_len: int) -> _Example:
        keys = KEY_START + rng.choice(self.num_keys, size=self.num_pairs, replace=False)
        values = VALUE_START + rng.integers(0, self.num_values, size=self.num_pairs)
        pairs = [np.array([k, v]) for k, v in zip(keys, values)]  # keys are random: order is random
        context, starts = _interleave(rng, pairs, _filler_count(2 * self.num_pairs, self.filler_fraction),
                                      self.filler)
        asked = rng.choice(self.num_pairs, size=self.num_queries, replace=False)
        queries = np.stack([keys[asked], values[asked]], axis=1).reshape(-1)
        seq, pad = _left_pad([context, queries], seq_len + 1)
        q0 = pad + len(context)
        answers = [q0 + 2 * i + 1 for i in range(self.num_queries)]
        oracle = [pad + int(starts[j]) + d for j in asked for d in (0, 1)] + [a - 1 for a in answers]
        return _Example(seq, answers, oracle)


@dataclasses.dataclass(frozen=True)
class NeedleRetrieval:
    """Needle in a haystack.

    Layout: [haystack] [MARK key value]: the haystack is filler with `num_needles` needles
    "MARK key value" (distinct keys from the first `num_keys` KEY ids; values from the first
    `num_values` VALUE ids) that never overlap; the query "MARK key" asks for one needle, and the
    target after its key is that needle's value (the only loss position, the last one). The queried
    needle starts at fractional `depth` of the haystack (nearest position not inside another needle),
    or at a uniformly random position when depth is None. oracle_mask: the queried needle's three
    tokens and the query's MARK and key. The haystack fills the whole sequence (no padding).
    """

    num_needles: int = 1
    depth: float | None = None
    num_keys: int = KEY_SIZE
    num_values: int = VALUE_SIZE
    filler: str = "vocab"  # vocab | code | mixed (see the module docstring)

    def __post_init__(self) -> None:
        _check_filler(self.filler)
        _check_int("num_needles", self.num_needles, 1, KEY_SIZE)
        depth = self.depth
        if depth is not None and (not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0):
            raise ValueError(f"depth must be None or a float in [0, 1], got {self.depth!r}")
        _check_int("num_keys", self.num_keys, self.num_needles, KEY_SIZE)
        _check_int("num_values", self.num_values, 1, VALUE_SIZE)

    def min_seq_len(self) -> int:
        """Needles plus the query: 3 * num_needles + 3 tokens (sequence = seq_len + 1 tokens)."""
        return 3 * self.num_needles + 3 - 1

    def sample(self, rng: np.random.Generator, seq_len: int) -> _Example:
        keys = KEY_START + rng.choice(self.num_keys, size=self.num_needles, replace=False)
        values = VALUE_START + rng.integers(0, self.num_values, size=self.num_needles)
        needles = [np.array([MARK, k, v]) for k, v in zip(keys, values)]
        haystack_len = seq_len + 1 - 3
        n_filler = haystack_len - 3 * self.num_needles
        if self.depth is None:
            haystack, starts = _interleave(rng, needles, n_filler, self.filler)
            asked = int(rng.integers(self.num_needles))
            at = int(starts[asked])
        else:
            asked = 0  # keys are random, so needle 0 is as good as any
            rest, starts = _interleave(rng, needles[1:], n_filler, self.filler)
            inside = np.zeros(len(rest) + 1, dtype=bool)  # insertion offsets strictly inside a needle
            for s in starts:
                inside[s + 1 : s + 3] = True
            allowed = np.flatnonzero(~inside)
            target = self.depth * len(rest)
            at = int(allowed[np.argmin(np.abs(allowed - target))])
            haystack = np.concatenate([rest[:at], needles[0], rest[at:]])
        seq = np.concatenate([haystack, [MARK, keys[asked], values[asked]]])
        answer = len(seq) - 1
        oracle = [at, at + 1, at + 2, answer - 2, answer - 1]
        return _Example(seq, [answer], oracle)


@dataclasses.dataclass(frozen=True)
class MultiHop:
    """Multi-hop pointer chasing.

    The graph is one random cycle over nodes 0..num_nodes-1 (each node has exactly one out-edge).
    Node i is written KEY_START + i as an edge source or query start and VALUE_START + i as an edge
    destination or answer, so "a b" pairs are unambiguous even without filler. Layout:
    [PAD...] [context] [QUERY start HOP_h answer]: the context holds the `num_nodes` edges
    "a b" in random order among filler (filler = `filler_fraction` of the context); h is uniform
    in [min_hops, max_hops] per example and the answer is the node reached from `start` after h
    hops (the only loss position, the last one). oracle_mask: the h edges on the path and the
    QUERY, start and HOP_h tokens.
    """

    num_nodes: int = 16
    min_hops: int = 1
    max_hops: int = 4
    filler_fraction: float = 0.0
    filler: str = "vocab"  # vocab | code | mixed (see the module docstring)

    def __post_init__(self) -> None:
        _check_filler(self.filler)
        _check_int("num_nodes", self.num_nodes, 2, KEY_SIZE)
        top = min(MAX_HOPS, self.num_nodes - 1)
        _check_int("max_hops", self.max_hops, 1, top)
        _check_int("min_hops", self.min_hops, 1, self.max_hops)
        _check_fraction("filler_fraction", self.filler_fraction)

    def min_seq_len(self) -> int:
        """Edges, filler and the 4-token query (sequence = seq_len + 1 tokens)."""
        return 2 * self.num_nodes + _filler_count(2 * self.num_nodes, self.filler_fraction) + 4 - 1

    def sample(self, rng: np.random.Generator, seq_len: int) -> _Example:
        order = rng.permutation(self.num_nodes)
        succ = np.empty(self.num_nodes, dtype=np.int64)
        succ[order] = np.roll(order, -1)  # the cycle order[0] -> order[1] -> ... -> order[0]
        sources = rng.permutation(self.num_nodes)  # edge presentation order
        edges = [np.array([KEY_START + a, VALUE_START + succ[a]]) for a in sources]
        context, starts = _interleave(rng, edges, _filler_count(2 * self.num_nodes, self.filler_fraction),
                                      self.filler)
        start = int(rng.integers(self.num_nodes))
        hops = int(rng.integers(self.min_hops, self.max_hops + 1))
        path = [start]
        for _ in range(hops):
            path.append(int(succ[path[-1]]))
        query = np.array([QUERY, KEY_START + start, hop_token(hops), VALUE_START + path[-1]])
        seq, pad = _left_pad([context, query], seq_len + 1)
        edge_at = {int(a): pad + int(s) for a, s in zip(sources, starts)}
        answer = len(seq) - 1
        oracle = [edge_at[a] + d for a in path[:-1] for d in (0, 1)] + [answer - 3, answer - 2, answer - 1]
        return _Example(seq, [answer], oracle)


# ----------------------------------------------------------------------------- registry and batches

TASKS: dict[str, type] = {"mqar": AssociativeRecall, "needle": NeedleRetrieval, "multihop": MultiHop}
"""Task name -> config class (instantiate with defaults or via `make_task`)."""


def make_task(name: str, **overrides: Any) -> AssociativeRecall | NeedleRetrieval | MultiHop:
    """The config of task `name` (a key of TASKS) with its defaults replaced by `overrides`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)}")
    cls = TASKS[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"task {name!r} has no field(s) {unknown}; fields: {fields}")
    return cls(**overrides)


def make_batch(
    task_cfg: TaskConfig,
    *,
    seed: int,
    step: int,
    batch_size: int,
    seq_len: int,
    host_index: int = 0,
    host_count: int = 1,
) -> Batch:
    """A batch of `task_cfg` examples, a pure function of (seed, step).

    Returns this host's rows [host_index * B/host_count, ...) of the global batch: a Batch of shape
    [batch_size // host_count, seq_len]. Raises ValueError if seq_len < task_cfg.min_seq_len().
    """
    for name, value in (("seed", seed), ("step", step)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if not isinstance(seq_len, (int, np.integer)) or seq_len < task_cfg.min_seq_len():
        raise ValueError(
            f"seq_len={seq_len} is too short for {task_cfg}: need seq_len >= {task_cfg.min_seq_len()}"
        )
    lo, hi = host_rows(batch_size, host_index, host_count)
    seqs = np.empty((hi - lo, seq_len + 1), dtype=np.int32)
    loss = np.zeros((hi - lo, seq_len), dtype=np.float32)
    oracle = np.zeros((hi - lo, seq_len), dtype=np.bool_)
    for i, row in enumerate(range(lo, hi)):
        ex = task_cfg.sample(np.random.default_rng([seed, step, row]), seq_len)
        seqs[i] = ex.seq
        loss[i, np.asarray(ex.answers) - 1] = 1.0
        oracle[i, ex.oracle] = True
    return Batch(inputs=seqs[:, :-1], targets=seqs[:, 1:], loss_mask=loss, oracle_mask=oracle)


def accuracy(logits_argmax: np.ndarray, batch: Batch) -> float:
    """Mean of (logits_argmax == targets) over positions with loss_mask > 0.

    Args:
      logits_argmax: [B, T] predicted ids (numpy or jax array).
      batch: the Batch the predictions are for.
    """
    pred = np.asarray(logits_argmax)
    if pred.shape != batch.targets.shape:
        raise ValueError(f"logits_argmax has shape {pred.shape}, expected {batch.targets.shape}")
    mask = batch.loss_mask > 0
    if not mask.any():
        raise ValueError("batch has no loss positions (loss_mask is all zero)")
    return float(np.mean(pred[mask] == batch.targets[mask]))
