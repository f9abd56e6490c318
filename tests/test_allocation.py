"""The proportional allocation policy."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiocoloc.shm.allocation import demand_from, proportional_targets


def test_shares_follow_demand() -> None:
    assert proportional_targets([1, 2, 4, 8], [1] * 4, [1000] * 4, 154) == [11, 21, 41, 81]


def test_idle_pipes_fall_to_their_minimum() -> None:
    targets = proportional_targets([5.0] + [0.0] * 15, [1] * 16, [256] * 16, 251)
    assert targets == [236] + [1] * 15


def test_a_capped_pipe_leaves_the_rest_to_others() -> None:
    assert proportional_targets([100, 1, 1], [1, 1, 1], [10, 500, 500], 100) == [10, 45, 45]


def test_no_demand_at_all_keeps_minimums() -> None:
    assert proportional_targets([0, 0], [2, 3], [9, 9], 100) == [2, 3]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="same length"):
        proportional_targets([1], [1, 1], [2, 2], 10)
    with pytest.raises(ValueError, match="min <= max"):
        proportional_targets([1], [3], [2], 10)


def test_blocked_pipes_count_what_they_could_not_send() -> None:
    assert demand_from(100.0, 0.0) == 100.0
    assert demand_from(100.0, 0.5) == 200.0
    assert demand_from(100.0, 1.0) == 400.0  # capped boost
    assert demand_from(-5.0, 0.2) == 0.0


@st.composite
def pools(draw: st.DrawFn) -> tuple[list[float], list[int], list[int], int]:
    n = draw(st.integers(1, 20))
    demands = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.001, 1e9)), min_size=n, max_size=n))
    mins = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    maxs = [lo + draw(st.integers(0, 300)) for lo in mins]
    total = sum(mins) + draw(st.integers(0, 2000))
    return demands, mins, maxs, total


@given(pools())
def test_never_overcommitted_and_within_bounds(
    pool: tuple[list[float], list[int], list[int], int],
) -> None:
    demands, mins, maxs, total = pool
    targets = proportional_targets(demands, mins, maxs, total)
    assert sum(targets) <= total
    for t, lo, hi, d in zip(targets, mins, maxs, demands, strict=True):
        assert lo <= t <= hi
        if d == 0:
            assert t == lo


@given(pools())
def test_uncapped_shares_are_proportional_to_a_slice(
    pool: tuple[list[float], list[int], list[int], int],
) -> None:
    demands, mins, maxs, total = pool
    maxs = [total] * len(mins)  # nobody capped
    targets = proportional_targets(demands, mins, maxs, total)
    weight = sum(demands)
    if weight == 0:
        return
    left = total - sum(mins)
    for t, lo, d in zip(targets, mins, demands, strict=True):
        assert abs((t - lo) - left * d / weight) <= 1
    assert sum(targets) == total  # everything handed out
