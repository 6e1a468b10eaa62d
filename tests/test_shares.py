"""Shares of a multi-rank run: a deterministic partition, counts equal give or take one, work balanced."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from latentmas.app.shares import balanced_shares, batches, in_batch_order, question_work


def _skewed(count: int, seed: int = 0) -> dict[int, float]:
    """Question lengths like GSM8K's (log-normal, median ~250 characters), plus a few 10x outliers."""
    rng = np.random.default_rng(seed)
    work = {n + 1: float(x) for n, x in enumerate(rng.lognormal(5.5, 0.5, count))}
    for n in rng.choice(count, 5, replace=False):
        work[int(n) + 1] *= 10
    return work


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shares_partition_the_problems_in_number_order(world):
    work = _skewed(1319)
    shares = balanced_shares(work, world)
    assert len(shares) == world
    assert sorted(n for share in shares for n in share) == sorted(work)
    assert all(share == sorted(share) for share in shares)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert shares == balanced_shares(dict(reversed(list(work.items()))), world)  # the same whatever the order


@pytest.mark.parametrize("world", [2, 4, 8])
def test_skewed_work_is_balanced_within_the_largest_problem(world):
    work = _skewed(1319, seed=world)
    loads = [sum(work[n] for n in share) for share in balanced_shares(work, world)]
    round_robin = [sum(work[n] for n in sorted(work)[r::world]) for r in range(world)]
    largest = max(work.values())
    assert max(loads) - min(loads) <= largest
    assert max(loads) - min(loads) < (max(round_robin) - min(round_robin)) / 4


def test_fewer_problems_than_ranks_and_ties():
    assert balanced_shares({5: 1, 6: 1}, 4) == [[5], [6], [], []]
    assert balanced_shares({}, 3) == [[], [], []]
    assert balanced_shares({1: 100, **{n: 1 for n in range(2, 11)}}, 4) == [[1, 10], [2, 5, 8], [3, 6, 9], [4, 7]]
    with pytest.raises(ValueError, match="world size 0"):
        balanced_shares({1: 1}, 0)


def test_question_work_is_the_question_length():
    assert question_work({1: "What is 2 + 3?", 2: "é"}) == {1: 14, 2: 1}


def test_batch_order_by_length_is_longest_first_ties_by_number_and_number_order_is_kept():
    problems = [SimpleNamespace(number=n, question=q) for n, q in ((4, "ab"), (7, "abcd"), (9, "a"), (12, "abcd"))]
    assert [p.number for p in in_batch_order(problems, "length")] == [7, 12, 4, 9]
    assert in_batch_order(problems, "number") == problems
    with pytest.raises(ValueError, match="unknown batch order 'size'"):
        in_batch_order(problems, "size")
    assert [[p.number for p in b] for b in batches(problems, 3, "length")] == [[7, 12, 4], [9]]
    assert [[p.number for p in b] for b in batches(problems, 2, "number")] == [[4, 7], [9, 12]]
