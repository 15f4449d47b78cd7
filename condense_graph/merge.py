"""Merge math: which channels survive and how consumers absorb the others. Pure numpy.

Each channel k of a layer computes  o_k = a_k * g_k(z_k) + c_k  with pre-activation
z_k = v_k . [x, 1], where v_k holds the neuron's weights and bias with any per-channel affine op
right after the producer folded in (eq. 3), g_k is the nonlinear part and (a_k, c_k) is a
per-channel affine op right before the consumer (both 1 and 0 in the plain case).

Merging neuron k into its group's main neuron m (eq. 10-12):
  lambda_k = ||v_k|| / ||v_m||,  f_k = a_k * lambda_k / a_m,
  u_m <- sum_k f_k u_k   (u_k: the consumer weights that read channel k),
  consumer bias += sum_k u_k (c_k - f_k c_m).
With v_k = lambda_k v_m (lambda_k > 0) and g positively homogeneous and equal across the group,
o_k = f_k (o_m - c_m) + c_k exactly (eq. 7), so the consumer computes the same thing.

Dead channels are removed exactly: a channel with zero incoming weights outputs a constant o_k,
folded into the consumer bias as u_k o_k; a channel whose consumer weights are all zero is dropped.
Every factor and offset is finite (a zero main neuron maps onto itself with factor 1); anything
else raises `InternalError` rather than writing NaN into a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from condense_graph.errors import InternalError


@dataclass
class ChannelMap:
    """How the old channels of one layer map onto the new ones."""

    keep: np.ndarray  # old index of each new channel, in order
    target: np.ndarray  # new index of each old channel, or -1 when it is removed
    factor: np.ndarray  # f_k: weight of old channel k's consumer weights in its target
    offset: np.ndarray  # constant that old channel k adds (times u_k) to the consumer bias

    @property
    def width_before(self) -> int:
        return len(self.target)

    @property
    def width_after(self) -> int:
        return len(self.keep)


def channel_map(
    vectors: np.ndarray,
    groups: list[np.ndarray],
    post_scale: np.ndarray,
    post_shift: np.ndarray,
    constant_outputs: dict[int, float],
    factors: np.ndarray | None = None,
) -> ChannelMap:
    """Build the map for `groups` (main neuron first) of the rows of `vectors`.

    Channels in no group are removed; those in `constant_outputs` fold their constant into the
    consumer bias, the others (zero consumer weights) just disappear. `factors` replaces the
    norm ratio lambda_k of eq. 10 when the caller knows better (activation projections).
    """
    width = len(vectors)
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    mains = np.array(sorted(int(g[0]) for g in groups), dtype=np.int64)
    target = np.full(width, -1, dtype=np.int64)
    factor = np.zeros(width)
    offset = np.zeros(width)
    new_index = {old: new for new, old in enumerate(mains)}
    for group in groups:  # one iteration per group; the work inside is vectorized
        main, members = int(group[0]), np.asarray(group, dtype=np.int64)
        lam = norm_ratios(norms, members, main) if factors is None else factors[members]  # eq. 10
        # a main neuron maps onto itself (f = 1), also when its post scale is 0 (then it is alone)
        f = post_scale[members] * lam / post_scale[main] if post_scale[main] != 0 else np.ones(len(members))
        target[members] = new_index[main]
        factor[members] = f
        offset[members] = post_shift[members] - f * post_shift[main]
    for k, value in constant_outputs.items():
        offset[k] = value
    return checked(ChannelMap(keep=mains, target=target, factor=factor, offset=offset))


def norm_ratios(norms: np.ndarray, members: np.ndarray, main: int) -> np.ndarray:
    """lambda_k = ||v_k|| / ||v_main|| (eq. 10). A zero main neuron is alone in its group (its cosine
    with every other neuron is 0): it maps onto itself with factor 1, never 0/0."""
    if norms[main] > 0:
        return norms[members] / norms[main]
    return (members == main).astype(np.float64)


def checked(cmap: ChannelMap) -> ChannelMap:
    """A non-finite factor or offset would write NaN/inf into the consumers: that is our bug."""
    if not (np.all(np.isfinite(cmap.factor)) and np.all(np.isfinite(cmap.offset))):
        bad = np.flatnonzero(~np.isfinite(cmap.factor) | ~np.isfinite(cmap.offset))
        raise InternalError(f"non-finite merge factor or offset for channel(s) {bad.tolist()}")
    return cmap


def merge_consumer(weights: np.ndarray, cmap: ChannelMap) -> tuple[np.ndarray, np.ndarray]:
    """Apply the map to consumer weights laid out channel-first, [width, ...].

    Returns the new weights [width_after, ...] (eq. 10-12) and the bias change, the sum over
    channels of offset_k * u_k, with the shape of one channel's weights.
    """
    flat = weights.reshape(len(weights), -1).astype(np.float64)
    rows = np.flatnonzero(cmap.target >= 0)
    rows = rows[np.argsort(cmap.target[rows], kind="stable")]
    targets = cmap.target[rows]
    starts = np.flatnonzero(np.r_[True, targets[1:] != targets[:-1]])
    merged = np.add.reduceat(cmap.factor[rows, None] * flat[rows], starts, axis=0)
    bias_delta = cmap.offset @ flat
    new_shape = (cmap.width_after,) + weights.shape[1:]
    return merged.reshape(new_shape).astype(weights.dtype), bias_delta.reshape(weights.shape[1:])


def least_squares_rows(alpha: np.ndarray, outgoing: np.ndarray, cmap: ChannelMap) -> np.ndarray:
    """Merged input rows of a depthwise block (paper A.3, eq. 47-48 and 61-63).

    Channel k of the block is  b_k * dw(v_k, g(alpha_k . x)); merging the group into its main
    neuron with depthwise kernels v_k = lambda_k v_main asks, for every consumer output j,
        B_j alpha_new = sum_k lambda_k b_kj alpha_k,   B_j = sum_k lambda_k b_kj,
    an overdetermined system in alpha_new. Its least-squares solution is
        alpha_new = sum_k c_k alpha_k,   c_k = (w_k . B) / (B . B),  w_k = lambda_k b_k.
    `alpha` [width, d]: the (BN-folded) rows feeding the depthwise conv; `outgoing` [width, J]:
    the consumer weights of each channel. Returns the rows of the kept channels [width_after, d].
    """
    merged = alpha[cmap.keep].astype(np.float64)
    for new in range(len(cmap.keep)):
        members = np.flatnonzero(cmap.target == new)
        if len(members) < 2:
            continue
        w = cmap.factor[members, None] * outgoing[members]
        total = w.sum(axis=0)
        denom = total @ total
        if denom > 0:  # all consumer weights zero: any row will do, keep the main one
            merged[new] = ((w @ total) / denom) @ alpha[members]
    return merged
