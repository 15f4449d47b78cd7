"""Greedy structured OBS (condense_graph.obs) against the textbook one-at-a-time loop."""

from __future__ import annotations

import numpy as np
import pytest

from condense_graph.obs import ConsumerTerm, removal_order


def correlated_features(rng, samples: int, channels: int, block: int, duplicates: int = 3) -> np.ndarray:
    """Features mixed by a random matrix, with a few channels near copies of others (order matters)."""
    features = channels * block
    mixing = rng.standard_normal((features, features)) * rng.uniform(0.2, 2.0, features)
    p = rng.standard_normal((samples, features)) @ mixing
    for copy, source in zip(range(channels - duplicates, channels), range(duplicates), strict=True):
        own, theirs = slice(copy * block, (copy + 1) * block), slice(source * block, (source + 1) * block)
        p[:, own] = 1.5 * p[:, theirs] + 0.01 * rng.standard_normal((samples, block))
    return p


def make_term(p: np.ndarray, weights: np.ndarray, block: int) -> ConsumerTerm:
    with_ones = np.hstack([p, np.ones((len(p), 1))])
    return ConsumerTerm(hessian=with_ones.T @ with_ones, weights=weights, block=block)


def random_terms(seed: int, channels: int, blocks: list[int], outputs: int = 5) -> list[ConsumerTerm]:
    """One consumer per block size, all reading the same channels (each through its own features)."""
    rng = np.random.default_rng(seed)
    terms = []
    for block in blocks:
        p = correlated_features(rng, 4 * channels * block, channels, block)
        weights = rng.standard_normal((channels * block + 1, outputs))
        weights[:-1] *= np.repeat(rng.uniform(0.1, 2.0, channels), block)[:, None]
        terms.append(make_term(p, weights, block))
    return terms


def damped_inverse(term: ConsumerTerm, damping: float = 1e-3) -> np.ndarray:
    hessian = term.hessian.astype(np.float64)
    mean = np.mean(np.diag(hessian))
    rho = max(damping * mean if mean > 0 else damping, 1e-12)
    return np.linalg.inv(hessian + rho * np.eye(len(hessian)))


def features_of(channels, block: int) -> np.ndarray:
    return (np.asarray(channels, dtype=int)[:, None] * block + np.arange(block)).ravel()


def joint_cost(terms: list[ConsumerTerm], removed) -> float:
    """Exact OBS cost of removing `removed` at once: sum_t trace(W_R^T inv(Hinv_RR) W_R)."""
    total = 0.0
    for term in terms:
        hinv, weights = damped_inverse(term), term.weights.astype(np.float64)
        rows = features_of(removed, term.block)
        total += np.trace(weights[rows].T @ np.linalg.solve(hinv[np.ix_(rows, rows)], weights[rows]))
    return total


def naive_order(terms: list[ConsumerTerm], floor: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Textbook greedy OBS: full matrices, one channel per step, float64."""
    channels = (len(terms[0].hessian) - 1) // terms[0].block
    state = [(damped_inverse(t), t.weights.astype(np.float64).copy(), t.block) for t in terms]
    alive, order, costs, total = list(range(channels)), [], [], 0.0
    while len(alive) > floor:
        best, best_cost = None, np.inf
        for c in alive:
            cost = 0.0
            for hinv, weights, block in state:
                own = features_of([c], block)
                cost += np.trace(weights[own].T @ np.linalg.solve(hinv[np.ix_(own, own)], weights[own]))
            if cost < best_cost:
                best, best_cost = c, cost
        updated = []
        for hinv, weights, block in state:
            own = features_of([best], block)
            transfer = hinv[:, own] @ np.linalg.inv(hinv[np.ix_(own, own)])
            weights = weights - transfer @ weights[own]
            hinv = hinv - transfer @ hinv[own, :]
            hinv[own, :], hinv[:, own] = 0.0, 0.0
            hinv[own, own] = 1.0  # a placeholder that keeps the removed block invertible, never read
            weights[own] = 0.0
            updated.append((hinv, weights, block))
        state = updated
        alive.remove(best)
        order.append(best)
        total += best_cost
        costs.append(total)
    return np.array(order), np.array(costs)


CASES = {
    "dense": (0, 32, [1]),
    "conv-block-9": (1, 20, [9]),
    "two-consumers": (2, 24, [1, 4]),
}


@pytest.mark.parametrize("fraction", [1 / 16, 0.5])
@pytest.mark.parametrize("case", CASES)
def test_close_to_naive_greedy_and_costs_are_honest(case, fraction):
    seed, channels, blocks = CASES[case]
    terms = random_terms(seed, channels, blocks)
    fast = removal_order(terms, floor=2, batch_fraction=fraction)
    _, naive_costs = naive_order(terms, floor=2)
    assert np.all(np.isfinite(fast.cost)) and len(fast.order) == channels - 2
    assert sorted(fast.order) == sorted(set(fast.order.tolist()))
    assert np.all(np.diff(fast.cost) >= -1e-9 * fast.energy)
    # Within a few percent of the textbook greedy at every width.
    assert np.all(fast.cost <= 1.05 * naive_costs + 1e-9 * fast.energy)
    for width in (channels - 1, channels * 3 // 4, channels // 2, 2):
        removed = np.setdiff1d(np.arange(channels), fast.kept(width))
        true = joint_cost(terms, removed)
        predicted = fast.relative_cost(width) * fast.energy / fast.consumers
        assert predicted == pytest.approx(true, rel=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_one_channel_per_step_is_the_naive_loop(case):
    seed, channels, blocks = CASES[case]
    terms = random_terms(seed, channels, blocks)
    fast = removal_order(terms, floor=1, batch_fraction=0)
    order, costs = naive_order(terms, floor=1)
    np.testing.assert_array_equal(fast.order, order)
    np.testing.assert_allclose(fast.cost, costs, rtol=1e-8, atol=1e-12 * fast.energy)


def test_tiny_problem_default_batching_is_the_naive_loop():
    terms = random_terms(3, 8, [1])
    fast = removal_order(terms)
    order, costs = naive_order(terms)
    np.testing.assert_array_equal(fast.order, order)
    np.testing.assert_allclose(fast.cost, costs, rtol=1e-8)


def test_exact_duplicate_channel_is_nearly_free():
    rng = np.random.default_rng(4)
    channels = 16
    p = correlated_features(rng, 128, channels, 1, duplicates=0)
    p[:, 9] = 2.0 * p[:, 4]
    terms = [make_term(p, rng.standard_normal((channels + 1, 6)), 1)]
    result = removal_order(terms)
    assert result.order[0] in (4, 9)
    assert result.relative_cost(channels - 1) < 1e-3
    assert result.relative_cost(channels - 1) * result.energy == pytest.approx(
        joint_cost(terms, result.order[:1]), rel=1e-6
    )


def test_zero_weight_channel_goes_first_at_no_cost():
    terms = random_terms(5, 12, [1, 9])
    for term in terms:
        term.weights[features_of([7], term.block)] = 0.0
    result = removal_order(terms)
    assert result.order[0] == 7
    assert result.cost[0] == 0.0
    assert result.relative_cost(12) == 0.0


def test_dead_channel_with_zero_hessian_rows_is_finite_and_cheap():
    rng = np.random.default_rng(6)
    channels = 10
    p = correlated_features(rng, 64, channels, 1, duplicates=0)
    p[:, 3] = 0.0
    terms = [make_term(p, rng.standard_normal((channels + 1, 4)), 1)]
    assert np.all(terms[0].hessian[3] == 0.0)
    result = removal_order(terms)
    assert np.all(np.isfinite(result.cost))
    assert result.order[0] == 3
    assert result.relative_cost(channels - 1) < 1e-3


def test_all_zero_hessian_uses_plain_damping():
    weights = np.arange(15, dtype=np.float64).reshape(5, 3)
    result = removal_order([ConsumerTerm(np.zeros((5, 5)), weights, 1)])
    assert result.energy == 0.0
    assert np.all(np.isfinite(result.cost))
    assert result.order[0] == 0  # the smallest weights: cost rho * ||W_c||^2


def test_kept_and_relative_cost():
    terms = random_terms(7, 10, [1])
    result = removal_order(terms, floor=4)
    assert len(result.order) == 6
    np.testing.assert_array_equal(result.kept(10), np.arange(10))
    kept = result.kept(4)
    assert len(kept) == 4 and np.all(np.diff(kept) > 0)
    assert set(kept) | set(result.order.tolist()) == set(range(10))
    assert result.relative_cost(4) == pytest.approx(result.cost[-1] / result.energy)
    with pytest.raises(ValueError):
        result.kept(3)


def test_relative_cost_sums_over_consumers_of_equal_energy():
    """A removal read by T identical consumers costs T times what it costs one of them: the
    relative cost is over the mean consumer's energy, so a coupled group read by every block of
    a residual stream is not ranked as cheap as a layer with one consumer."""
    one = random_terms(11, 10, [1])
    single = removal_order(one, floor=4)
    triple = removal_order(one * 3, floor=4)
    np.testing.assert_array_equal(triple.order, single.order)
    assert triple.energy == pytest.approx(3 * single.energy)
    for width in (9, 7, 4):
        assert single.relative_cost(width) == pytest.approx(single.cost[10 - width - 1] / single.energy)
        assert triple.relative_cost(width) == pytest.approx(3 * single.relative_cost(width), rel=1e-9)


def test_validation():
    good = random_terms(8, 6, [1])[0]
    mismatched = random_terms(9, 7, [1])[0]
    with pytest.raises(ValueError, match="channel count"):
        removal_order([good, mismatched])
    with pytest.raises(ValueError, match="multiple"):
        removal_order([ConsumerTerm(good.hessian, good.weights, 4)])
    with pytest.raises(ValueError, match="rows"):
        removal_order([ConsumerTerm(good.hessian, good.weights[:-1], 1)])
    with pytest.raises(ValueError, match="floor"):
        removal_order([good], floor=0)
    with pytest.raises(ValueError):
        removal_order([])
