"""Synthetic tasks: targets re-derived from the inputs alone, masks, determinism, config checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_jax.data import (
    TASKS,
    AssociativeRecall,
    Batch,
    MultiHop,
    NeedleRetrieval,
    accuracy,
    make_batch,
    make_task,
)
from ling_jax.data import tasks as T

SETTINGS = settings(max_examples=15, deadline=None)
KEYS = range(T.KEY_START, T.KEY_START + T.KEY_SIZE)
VALUES = range(T.VALUE_START, T.VALUE_START + T.VALUE_SIZE)
FILLERS = range(T.FILLER_START, T.FILLER_START + T.FILLER_SIZE)


def test_token_ranges_are_disjoint_and_inside_the_byte_vocab():
    special = {T.PAD, T.MARK, T.QUERY} | {T.hop_token(h) for h in range(1, T.MAX_HOPS + 1)}
    ranges = [special, set(FILLERS), set(KEYS), set(VALUES)]
    assert sum(len(r) for r in ranges) == len(set().union(*ranges))
    assert set().union(*ranges) <= set(range(256))


# ----------------------------------------------------------------------------- checkers (inputs only)


def check_mqar(cfg: AssociativeRecall, batch: Batch) -> None:
    for inp, tgt, loss, oracle in zip(batch.inputs, batch.targets, batch.loss_mask, batch.oracle_mask):
        seq = np.append(inp, tgt[-1])
        loss_pos = np.flatnonzero(loss)
        assert len(loss_pos) == cfg.num_queries
        q0 = len(seq) - 2 * cfg.num_queries  # first query key
        assert list(loss_pos) == list(range(q0, len(inp), 2))
        context = seq[:q0]
        body = context[context != T.PAD]
        assert (context[: len(context) - len(body)] == T.PAD).all()  # padding only at the front
        key_pos = [i for i, t in enumerate(context) if t in KEYS]
        assert len(key_pos) == cfg.num_pairs
        assert len({context[i] for i in key_pos}) == cfg.num_pairs  # distinct keys
        assert all(context[i + 1] in VALUES for i in key_pos)  # a key is always followed by its value
        assert all(t in FILLERS for t in body if t not in KEYS and t not in VALUES)
        n_filler = sum(t in FILLERS for t in body)
        assert n_filler == round(2 * cfg.num_pairs * cfg.filler_fraction / (1 - cfg.filler_fraction))
        expected_oracle = set()
        for t in loss_pos:  # scan the inputs before the query for its key, then read the value after it
            key = inp[t]
            assert key in KEYS
            j = next(i for i in range(t) if inp[i] == key)
            assert tgt[t] == inp[j + 1]
            expected_oracle |= {j, j + 1, t}
        assert set(np.flatnonzero(oracle)) == expected_oracle


def check_needle(cfg: NeedleRetrieval, batch: Batch) -> None:
    for inp, tgt, loss, oracle in zip(batch.inputs, batch.targets, batch.loss_mask, batch.oracle_mask):
        n = len(inp)
        assert list(np.flatnonzero(loss)) == [n - 1]
        assert inp[n - 2] == T.MARK and inp[n - 1] in KEYS
        marks = [i for i in range(n - 2) if inp[i] == T.MARK]
        assert len(marks) == cfg.num_needles
        assert all(inp[i + 1] in KEYS and inp[i + 2] in VALUES for i in marks)
        assert len({inp[i + 1] for i in marks}) == cfg.num_needles
        hits = [i for i in marks if inp[i + 1] == inp[n - 1]]
        assert len(hits) == 1
        j = hits[0]
        assert tgt[n - 1] == inp[j + 2]
        assert set(np.flatnonzero(oracle)) == {j, j + 1, j + 2, n - 2, n - 1}
        others = set(range(n - 2)) - {m + d for m in marks for d in range(3)}
        assert all(inp[i] in FILLERS for i in others)
        if cfg.depth is not None:
            haystack = n + 1 - 3
            assert abs(j - cfg.depth * (haystack - 3)) <= 3


def check_multihop(cfg: MultiHop, batch: Batch) -> None:
    for inp, tgt, loss, oracle in zip(batch.inputs, batch.targets, batch.loss_mask, batch.oracle_mask):
        n = len(inp)
        assert list(np.flatnonzero(loss)) == [n - 1]
        assert inp[n - 3] == T.QUERY and inp[n - 2] in KEYS
        hops = int(inp[n - 1]) - T.HOP_BASE
        assert cfg.min_hops <= hops <= cfg.max_hops
        edge_at = {}
        for i in range(n - 4):  # parse "source destination" pairs from the context
            if inp[i] in KEYS:
                assert inp[i + 1] in VALUES
                edge_at[int(inp[i]) - T.KEY_START] = i
        assert sorted(edge_at) == list(range(cfg.num_nodes))
        node, path_pos = int(inp[n - 2]) - T.KEY_START, []
        for _ in range(hops):
            path_pos.append(edge_at[node])
            node = int(inp[edge_at[node] + 1]) - T.VALUE_START
        assert tgt[n - 1] == T.VALUE_START + node
        expected = {p + d for p in path_pos for d in (0, 1)} | {n - 3, n - 2, n - 1}
        assert set(np.flatnonzero(oracle)) == expected


CHECKERS = {"mqar": check_mqar, "needle": check_needle, "multihop": check_multihop}


# ----------------------------------------------------------------------------- defaults


@pytest.mark.parametrize("name", sorted(TASKS))
def test_default_task_targets_follow_from_inputs(name):
    cfg = make_task(name)
    batch = make_batch(cfg, seed=0, step=0, batch_size=16, seq_len=64)
    assert batch.inputs.shape == (16, 64) and batch.inputs.dtype == np.int32
    assert batch.loss_mask.dtype == np.float32 and batch.oracle_mask.dtype == np.bool_
    np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    CHECKERS[name](cfg, batch)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_batches_are_pure_functions_of_seed_and_step(name):
    cfg = make_task(name)
    kw = dict(batch_size=8, seq_len=64)
    a, b = make_batch(cfg, seed=3, step=9, **kw), make_batch(cfg, seed=3, step=9, **kw)
    for k, v in a.as_dict().items():
        np.testing.assert_array_equal(v, b.as_dict()[k])
    assert not np.array_equal(a.inputs, make_batch(cfg, seed=3, step=10, **kw).inputs)
    assert not np.array_equal(a.inputs, make_batch(cfg, seed=4, step=9, **kw).inputs)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_host_slices_concatenate_to_the_global_batch(name):
    cfg = make_task(name)
    kw = dict(seed=1, step=2, batch_size=8, seq_len=64)
    whole = make_batch(cfg, **kw)
    joined = Batch.concatenate([make_batch(cfg, host_index=i, host_count=4, **kw) for i in range(4)])
    for k, v in whole.as_dict().items():
        np.testing.assert_array_equal(v, joined.as_dict()[k])


def test_mqar_default_is_the_documented_easy_setting():
    cfg = make_task("mqar")
    knobs = (cfg.num_pairs, cfg.num_queries, cfg.num_keys, cfg.num_values, cfg.filler_fraction)
    assert knobs == (8, 8, 16, 16, 0.0)
    assert cfg.min_seq_len() <= 64


def test_needle_depth_places_the_needle():
    for depth in (0.0, 0.25, 0.5, 1.0):
        cfg = NeedleRetrieval(num_needles=3, depth=depth)
        batch = make_batch(cfg, seed=0, step=0, batch_size=4, seq_len=200)
        check_needle(cfg, batch)


def test_multihop_uses_every_hop_count():
    cfg = MultiHop(num_nodes=12, min_hops=2, max_hops=5)
    batch = make_batch(cfg, seed=0, step=0, batch_size=64, seq_len=64)
    assert set(batch.inputs[:, -1] - T.HOP_BASE) == {2, 3, 4, 5}


# ----------------------------------------------------------------------------- property tests


@SETTINGS
@given(
    num_pairs=st.integers(1, 12),
    queries=st.data(),
    filler_fraction=st.sampled_from([0.0, 0.25, 0.5, 0.9]),
    extra_len=st.integers(0, 20),
    seed=st.integers(0, 2**31),
)
def test_mqar_property(num_pairs, queries, filler_fraction, extra_len, seed):
    cfg = AssociativeRecall(
        num_pairs=num_pairs,
        num_queries=queries.draw(st.integers(1, num_pairs)),
        filler_fraction=filler_fraction,
        num_keys=queries.draw(st.integers(num_pairs, T.KEY_SIZE)),
        num_values=queries.draw(st.integers(1, T.VALUE_SIZE)),
    )
    seq_len = cfg.min_seq_len() + extra_len
    check_mqar(cfg, make_batch(cfg, seed=seed, step=1, batch_size=3, seq_len=seq_len))


@SETTINGS
@given(
    num_needles=st.integers(1, 6),
    depth=st.one_of(st.none(), st.floats(0, 1)),
    extra_len=st.integers(0, 100),
    seed=st.integers(0, 2**31),
)
def test_needle_property(num_needles, depth, extra_len, seed):
    cfg = NeedleRetrieval(num_needles=num_needles, depth=depth)
    seq_len = cfg.min_seq_len() + extra_len
    check_needle(cfg, make_batch(cfg, seed=seed, step=0, batch_size=3, seq_len=seq_len))


@SETTINGS
@given(
    num_nodes=st.integers(2, 30),
    hops=st.data(),
    filler_fraction=st.sampled_from([0.0, 0.3, 0.7]),
    extra_len=st.integers(0, 20),
    seed=st.integers(0, 2**31),
)
def test_multihop_property(num_nodes, hops, filler_fraction, extra_len, seed):
    max_hops = hops.draw(st.integers(1, min(T.MAX_HOPS, num_nodes - 1)))
    min_hops = hops.draw(st.integers(1, max_hops))
    cfg = MultiHop(num_nodes=num_nodes, min_hops=min_hops, max_hops=max_hops, filler_fraction=filler_fraction)
    seq_len = cfg.min_seq_len() + extra_len
    check_multihop(cfg, make_batch(cfg, seed=seed, step=0, batch_size=3, seq_len=seq_len))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (AssociativeRecall, dict(num_pairs=0), "num_pairs"),
        (AssociativeRecall, dict(num_pairs=97, num_keys=96), "num_pairs"),
        (AssociativeRecall, dict(num_queries=9), "num_queries"),
        (AssociativeRecall, dict(filler_fraction=1.0), "filler_fraction"),
        (AssociativeRecall, dict(filler_fraction=-0.1), "filler_fraction"),
        (AssociativeRecall, dict(num_keys=4), "num_keys"),
        (AssociativeRecall, dict(num_values=0), "num_values"),
        (NeedleRetrieval, dict(num_needles=0), "num_needles"),
        (NeedleRetrieval, dict(depth=1.5), "depth"),
        (NeedleRetrieval, dict(num_needles=5, num_keys=4), "num_keys"),
        (MultiHop, dict(num_nodes=1), "num_nodes"),
        (MultiHop, dict(num_nodes=4, max_hops=4), "max_hops"),
        (MultiHop, dict(max_hops=13, num_nodes=50), "max_hops"),
        (MultiHop, dict(min_hops=3, max_hops=2), "min_hops"),
        (MultiHop, dict(filler_fraction=2.0), "filler_fraction"),
    ],
)
def test_config_errors_name_the_field_and_range(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"{field} must be .*\[") as err:
        cls(**kwargs)
    assert field in str(err.value)


def test_make_task_errors():
    with pytest.raises(ValueError, match=r"unknown task 'lm'.*allowed: \['mqar', 'multihop', 'needle'\]"):
        make_task("lm")
    with pytest.raises(ValueError, match="no field"):
        make_task("mqar", num_pair=3)
    assert make_task("multihop", num_nodes=8).num_nodes == 8


def test_seq_len_too_short():
    cfg = AssociativeRecall(num_pairs=8, num_queries=8)
    with pytest.raises(ValueError, match="need seq_len >= 31"):
        make_batch(cfg, seed=0, step=0, batch_size=2, seq_len=30)
    make_batch(cfg, seed=0, step=0, batch_size=2, seq_len=31)


# ----------------------------------------------------------------------------- accuracy


def test_accuracy_counts_only_loss_positions():
    batch = make_batch(make_task("mqar"), seed=0, step=0, batch_size=4, seq_len=64)
    assert accuracy(batch.targets, batch) == 1.0
    pred = np.where(batch.loss_mask > 0, -1, batch.targets)  # wrong exactly at the scored positions
    assert accuracy(pred, batch) == 0.0
    pred = batch.targets.copy()
    pred[0, np.flatnonzero(batch.loss_mask[0])[:4]] = -1  # 4 of 32 scored positions wrong
    assert accuracy(pred, batch) == pytest.approx(28 / 32)
    with pytest.raises(ValueError, match="shape"):
        accuracy(pred[:, :-1], batch)


# ----------------------------------------------------------------------------- filler that looks like evidence


@pytest.mark.parametrize("name,options", [("mqar", dict(num_pairs=4, num_queries=2, filler_fraction=0.8)),
                                          ("needle", dict(num_needles=3)),
                                          ("multihop", dict(num_nodes=6, filler_fraction=0.8))])
def test_code_filler_is_real_source_bytes_around_the_same_evidence(name, options):
    vocab = make_batch(make_task(name, **options), seed=1, step=2, batch_size=4, seq_len=96)
    code = make_batch(make_task(name, filler="code", **options), seed=1, step=2, batch_size=4, seq_len=96)
    # Same evidence, queries, answers and oracle positions: only the filler changes.
    np.testing.assert_array_equal(code.loss_mask, vocab.loss_mask)
    np.testing.assert_array_equal(code.oracle_mask, vocab.oracle_mask)
    np.testing.assert_array_equal(code.targets[code.loss_mask > 0], vocab.targets[vocab.loss_mask > 0])
    corpus = bytes(T._code_bytes())
    filler = (~code.oracle_mask) & (code.inputs != T.PAD) & (vocab.inputs >= T.FILLER_START) \
        & (vocab.inputs < T.FILLER_START + T.FILLER_SIZE)
    row = code.inputs[0]
    runs = np.split(np.flatnonzero(filler[0]), np.flatnonzero(np.diff(np.flatnonzero(filler[0])) > 1) + 1)
    longest = max(runs, key=len)
    assert len(longest) >= 4 and bytes(row[longest].astype(np.uint8)) in corpus
    # Real code shares ids with the evidence: some filler bytes fall in the key range.
    keys_in_filler = (code.inputs >= T.KEY_START) & (code.inputs < T.KEY_START + T.KEY_SIZE) & filler
    assert keys_in_filler.any()


def test_mixed_filler_draws_each_example_from_one_of_the_two():
    kw = dict(seed=4, step=1, batch_size=16, seq_len=64)
    rows = [make_batch(make_task("needle", num_needles=2, filler=f), **kw).inputs for f in ("vocab", "code", "mixed")]
    vocab, code, mixed = rows
    is_vocab = np.all(mixed == vocab, axis=1)
    is_code = np.all(mixed == code, axis=1)
    assert np.all(is_vocab | is_code) and is_vocab.any() and is_code.any()


def test_unknown_filler_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"filler must be one of \('vocab', 'code', 'mixed'\)"):
        make_task("mqar", filler="noise")
