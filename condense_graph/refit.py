"""Data-aware compensation: refit consumer weights on calibration activations. Pure numpy.

A consumer computes y = P u + b from its input features P (a dense layer's input channels, a
convolution's im2col patches). After a layer is reduced, the reduced network feeds the consumer
only the kept channels, P'; the refit chooses new weights w for them (and the bias) so that the
consumer reproduces what the ORIGINAL network's consumer outputs, Y, on the same samples:

    min_w  || P' w - Y ||^2 + rho || w - w0 ||^2

where w0 is the paper's merge (eq. 10-12 / 36-38), the starting point. Targeting the original
network's outputs (not the reduced network's) keeps errors from compounding layer after layer.
The normal equations need P'^T P', P'^T Y and ||Y||^2, accumulated batch by batch, so activations
are never held in memory. Because w0 is feasible, the solution is never worse than w0 on the
calibration data (and the caller checks that numerically).
"""

from __future__ import annotations

import numpy as np

CHUNK_VALUES = 2**22  # values of [P 1] folded at once (32 MiB of float64): bounds an im2col batch


def _augmented_products(rows: np.ndarray, other: np.ndarray | None = None):
    """Yield ([P 1]^T [P 1], [P 1]^T other) chunk by chunk, without building [P 1] whole.

    Accumulated in float64: float32 sums over thousands of rows lose the digits that separate an
    exact merge (error ~1e-7) from a refit that moved it (measured: 2.6e-6 on a planted CNN)."""
    chunk = max(64, CHUNK_VALUES // (rows.shape[1] + 1))
    for start in range(0, len(rows), chunk):
        p = rows[start : start + chunk].astype(np.float64)
        aug = np.concatenate([p, np.ones((len(p), 1))], axis=1)
        cross = None if other is None else aug.T @ other[start : start + chunk].astype(np.float64)
        yield aug.T @ aug, cross


class Gram:
    """Running P^T P of feature rows, with a trailing column of ones (for the bias)."""

    def __init__(self, features: int):
        self.matrix = np.zeros((features + 1, features + 1))

    def add(self, rows: np.ndarray) -> None:
        rows = rows.reshape(len(rows), -1)
        for gram, _ in _augmented_products(rows):
            self.matrix += gram


def feature_indices(channels, block: int, features: int) -> np.ndarray:
    """Indices of the features of `channels` (channel c owns c*block .. c*block + block - 1), and
    of the ones column (the last, `features`)."""
    own = (np.asarray(channels)[:, None] * block + np.arange(block)).reshape(-1)
    return np.concatenate([own, [features]])


def channel_rows(values: np.ndarray, channel_axis: int) -> np.ndarray:
    """[..., C at channel_axis, ...] -> [samples * positions, C]."""
    return np.moveaxis(values, channel_axis, -1).reshape(-1, values.shape[channel_axis])


def im2col(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """Patches of a 2-D convolution input [N, C, H, W] -> [N * Ho * Wo, C * kh * kw], ordered
    like a flattened [C, kh, kw] kernel."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    top, left, bottom, right = pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    windows = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, Ho, Wo, kh, kw]
    n, c, ho, wo = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


def activation_cosine(gram: np.ndarray) -> np.ndarray:
    """Cosine similarity of channels' activation vectors from their Gram matrix (no ones column)."""
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    safe = np.where(norms > 0, norms, 1.0)
    return gram / safe[:, None] / safe[None, :]


def projection_factors(gram: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """lambda_k = <a_k, a_main> / <a_main, a_main>: channel k ~ lambda_k * its main channel."""
    factor = np.zeros(len(gram))
    for group in groups:
        main = group[0]
        denom = gram[main, main]
        factor[group] = gram[group, main] / denom if denom > 0 else (group == main).astype(float)
    return factor


class Normal:
    """Normal equations of a refit, accumulated batch by batch:
    A = P^T P, C = P^T Y and E = ||Y||^2, for input rows P (with a ones column) of the reduced
    consumer and the original consumer's outputs Y on the same samples."""

    def __init__(self, features: int, outputs: int):
        self.a = np.zeros((features + 1, features + 1))
        self.c = np.zeros((features + 1, outputs))
        self.e = 0.0

    def add(self, rows: np.ndarray, targets: np.ndarray) -> None:
        rows = rows.reshape(len(rows), -1)
        targets = targets.reshape(len(rows), -1)
        for gram, cross in _augmented_products(rows, targets):
            self.a += gram
            self.c += cross
        self.e += float(np.einsum("ij,ij->", targets, targets, dtype=np.float64))

    def restricted(self, channels: np.ndarray, block: int) -> Normal:
        """The equations over the features of `channels` only (their blocks, and the ones column)."""
        features = len(self.a) - 1
        keep = np.concatenate(
            [(np.asarray(channels)[:, None] * block + np.arange(block)).reshape(-1), [features]]
        )
        normal = Normal(len(keep) - 1, self.c.shape[1])
        normal.a, normal.c, normal.e = self.a[np.ix_(keep, keep)], self.c[keep], self.e
        return normal


def refit(normal: Normal, start: np.ndarray, ridge: float = 1e-3) -> tuple[np.ndarray, dict]:
    """Least-squares weights (last row: bias) of the reduced consumer, reproducing the original
    consumer's outputs:  min ||P w - Y||^2 + rho ||w - w0||^2  with w0 = `start`, the paper's merge.

    Returns the refit and the calibration errors of start and refit, relative to ||Y||^2; falls
    back to `start` when the solve fails or is not better.
    """
    a = normal.a
    rho = ridge * max(float(np.mean(np.diag(a))), 1e-12)
    try:
        solution = np.linalg.solve(a + rho * np.eye(len(a)), normal.c + rho * start)
    except np.linalg.LinAlgError:
        solution = start

    def error(w: np.ndarray) -> float:
        value = float(np.sum(w * (a @ w))) - 2 * float(np.sum(w * normal.c)) + normal.e
        return max(value, 0.0) / max(normal.e, 1e-300)

    errors = {"paper": error(start), "refit": error(solution) if np.all(np.isfinite(solution)) else np.inf}
    if errors["refit"] > errors["paper"]:
        solution, errors["refit"] = start, errors["paper"]
    return solution, errors


class LayerStatistics:
    """What data-aware selectors read about a layer, from one pass over the calibration data:
    `gram` [C, C], the Gram matrix of its channels' activations (`activation_cosine`), and per
    consumer the Gram matrix of the features that consumer reads, with a ones column last
    (`hessians[t]`, the OBS Hessian [F+1, F+1]) and `blocks[t]`, its features per channel (1 for a
    dense consumer, kh*kw for a convolution, H*W after a Flatten). A consumer whose features are
    not gathered (`calibration.MAX_FEATURES`, auto_pad) is seen through the channel Gram instead
    (block 1, its weights folded per channel): `proxy[t]` is True."""

    def __init__(self, gram: np.ndarray, hessians: list, blocks: list[int], proxy: list[bool], normals=None):
        self.gram = gram
        self.hessians = hessians
        self.blocks = blocks
        self.proxy = proxy
        # per consumer (None for a proxy): the refit's normal equations toward the ORIGINAL
        # network's consumer outputs, over every channel, when they were gathered too
        self.normals: list[Normal | None] | None = normals

    def refit_normals(self, keep: np.ndarray) -> list[Normal | None] | None:
        """The refit's normal equations once only the channels `keep` feed the consumers: the
        kept channels' activations are unchanged by a merge of this layer (their producer rows
        are kept as they are), so the equations are those gathered, restricted to their features.
        None when they were not gathered."""
        if self.normals is None:
            return None
        return [
            None if normal is None else normal.restricted(keep, block)
            for normal, block in zip(self.normals, self.blocks, strict=True)
        ]
