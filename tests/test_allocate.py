"""Global width allocation (`condense_graph.allocate`): the searches, on synthetic cost curves."""

import numpy as np
import pytest

from condense_graph.allocate import Curve, levels, search_error, search_size, widths_at


def curves(seed=0, layers=3, width=20, floor=2):
    """Random cumulative cost curves (non-increasing in the width)."""
    rng = np.random.default_rng(seed)
    result = []
    for i in range(layers):
        steps = rng.exponential(1e-3 * (i + 1), width - floor)
        costs = {width: 0.0} | {width - k - 1: float(c) for k, c in enumerate(np.cumsum(steps))}
        result.append(Curve(f"l{i}", width, floor, costs))
    return result


def size(widths):
    return sum(widths.values())


def test_widths_shrink_as_the_level_rises_and_stop_at_the_floor():
    cs = curves()
    previous = None
    for level in levels(cs):
        widths = widths_at(cs, level)
        assert all(2 <= w <= 20 for w in widths.values())
        if previous is not None:
            assert all(widths[k] <= previous[k] for k in widths)
        previous = widths
    assert set(widths_at(cs, np.inf).values()) == {2}
    assert set(widths_at(cs, 0.0).values()) == {20}
    assert set(widths_at(cs, 0.0, round_to=8).values()) == {20}  # never above the width
    assert set(widths_at(cs, np.inf, round_to=8).values()) == {8}


def test_a_curve_that_dips_by_rounding_is_made_monotone():
    curve = Curve("a", 4, 1, {4: 0.0, 3: 0.2, 2: 0.1999, 1: 0.5})
    assert curve.costs[2] == 0.2 and curve.width_at(0.2) == 2


@pytest.mark.parametrize("target", [0.95, 0.7, 0.5, 0.31])
def test_size_search_lands_on_the_largest_allocation_within_the_target(target):
    cs = curves()
    full = 60

    result = search_size(cs, lambda w: size(w) / full, target)
    assert size(result.widths) / full <= target
    # the largest model within the target: the level just below the answer keeps more than it
    grid = levels(cs)
    below = grid[grid < result.level]
    assert len(below) and size(widths_at(cs, below[-1])) / full > target
    assert len(result.steps) <= int(np.ceil(np.log2(len(grid)))) + 2  # bisection, not a scan


def test_size_search_reports_the_floor_when_the_target_cannot_be_met():
    cs = curves()
    result = search_size(cs, lambda w: size(w) / 60, 0.01)
    assert set(result.widths.values()) == {2} and not result.steps[-1].accepted


def test_error_search_meets_the_budget_and_is_monotone_even_for_noisy_errors():
    """The measured error is noisy (not monotone in the level); a looser budget must still never
    give a bigger model, and every answer must have been measured within its budget."""
    cs = curves(seed=3)
    rng = np.random.default_rng(0)
    noise = {}

    def error(widths):
        key = tuple(sorted(widths.items()))
        if key not in noise:
            noise[key] = rng.uniform(0.5, 2.0)
        removed = 60 - size(widths)
        return 1e-3 * removed * noise[key]

    previous_size = None
    for budget in [1e-4, 1e-3, 3e-3, 1e-2, 2e-2, 5e-2, 0.1]:
        result = search_error(cs, error, budget)
        if result is None:
            assert error(widths_at(cs, 0.0)) > budget
            continue
        assert error(result.widths) <= budget
        assert any(s.accepted and s.widths == result.widths for s in result.steps)
        if previous_size is not None:
            assert size(result.widths) <= previous_size
        previous_size = size(result.widths)


def test_error_search_with_nan_never_accepts():
    cs = curves()
    assert search_error(cs, lambda w: float("nan"), 1.0) is None
