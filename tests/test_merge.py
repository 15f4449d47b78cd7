"""The merge math alone, on numpy arrays: eq. 10-12 are exact for positive multiples + ReLU."""

import numpy as np

from condense_graph.merge import channel_map, merge_consumer
from condense_graph.similarity import cosine_similarity, greedy_groups


def relu(x):
    return np.maximum(x, 0.0)


def test_merging_positive_multiples_is_exact_through_relu(rng):
    base = rng.normal(size=(3, 6))
    lam = np.array([1.0, 0.3, 7.0, 1.0, 2.5, 1.0])
    which = np.array([0, 0, 0, 1, 1, 2])
    v = base[which] * lam[:, None]  # rows: weights | bias
    u = rng.normal(size=(6, 4))  # consumer weights, channel-first
    groups = greedy_groups(cosine_similarity(v), 0.9999)
    ones, zeros = np.ones(6), np.zeros(6)
    cmap = channel_map(v, groups, ones, zeros, {})
    merged_u, bias_delta = merge_consumer(u, cmap)
    x = np.c_[rng.normal(size=(50, 5)), np.ones(50)]
    expected = relu(x @ v.T) @ u
    actual = relu(x @ v[cmap.keep].T) @ merged_u + bias_delta
    assert cmap.width_after == 3
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)


def test_post_affine_and_constant_channels_fold_into_bias(rng):
    v = rng.normal(size=(4, 3))
    v[1] = 2.0 * v[0]
    v[3, :-1] = 0.0  # constant channel: output a*relu(bias)+c
    a, c = rng.uniform(0.5, 2.0, 4), rng.normal(size=4)
    const = {3: a[3] * relu(v[3, -1]) + c[3]}
    groups = greedy_groups(cosine_similarity(v[:3]), 0.9999)
    cmap = channel_map(v, groups, a, c, const)
    u = rng.normal(size=(4, 2))
    merged_u, bias_delta = merge_consumer(u, cmap)
    x = np.c_[rng.normal(size=(20, 2)), np.ones(20)]
    expected = (a * relu(x @ v.T) + c) @ u
    kept = cmap.keep
    actual = (a[kept] * relu(x @ v[kept].T) + c[kept]) @ merged_u + bias_delta
    assert cmap.width_after == 2
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)


def test_a_zero_main_neuron_maps_onto_itself_and_nothing_is_ever_non_finite(rng):
    """A zero vector is alone in its group: factor 1, not 0/0 (issue 10, item 2)."""
    v = rng.normal(size=(4, 3))
    v[2] = 0.0
    v[3] = 2.0 * v[0]
    groups = greedy_groups(cosine_similarity(v), 0.9999)
    cmap = channel_map(v, groups, np.ones(4), np.zeros(4), {})
    assert cmap.width_after == 3 and np.all(np.isfinite(cmap.factor)) and cmap.factor[2] == 1.0
    np.testing.assert_allclose(cmap.factor[3], 2.0, rtol=1e-12)


def test_a_non_finite_factor_is_an_internal_error(rng):
    import pytest

    from condense_graph.errors import InternalError

    v = rng.normal(size=(2, 3))
    with pytest.raises(InternalError, match="non-finite"):
        channel_map(v, [np.array([0, 1])], np.ones(2), np.zeros(2), {}, factors=np.array([1.0, np.nan]))
