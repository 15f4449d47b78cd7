"""Data-aware compensation: refit consumer weights on calibration activations. Pure numpy.

A consumer computes y = P u + b from its input features P (a dense layer's input channels, a
convolution's im2col patches). After a layer is reduced only the kept channels remain; the refit
chooses new weights w for them (and the bias) to reproduce the original pre-activation output:

    min_w  || P_keep w - P_all u ||^2 + rho || w - w0 ||^2

where w0 is the paper's merge (eq. 10-12 / 36-38), the starting point. The normal equations only
need the Gram matrix G = P^T P (with a column of ones for the bias), accumulated batch by batch,
so activations are never held in memory. Because w0 is feasible, the solution is never worse than
w0 on the calibration data (and the caller checks that numerically).
"""

from __future__ import annotations

import numpy as np


class Gram:
    """Running P^T P of feature rows, with a trailing column of ones (for the bias)."""

    def __init__(self, features: int):
        self.matrix = np.zeros((features + 1, features + 1))
        self.rows = 0

    def add(self, rows: np.ndarray) -> None:
        rows = rows.reshape(len(rows), -1).astype(np.float32)
        aug = np.concatenate([rows, np.ones((len(rows), 1), np.float32)], axis=1)
        self.matrix += (aug.T @ aug).astype(np.float64)
        self.rows += len(rows)


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
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]            # [N, C, Ho, Wo, kh, kw]
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


def refit(gram: np.ndarray, keep_cols: np.ndarray, target_cols: np.ndarray, target: np.ndarray,
          start: np.ndarray, ridge: float = 1e-3) -> tuple[np.ndarray, dict]:
    """Least-squares consumer weights for the kept feature columns.

    gram [F+1, F+1]: Gram of the features with the ones column last. The reduced consumer reads
    columns `keep_cols`, the original one read `target_cols` (the same features for a plain merge;
    the features before and after the merge, side by side, for a depthwise block whose kept
    channels change). target [T+1, O]: original weights and bias (last row); start [K+1, O]: the
    paper's merge. Returns the refit [K+1, O] and the calibration errors of start and refit,
    relative to the output energy; falls back to `start` when the solve fails or is not better.
    """
    ones = [len(gram) - 1]
    cols, tcols = np.concatenate([keep_cols, ones]), np.concatenate([target_cols, ones])
    g_kk, g_kt = gram[np.ix_(cols, cols)], gram[np.ix_(cols, tcols)]
    rho = ridge * max(float(np.mean(np.diag(g_kk))), 1e-12)
    try:
        solution = np.linalg.solve(g_kk + rho * np.eye(len(cols)), g_kt @ target + rho * start)
    except np.linalg.LinAlgError:
        solution = start
    energy = _quadratic(target, gram[np.ix_(tcols, tcols)], target)
    def error(w):
        value = _quadratic(w, g_kk, w) - 2 * _quadratic(w, g_kt, target) + energy
        return max(value, 0.0) / max(energy, 1e-300)
    errors = {"paper": error(start), "refit": error(solution) if np.all(np.isfinite(solution)) else np.inf}
    if errors["refit"] > errors["paper"]:
        solution, errors["refit"] = start, errors["paper"]
    return solution, errors


def _quadratic(a: np.ndarray, gram: np.ndarray, b: np.ndarray) -> float:
    """sum over outputs of a_o^T G b_o."""
    return float(np.einsum("io,ij,jo->", a, gram, b))
