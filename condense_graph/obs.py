"""Greedy structured Optimal Brain Surgeon (OBS): the order in which to remove a layer's channels.

A layer of n channels feeds consumers t that compute Y_t = [P_t 1] W_t; channel c owns the
`block_t` feature rows c*block_t:(c+1)*block_t of W_t (the last row is the bias). With the damped
inverse Hessian Hinv_t = (H_t + rho_t I)^-1, removing the feature set B and re-fitting the rest by
least squares adds  sum_t trace(W_B^T ([Hinv_t]_BB)^-1 W_B)  squared output error; the re-fit is
W <- W - Hinv[:, B] ([Hinv]_BB)^-1 W_B and Hinv is downdated to the inverse over the kept features.

`removal_order` removes the cheapest channel, updates, and repeats down to `floor` channels, but
several channels per step: the k cheapest candidates are run through exact sequential greedy OBS
on their own small matrices (Hinv and W W^T over the candidates' features), accepted while each
stays no dearer than the cheapest channel outside the batch was, and then removed from the full
matrices with one block (BLAS-3) update that also shrinks them to the kept features. Costs are
exact for the order taken: the cumulative cost after k removals is the joint OBS cost of that set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Candidates per step: this fraction of what is left to remove, at most MAX_BATCH. Larger batches
# mean fewer full-matrix updates but a staler bound (costs outside the batch move as it is removed).
BATCH_FRACTION = 1 / 4
MAX_BATCH = 512
MIN_BATCH = 32
# Below this size the recursive triangular helpers hand over to LAPACK directly.
_RECURSION_BASE = 256


@dataclass
class ConsumerTerm:
    """One consumer of the layer: its Hessian of [P 1], its weights, and features per channel."""

    hessian: np.ndarray  # [F+1, F+1] float64, undamped [P 1]^T [P 1], ones column last
    weights: np.ndarray  # [F+1, outputs]: feature rows, last row bias
    block: int  # features per channel


@dataclass
class RemovalOrder:
    """Channels in removal order with the predicted cumulative added squared output error."""

    order: np.ndarray  # channel indices in the order they are removed (length n - floor)
    cost: np.ndarray  # cost[k]: added squared output error after removing order[:k+1]
    energy: float  # sum_t ||Y_t||^2 = sum_t trace(W_t^T H_t W_t), to make costs relative
    channels: int  # n, the layer's channel count
    consumers: int = 1  # T, the consumer terms the cost sums over

    def _removed_at(self, width: int) -> int:
        """How many channels are removed when `width` stay; ValueError outside what was ordered."""
        removed = self.channels - width
        if not 0 <= removed <= len(self.order):
            floor = self.channels - len(self.order)
            raise ValueError(f"width {width} outside the ordered range [{floor}, {self.channels}]")
        return removed

    def kept(self, width: int) -> np.ndarray:
        """Sorted indices of the channels that stay when the layer is cut to `width`."""
        removed = self.order[: self._removed_at(width)]
        return np.setdiff1d(np.arange(self.channels), removed)

    def relative_cost(self, width: int) -> float:
        """Predicted added squared error at `width` over the mean consumer's output energy,
        energy / T (0 at full width). For one consumer that is its relative squared error; for T
        consumers of equal energy it is the *sum* of their relative errors, so a removal that
        perturbs T consumers (a coupled group's channel, read by every block of a residual
        stream) costs about T times what the same relative error at one consumer costs, and the
        global allocation (`allocate`) compares units by the damage they do, not per consumer."""
        removed = self._removed_at(width)
        if removed == 0 or self.energy <= 0:
            return 0.0
        return float(self.cost[removed - 1] * self.consumers / self.energy)


@dataclass
class _Term:
    """Working state of one consumer: damped inverse Hessian and weights over the kept features."""

    hinv: np.ndarray  # [f+1, f+1], last row/column the bias
    weights: np.ndarray  # [f+1, outputs]
    block: int


def removal_order(
    terms: list[ConsumerTerm],
    floor: int = 1,
    damping: float = 1e-3,
    progress: Callable[[int], object] | None = None,
    *,
    batch_fraction: float = BATCH_FRACTION,
    max_batch: int = MAX_BATCH,
) -> RemovalOrder:
    """Greedy structured OBS down to `floor` channels.

    `progress`, when given, is called with the number of channels each step removed (an object with
    an `advance` method, such as `condense_graph.progress.Progress`, is called through it).
    `batch_fraction=0` (or `max_batch=1`) removes one channel per step: the textbook greedy loop.
    """
    channels = _validate(terms, floor)
    advance = getattr(progress, "advance", progress)
    energy = float(sum(_output_energy(t) for t in terms))
    state = [_initial_state(t, damping) for t in terms]
    alive = np.arange(channels)
    order: list[np.ndarray] = []
    costs: list[np.ndarray] = []
    total = 0.0
    while len(alive) > floor:
        channel_costs = sum(_channel_costs(t) for t in state)
        batch_size = _batch_size(len(alive) - floor, batch_fraction, max_batch)
        ranked = np.argsort(channel_costs, kind="stable")
        accepted, step_costs = _greedy_in_batch(state, ranked[:batch_size], channel_costs[ranked[batch_size]])
        for term in state:
            _remove_features(term, accepted)
        order.append(alive[accepted])
        costs.append(total + np.cumsum(step_costs))
        total = float(costs[-1][-1])
        alive = np.delete(alive, accepted)
        if advance is not None:
            advance(len(accepted))
    return RemovalOrder(
        order=np.concatenate(order) if order else np.zeros(0, dtype=np.int64),
        cost=np.concatenate(costs) if costs else np.zeros(0),
        energy=energy,
        channels=channels,
        consumers=len(terms),
    )


def _validate(terms: list[ConsumerTerm], floor: int) -> int:
    """The shared channel count n; ValueError when shapes disagree or `floor` is out of range."""
    if not terms:
        raise ValueError("removal_order needs at least one consumer term")
    counts = set()
    for i, term in enumerate(terms):
        features = term.hessian.shape[0] - 1
        if term.block < 1 or term.hessian.ndim != 2 or term.hessian.shape != (features + 1, features + 1):
            raise ValueError(f"term {i}: hessian must be square [F+1, F+1] and block >= 1")
        if term.weights.ndim != 2 or term.weights.shape[0] != features + 1:
            raise ValueError(f"term {i}: weights have {term.weights.shape[0]} rows, hessian {features + 1}")
        if features % term.block:
            raise ValueError(f"term {i}: {features} features are not a multiple of block {term.block}")
        counts.add(features // term.block)
    if len(counts) != 1:
        raise ValueError(f"consumer terms disagree on the channel count: {sorted(counts)}")
    channels = counts.pop()
    if not 1 <= floor <= max(channels, 1):
        raise ValueError(f"floor {floor} must be in [1, {channels}]")
    return channels


def _batch_size(remaining: int, fraction: float, cap: int) -> int:
    """Candidates to consider this step: a fraction of what is left to remove, at least one.

    Near the end a fraction would mean many one-channel steps, each a full-matrix update, so the
    batch is at least MIN_BATCH (what is left, when less) while batching is on.
    """
    size = max(1, min(cap, math.ceil(remaining * fraction)))
    if fraction > 0 and cap > 1:
        size = max(size, min(MIN_BATCH, cap))
    return min(size, remaining)


def _output_energy(term: ConsumerTerm) -> float:
    """trace(W^T H W) = ||Y||^2, through the smaller of W W^T and H W."""
    weights = np.asarray(term.weights, dtype=np.float64)
    hessian = np.asarray(term.hessian, dtype=np.float64)
    if weights.shape[1] < weights.shape[0]:
        return float(np.sum(hessian * (weights @ weights.T)))
    return float(np.sum(weights * (hessian @ weights)))


def _damping(hessian: np.ndarray, damping: float) -> float:
    """rho = damping * mean(diag(H)); a positive floor when H is all zero so Hd stays invertible."""
    mean_diag = float(np.mean(np.diag(hessian)))
    rho = damping * mean_diag if mean_diag > 0 and np.isfinite(mean_diag) else damping
    return max(rho, 1e-12)


def _initial_state(term: ConsumerTerm, damping: float) -> _Term:
    hessian = np.array(term.hessian, dtype=np.float64)
    hessian[np.diag_indices_from(hessian)] += _damping(hessian, damping)
    return _Term(_spd_inverse(hessian), np.array(term.weights, dtype=np.float64), term.block)


def _spd_inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix via Cholesky (about 3x cheaper than LU inv)."""
    try:
        lower = np.linalg.cholesky(matrix)
    except np.linalg.LinAlgError:
        # Rounding made the damped Hessian indefinite: invert its clipped eigen-decomposition.
        values, vectors = np.linalg.eigh(matrix)
        floor = max(float(values.max()), 1.0) * 1e-12
        return (vectors / np.maximum(values, floor)) @ vectors.T
    return _lower_gram(_lower_inverse(lower))


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by 2x2 block recursion (numpy has no trtri)."""
    size = lower.shape[0]
    if size <= _RECURSION_BASE:
        return np.tril(np.linalg.inv(lower))
    half = size // 2
    top, bottom = _lower_inverse(lower[:half, :half]), _lower_inverse(lower[half:, half:])
    # empty + zeroing one quarter: a zeros_like of this size spent its time in page faults.
    result = np.empty_like(lower)
    result[:half, half:] = 0.0
    result[:half, :half] = top
    result[half:, half:] = bottom
    result[half:, :half] = -(bottom @ (lower[half:, :half] @ top))
    return result


def _lower_gram(lower: np.ndarray) -> np.ndarray:
    """L^T L for lower-triangular L by block recursion, skipping the zero upper triangle."""
    size = lower.shape[0]
    if size <= _RECURSION_BASE:
        return lower.T @ lower
    half = size // 2
    corner = lower[half:, :half]
    result = np.empty_like(lower)
    result[:half, :half] = _lower_gram(lower[:half, :half]) + corner.T @ corner
    result[half:, :half] = lower[half:, half:].T @ corner
    result[:half, half:] = result[half:, :half].T
    result[half:, half:] = _lower_gram(lower[half:, half:])
    return result


def _block_features(positions: np.ndarray, block: int) -> np.ndarray:
    """Feature rows owned by the channels at `positions` (in that order)."""
    return (np.asarray(positions)[:, None] * block + np.arange(block)).ravel()


def _diagonal_blocks(matrix: np.ndarray, block: int) -> np.ndarray:
    """The [m, block, block] diagonal blocks of an [m*block, m*block] matrix."""
    count = matrix.shape[0] // block
    blocks = matrix.reshape(count, block, count, block)
    index = np.arange(count)
    return blocks[index, :, index, :]


def _block_costs(hinv_blocks: np.ndarray, gram_blocks: np.ndarray) -> np.ndarray:
    """trace(inv(Hinv_BB) W_B W_B^T) for stacked [m, b, b] blocks."""
    if hinv_blocks.shape[1] == 1:
        return gram_blocks[:, 0, 0] / hinv_blocks[:, 0, 0]
    return np.einsum("mii->m", np.linalg.solve(hinv_blocks, gram_blocks))


def _channel_costs(term: _Term) -> np.ndarray:
    """Removal cost of every kept channel of one consumer in the current state."""
    features = term.hinv.shape[0] - 1
    weights = term.weights[:features]
    if term.block == 1:
        return np.einsum("ij,ij->i", weights, weights) / np.diag(term.hinv)[:features]
    blocks = weights.reshape(features // term.block, term.block, -1)
    gram = np.einsum("mbo,mco->mbc", blocks, blocks)
    return _block_costs(_diagonal_blocks(term.hinv[:features, :features], term.block), gram)


def _greedy_in_batch(
    state: list[_Term], candidates: np.ndarray, bound: float
) -> tuple[np.ndarray, np.ndarray]:
    """Exact sequential greedy OBS among `candidates` while each pick costs at most `bound`.

    Works on the candidates' own Hinv block A and weight Gram G = W_S W_S^T per consumer (see
    `_Batch`), never touching the outputs dimension. The first pick is always accepted. Returns the
    accepted candidates' positions in removal order and each one's added cost.
    """
    batches = [_Batch(term, candidates) for term in state]
    waiting = np.ones(len(candidates), dtype=bool)
    accepted, step_costs = [], []
    while waiting.any():
        members = np.flatnonzero(waiting)
        member_costs = sum(batch.costs(members) for batch in batches)
        pick = int(np.argmin(member_costs))
        if accepted and member_costs[pick] > bound:
            break
        member = members[pick]
        accepted.append(member)
        step_costs.append(float(member_costs[pick]))
        waiting[member] = False
        for batch in batches:
            batch.remove(member)
    return candidates[np.array(accepted)], np.array(step_costs)


class _Batch:
    """One consumer's small matrices over a batch of candidates, downdated lazily.

    Removing member c (columns B) maps W_S to T W_S with T = I - V E_B^T, V = A[:, B] A_BB^-1, so
    A -= A[:, B] A_BB^-1 A[B, :] = a a^T (a = A[:, B] L^-T, A_BB = L L^T) and G = W_S W_S^T becomes
    T G T^T = G - V h^T - h V^T with h = G[:, B] - V G_BB / 2. The rank-b factors are stored instead
    of applied: a removal reads only its own columns and the diagonal blocks (the costs), so a batch
    of k channels costs O(k^3 b^3) in matrix-vector products rather than k full rank updates.
    """

    def __init__(self, term: _Term, candidates: np.ndarray):
        rows = _block_features(candidates, term.block)
        weights = term.weights[rows]
        self.block = term.block
        self.hinv = term.hinv[np.ix_(rows, rows)]
        self.gram = weights @ weights.T
        self.hinv_blocks = _diagonal_blocks(self.hinv, self.block).copy()
        self.gram_blocks = _diagonal_blocks(self.gram, self.block).copy()
        # Row r of each factor matrix is one rank-1 term; `used` rows are filled.
        self.hinv_factors = np.empty_like(self.hinv)
        self.gram_left = np.empty_like(self.gram)
        self.gram_right = np.empty_like(self.gram)
        self.used = 0

    def costs(self, members: np.ndarray) -> np.ndarray:
        """Current removal cost of the given (waiting) members."""
        return _block_costs(self.hinv_blocks[members], self.gram_blocks[members])

    def remove(self, member: int) -> None:
        own, used, block = slice(member * self.block, (member + 1) * self.block), self.used, self.block
        hinv_factors, left, right = self.hinv_factors[:used], self.gram_left[:used], self.gram_right[:used]
        hinv_columns = self.hinv[:, own] - hinv_factors.T @ hinv_factors[:, own]
        gram_columns = self.gram[:, own] - left.T @ right[:, own] - right.T @ left[:, own]
        own_hinv, own_gram = hinv_columns[own], gram_columns[own]
        factor = _cholesky_or_eigen(own_hinv)
        scaled = np.linalg.solve(factor, hinv_columns.T)  # (A[:, B] L^-T)^T
        transfer = np.linalg.solve(own_hinv, hinv_columns.T)  # V^T
        half = gram_columns.T - 0.5 * own_gram @ transfer  # h^T
        self.hinv_factors[used : used + block] = scaled
        self.gram_left[used : used + block] = transfer
        self.gram_right[used : used + block] = half
        self.used += block
        count = len(self.hinv_blocks)
        scaled_blocks = scaled.T.reshape(count, block, block)
        transfer_blocks = transfer.T.reshape(count, block, block)
        half_blocks = half.T.reshape(count, block, block)
        self.hinv_blocks -= scaled_blocks @ scaled_blocks.transpose(0, 2, 1)
        spread = transfer_blocks @ half_blocks.transpose(0, 2, 1)
        self.gram_blocks -= spread + spread.transpose(0, 2, 1)


def _remove_features(term: _Term, positions: np.ndarray) -> None:
    """Jointly remove the channels at `positions` from the full matrices and shrink them.

    With Hinv_RR = L L^T and Z = Hinv_KR L^-T: Hinv_KK -= Z Z^T and W_K -= Z L^-1 W_R, the block
    form of removing them one by one.
    """
    size = term.hinv.shape[0]
    removed = _block_features(positions, term.block)
    kept = np.setdiff1d(np.arange(size), removed)
    factor_inverse = _lower_inverse(_cholesky_or_eigen(term.hinv[np.ix_(removed, removed)]))
    spread = term.hinv[np.ix_(kept, removed)] @ factor_inverse.T
    hinv = term.hinv[np.ix_(kept, kept)]
    # A copy keeps numpy off syrk, which ran 2-3x slower than gemm for this thin product on one core.
    hinv -= spread @ spread.T.copy()
    weights = term.weights[kept]
    weights -= spread @ (factor_inverse @ term.weights[removed])
    term.hinv, term.weights = hinv, weights


def _cholesky_or_eigen(matrix: np.ndarray) -> np.ndarray:
    """A lower-triangular L with L L^T = matrix, adding a growing jitter if rounding made it indefinite."""
    scale = max(float(np.mean(np.diag(matrix))), 1e-300)
    for exponent in (None, -14, -12, -10, -8):
        try:
            if exponent is None:
                return np.linalg.cholesky(matrix)
            return np.linalg.cholesky(matrix + np.eye(len(matrix)) * scale * 10.0**exponent)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("inverse-Hessian block is not positive definite")
