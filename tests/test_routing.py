"""Tests of the shared selection primitives: fast top-k against ``lax.top_k``, rank within a
group against the O(N^2) count, capacities, and the edge cases (ties, empty groups, capacity 0
and 1, k larger than the number of valid tokens)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_jax import routing

N, G = 32, 5  # items, groups (rank tests; fixed so hypothesis examples never recompile)
_rank = jax.jit(lambda ids: routing.rank_in_group(ids, G))
_rank_ref = jax.jit(routing.reference_rank_in_group)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 6])
def test_top_k_indices_equals_reference_with_ties_and_leading_dims(k):
    rng = np.random.default_rng(k)
    scores = jnp.asarray(rng.integers(0, 3, size=(2, 5, 6)).astype(np.float32))  # many ties
    scores = scores.at[0, 0].set(-jnp.inf)  # a row of -inf: still k distinct, lowest index first
    got = routing.top_k_indices(scores, k)
    assert got.shape == (2, 5, k) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got, routing.reference_top_k_indices(scores, k))
    np.testing.assert_array_equal(routing.top_k_values(scores, k), jax.lax.top_k(scores, k)[0])
    assert all(len(set(row)) == k for row in np.asarray(got).reshape(10, k).tolist())


def test_top_k_indices_rejects_k_beyond_the_axis():
    with pytest.raises(ValueError, match="k=7"):
        routing.top_k_indices(jnp.zeros((2, 6)), 7)


def test_top_k_mask_with_k_above_the_valid_count_marks_only_valid_tokens():
    scores = jnp.asarray([[0.3, 0.9, 0.1, 0.5], [1.0, 1.0, 1.0, 1.0]])
    valid = jnp.asarray([[True, False, True, False], [True, True, True, True]])
    mask = routing.top_k_mask(scores, 3, valid)
    np.testing.assert_array_equal(mask, [[True, False, True, False], [True, True, True, False]])
    np.testing.assert_array_equal(routing.top_k_mask(scores, 0, valid), np.zeros((2, 4), bool))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), used=st.integers(1, G))
def test_rank_in_group_equals_the_count_of_earlier_members(seed, used):
    """Ids drawn from the first `used` groups only: the other groups are empty."""
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, used, size=N), jnp.int32)
    rank, order, sizes = _rank(ids)
    np.testing.assert_array_equal(rank, _rank_ref(ids))
    np.testing.assert_array_equal(sizes, np.bincount(np.asarray(ids), minlength=G))
    assert np.all(np.asarray(sizes)[used:] == 0)
    starts = routing.group_starts(sizes)
    np.testing.assert_array_equal(np.asarray(order)[np.asarray(starts)[ids] + np.asarray(rank)], np.arange(N))


@pytest.mark.parametrize("capacity", [0, 1, 3, N])
def test_rank_below_capacity_keeps_each_groups_first_members(capacity):
    ids = jnp.asarray([2, 0, 2, 2, 4, 0, 2] * 4 + [1, 1, 1, 1], jnp.int32)  # group 3 empty
    rank, _, sizes = _rank(ids)
    keep = np.asarray(rank < capacity)
    for g in range(G):
        members = np.flatnonzero(np.asarray(ids) == g)
        np.testing.assert_array_equal(keep[members], np.arange(len(members)) < capacity)
    assert int(keep.sum()) == int(np.minimum(np.asarray(sizes), capacity).sum())


def test_group_starts_with_empty_groups():
    np.testing.assert_array_equal(routing.group_starts(jnp.asarray([0, 3, 0, 2, 0])), [0, 0, 3, 3, 5])
    np.testing.assert_array_equal(routing.group_starts(jnp.zeros((0,), jnp.int32)), np.zeros((0,)))


def test_token_capacity_by_fraction_and_budget():
    assert routing.token_capacity(100, 0.25) == 25
    assert routing.token_capacity(100, 0.0) == 1  # at least one slot
    assert routing.token_capacity(100, 1.0) == 100
    assert routing.token_capacity(100, budget=0) == 0
    assert routing.token_capacity(100, budget=30) == 30
    assert routing.token_capacity(100, budget=500) == 100
    for bad in (dict(fraction=1.5), dict(budget=-1), dict(), dict(fraction=0.5, budget=3)):
        with pytest.raises(ValueError):
            routing.token_capacity(100, **bad)


def test_expert_capacity_formula_and_clipping():
    assert routing.expert_capacity(100, 2, 8, 1.25) == math.ceil(1.25 * 100 * 2 / 8) == 32
    assert routing.expert_capacity(100, 2, 8, 0.0) == 100  # dropless
    assert routing.expert_capacity(100, 2, 8, 50.0) == 100  # a token picks an expert once
    assert routing.expert_capacity(10, 1, 64, 0.01) == 1
    assert routing.expert_capacity(0, 1, 4, 0.0) == 1
    with pytest.raises(ValueError, match="capacity_factor"):
        routing.expert_capacity(10, 1, 2, -1.0)
