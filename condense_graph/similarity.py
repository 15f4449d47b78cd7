"""Cosine similarity of neurons and the paper's greedy grouping (section 2.2.3). Pure numpy.

A neuron is the vector of its incoming weights with the bias appended (eq. 3-4), so two neurons
are condensed when they compute the same pre-activation up to a positive factor. The [w, b] cosine
alone can be dominated by the bias (small kernels, large biases: kernels with cosine 0 look
parallel), so grouping also asks the weight part to agree (`neuron_similarity`), and per-channel
constants of the nonlinearity (PRelu slopes...) to agree within 1 - threshold (`constant_agreement`).
"""

from __future__ import annotations

import numpy as np

# Cosines come from a float32 Gram matrix, good to about 1e-7. A threshold counts as met within
# this tolerance, so threshold 1.0 means "parallel to float32 rounding": exact multiples merge.
COSINE_TOLERANCE = 1e-6


def cosine_similarity(vectors: np.ndarray) -> np.ndarray:
    """C = D A D with A = V V^T and D = diag(1/sqrt(a_ii)) (eq. 8-9).

    Zero vectors get cosine 0 with everything (not NaN), so they are never grouped.
    Computed in the dtype of `vectors`: float32 keeps the paper's 3200-wide layer fast.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))
    safe = np.where(norms > 0, norms, 1.0).astype(vectors.dtype)
    unit = vectors / safe[:, None]
    return unit @ unit.T


def weight_cosine(vectors: np.ndarray) -> np.ndarray:
    """Cosine of the weight parts (all but the last column, the bias). Two all-zero weight parts
    count as parallel: such neurons are constants, and only their biases (the full cosine) decide."""
    weights = vectors[:, :-1]
    cosine = cosine_similarity(weights)
    zero = ~np.any(weights != 0, axis=1)
    cosine[np.ix_(zero, zero)] = 1.0
    return cosine


def neuron_similarity(vectors: np.ndarray) -> np.ndarray:
    """min(cosine of [w, b], cosine of w): both must meet the threshold for two neurons to group,
    so a bias much larger than the weights cannot make unrelated kernels look parallel."""
    return np.minimum(cosine_similarity(vectors), weight_cosine(vectors))


def constant_agreement(constants: list[np.ndarray], width: int) -> np.ndarray:
    """[width, width]: 1 - the largest relative difference |c_i - c_j| / max(|c_i|, |c_j|) over the
    per-channel constants `constants` (each [width]). Opposite signs give less than 0, so such
    channels never group; equal constants give 1. Used as a similarity alongside the cosine: at
    threshold t, channels group only when their constants differ by at most 1 - t (relatively)."""
    agreement = np.ones((width, width))
    for values in constants:
        c = np.asarray(values, dtype=np.float64).reshape(width)
        scale = np.maximum(np.abs(c)[:, None], np.abs(c)[None, :])
        diff = np.abs(c[:, None] - c[None, :])
        relative = np.divide(diff, scale, out=np.zeros_like(diff), where=scale > 0)
        agreement = np.minimum(agreement, 1.0 - relative)
    return agreement


def greedy_groups(cosine: np.ndarray, threshold: float) -> list[np.ndarray]:
    """Group neurons as section 2.2.3 does.

    Repeatedly take the ungrouped neuron with the most ungrouped neighbours (cosine >= threshold)
    as a group's main neuron; the group is the main neuron and those neighbours. Each returned
    array lists the main neuron first. Negative cosines never join a group, whatever the threshold,
    because merging v and -v is never exact for a nonlinear layer.
    """
    width = cosine.shape[0]
    near = (cosine >= threshold - COSINE_TOLERANCE) & (cosine > 0)
    np.fill_diagonal(near, True)
    counts = near.sum(axis=1).astype(np.int64)
    ungrouped = np.ones(width, dtype=bool)
    groups = []
    for _ in range(width):  # one iteration per group, never per pair
        if not ungrouped.any():
            break
        main = int(np.argmax(np.where(ungrouped, counts, -1)))
        members = np.flatnonzero(near[main] & ungrouped)
        others = members[members != main]
        groups.append(np.concatenate(([main], others)))
        ungrouped[members] = False
        counts -= near[:, members].sum(axis=1)
    return groups


def widths_at(cosine: np.ndarray, thresholds) -> dict[float, int]:
    """Number of groups (the reduced width) at each threshold."""
    return {float(t): len(greedy_groups(cosine, t)) for t in thresholds}


def round_up_groups(cosine: np.ndarray, groups: list[np.ndarray], multiple: int) -> list[np.ndarray]:
    """Split off the least similar merged neurons until the number of groups (the new width) is a
    multiple of `multiple`, or nothing is merged any more. Runtimes such as ONNX Runtime's GEMM
    kernels are fastest on widths that are multiples of 8 or 16; splitting only lowers the error."""
    return split_to_width(cosine, groups, len(groups) + (-len(groups) % multiple))


def split_to_width(cosine: np.ndarray, groups: list[np.ndarray], width: int) -> list[np.ndarray]:
    """Split off the least similar merged neurons until there are `width` groups (or no merges)."""
    needed = width - len(groups)
    if needed <= 0:
        return groups
    members = [(float(cosine[g[0], k]), gi, int(k)) for gi, g in enumerate(groups) for k in g[1:]]
    split = {(gi, k) for _, gi, k in sorted(members)[:needed]}
    kept = [np.array([k for k in g if (gi, int(k)) not in split]) for gi, g in enumerate(groups)]
    return kept + [np.array([k]) for _, k in sorted(split)]


def groups_for_width(cosine: np.ndarray, width: int, steps: int = 24) -> tuple[list[np.ndarray], float]:
    """Groups landing on exactly `width` (when merging allows), and the threshold that gave them.

    Bisection finds the highest threshold whose greedy grouping has at most `width` groups; the
    least similar merges are then split off to land on the width exactly."""
    if width >= len(cosine):
        return [np.array([k]) for k in range(len(cosine))], 1.0
    low, high = -1.0, 1.0 + 2 * COSINE_TOLERANCE
    best = greedy_groups(cosine, low)
    for _ in range(steps):
        mid = (low + high) / 2
        groups = greedy_groups(cosine, mid)
        if len(groups) <= width:
            low, best = mid, groups
            if len(groups) == width:
                break
        else:
            high = mid
    return split_to_width(cosine, best, width), low
