"""Refit the consumers of a reduced layer on calibration data (ThiNet-style compensation).

After `plan.apply_map` has merged a layer by the paper's formula, each consumer's weights for the
kept channels and its bias are refit by least squares (`condense_graph.refit.refit`) to reproduce
the consumer's original pre-activation output, with the paper's merge as the ridge target and the
fallback. Works on the consumer's input features: dense inputs (block-wise after a Flatten) and
im2col patches of a convolution.
"""

from __future__ import annotations

import numpy as np

from condense_graph.analysis import Consumer, Layer
from condense_graph.refit import refit


def weight_rows(consumer: Consumer, weight: np.ndarray) -> np.ndarray:
    """Consumer weights as [features, outputs], features ordered like the consumer's input rows."""
    if consumer.node.op == "Conv":  # [O, C, kh, kw] -> [(C, kh, kw), O], the im2col order
        return weight.transpose(1, 2, 3, 0).reshape(-1, weight.shape[0])
    return np.moveaxis(weight, consumer.axis, 0).reshape(weight.shape[consumer.axis], -1)


def from_weight_rows(consumer: Consumer, rows: np.ndarray, like: np.ndarray) -> np.ndarray:
    if consumer.node.op == "Conv":
        out, _, kh, kw = like.shape
        return rows.reshape(-1, kh, kw, out).transpose(3, 0, 1, 2)
    return np.moveaxis(rows.reshape((-1,) + np.moveaxis(like, consumer.axis, 0).shape[1:]), 0, consumer.axis)


def refit_consumer(consumer: Consumer, normal, store) -> dict:
    """Replace the consumer's merged weights and bias in `store` by the least-squares refit."""
    merged = store[consumer.weight.name]
    rows = weight_rows(consumer, merged)
    bias = store.bias(consumer.bias, rows.shape[1])
    start = np.vstack([consumer.scale * rows, consumer.bias_scale * bias.reshape(1, -1)])
    solution, errors = refit(normal, start)
    store.set(
        consumer.weight.name,
        from_weight_rows(consumer, solution[:-1] / consumer.scale, merged).astype(merged.dtype),
    )
    store.set_bias(consumer.bias, consumer.node, solution[-1] / consumer.bias_scale, merged.dtype)
    return errors


def compensate(layer: Layer, store, normals: list) -> list[dict]:
    """Refit every consumer that has normal equations; report the calibration errors."""
    return [refit_entry(c, normal, store) for c, normal in zip(layer.consumers, normals, strict=True)]


def refit_entry(consumer: Consumer, normal, store) -> dict:
    """Refit `consumer` when it has normal equations (`normal` not None); its report entry."""
    if normal is None:
        return {"consumer": consumer.node.name, "refit": False}
    errors = refit_consumer(consumer, normal, store)
    return {
        "consumer": consumer.node.name,
        "refit": True,
        "calibration_err_paper": errors["paper"],
        "calibration_err_refit": errors["refit"],
    }
