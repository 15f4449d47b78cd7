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
    u = rng.normal(size=(6, 4))     # consumer weights, channel-first
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
