import numpy as np

from condense_graph.similarity import cosine_similarity, greedy_groups, widths_at


def test_cosine_matches_definition_and_zero_rows_give_zero_not_nan(rng):
    v = rng.normal(size=(5, 7))
    v[3] = 0.0
    cos = cosine_similarity(v)
    assert not np.isnan(cos).any()
    i, j = 0, 2
    expected = v[i] @ v[j] / np.linalg.norm(v[i]) / np.linalg.norm(v[j])
    assert np.isclose(cos[i, j], expected, rtol=1e-12)
    assert np.all(cos[3, [0, 1, 2, 4]] == 0.0)


def test_greedy_picks_the_neuron_with_most_neighbours_as_main():
    # neuron 1 is close to 0 and 2; 0 and 2 are not close to each other
    cos = np.array(
        [[1.0, 0.95, 0.5, 0.0], [0.95, 1.0, 0.95, 0.0], [0.5, 0.95, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )
    groups = greedy_groups(cos, 0.9)
    assert [g.tolist() for g in groups] == [[1, 0, 2], [3]]


def test_negative_multiples_never_group_even_at_negative_threshold():
    v = np.array([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]])
    assert len(greedy_groups(cosine_similarity(v), -1.0)) == 2


def test_widths_shrink_as_threshold_falls(rng):
    base = rng.normal(size=(3, 10))
    v = np.repeat(base, 4, axis=0) + 0.05 * rng.normal(size=(12, 10))
    widths = widths_at(cosine_similarity(v), [0.5, 0.9, 0.999999])
    assert widths[0.9] == 3
    assert widths[0.999999] == 12
    assert widths[0.5] <= widths[0.9]


def test_round_up_splits_the_least_similar_members(rng):
    from condense_graph.similarity import round_up_groups

    base = rng.normal(size=(3, 12))
    v = np.repeat(base, 5, axis=0) + 0.02 * rng.normal(size=(15, 12))
    cos = cosine_similarity(v)
    groups = greedy_groups(cos, 0.9)
    assert len(groups) == 3
    rounded = round_up_groups(cos, groups, 8)
    assert len(rounded) == 8
    assert sorted(np.concatenate(rounded).tolist()) == list(range(15))  # a partition still
    split = [int(g[0]) for g in rounded[3:]]
    members = [(cos[g[0], k], int(k)) for g in groups for k in g[1:]]
    assert sorted(split) == sorted(k for _, k in sorted(members)[:5])
    assert len(round_up_groups(cos, [np.array([i]) for i in range(15)], 8)) == 15  # nothing to split


def test_the_weight_part_must_agree_too(rng):
    """Small unrelated weights under one large bias: the [w, b] cosine is ~1, the weight cosine is
    not, and neuron_similarity takes the smaller (issue 10, item 3). Zero weight parts agree."""
    from condense_graph.similarity import neuron_similarity, weight_cosine

    v = np.c_[0.01 * rng.normal(size=(3, 9)), np.full(3, 3.0)]
    v = np.r_[v, [[0.0] * 9 + [1.0], [0.0] * 9 + [2.0]]]
    full, weights = cosine_similarity(v), weight_cosine(v)
    assert full[0, 1] > 0.999 and abs(weights[0, 1]) < 0.9
    assert np.array_equal(neuron_similarity(v), np.minimum(full, weights))
    assert weights[3, 4] == 1.0 and weights[0, 3] == 0.0
    assert len(greedy_groups(neuron_similarity(v), 0.999)) == 4  # only the two constants merge


def test_constant_agreement_is_one_minus_the_relative_difference():
    from condense_graph.similarity import constant_agreement

    slopes = np.array([0.2, 0.2, 0.2002, -0.2, 0.0])
    agree = constant_agreement([slopes], 5)
    assert agree[0, 1] == 1.0
    assert np.isclose(agree[0, 2], 1 - 0.0002 / 0.2002)
    assert agree[0, 3] < 0  # opposite signs never group, whatever the threshold
    assert agree[0, 4] == 0.0 and agree[4, 4] == 1.0
    assert len(greedy_groups(agree, -1.0)) == 3
