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
from condense_graph.merge import ChannelMap
from condense_graph.refit import refit


def kept_columns(cmap: ChannelMap, block: int) -> np.ndarray:
    """Feature columns of the kept channels, each channel owning `block` consecutive features."""
    return (cmap.keep[:, None] * block + np.arange(block)[None, :]).reshape(-1)


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


def refit_consumer(consumer: Consumer, gram: np.ndarray, original_weight: np.ndarray,
                   original_bias: np.ndarray, store, columns: tuple[np.ndarray, np.ndarray]) -> dict:
    """Replace the consumer's merged weights and bias in `store` by the least-squares refit;
    `columns` = (kept feature columns, original feature columns) of the Gram matrix."""
    outputs = original_bias.size
    target = np.vstack([consumer.scale * weight_rows(consumer, original_weight),
                        consumer.bias_scale * original_bias.reshape(1, outputs)])
    merged = store[consumer.weight.name]
    bias = store.get(consumer.bias)
    bias = np.zeros(outputs) if bias is None else np.broadcast_to(bias.reshape(-1), (outputs,))
    start = np.vstack([consumer.scale * weight_rows(consumer, merged),
                       consumer.bias_scale * bias.reshape(1, outputs)])
    solution, errors = refit(gram, columns[0], columns[1], target, start)
    store.set(consumer.weight.name,
              from_weight_rows(consumer, solution[:-1] / consumer.scale, merged).astype(merged.dtype))
    new_bias = solution[-1] / consumer.bias_scale
    if store.get(consumer.bias) is None:
        if not np.any(new_bias):
            return errors
        store.created[consumer.bias] = consumer.node
    store.set(consumer.bias, new_bias.astype(merged.dtype))
    return errors


def consumer_bias(consumer: Consumer, store, outputs: int) -> np.ndarray:
    bias = store.get(consumer.bias)
    return np.zeros(outputs) if bias is None else np.broadcast_to(bias.reshape(-1), (outputs,)).astype(np.float64)


def feature_block(consumer: Consumer, layer: Layer) -> int:
    """Input features per channel: H*W after a Flatten, kh*kw for a convolution's patches."""
    if consumer.node.op == "Conv":
        return int(np.prod(consumer.weight.values.shape[2:]))
    return layer.block


def snapshot(layer: Layer, store) -> dict:
    """Consumer weights and biases before the merge: the refit's target."""
    originals = {}
    for consumer in layer.consumers:
        weight = store[consumer.weight.name].copy()
        outputs = weight_rows(consumer, weight).shape[1]
        originals[consumer.node.name] = (weight, consumer_bias(consumer, store, outputs))
    return originals


def compensate(layer: Layer, store, stats, cmap: ChannelMap, originals: dict) -> list[dict]:
    """Refit every consumer that has a Gram matrix; `originals` holds weights/biases before merging.

    With `stats.changed_channels` (a depthwise block, whose kept channels change when merged) the
    Gram matrix holds the features after the merge, then those before it."""
    results = []
    for consumer, gram in zip(layer.consumers, stats.consumer_grams):
        if gram is None:
            results.append({"consumer": consumer.node.name, "refit": False})
            continue
        weight, bias = originals[consumer.node.name]
        block = feature_block(consumer, layer)
        if stats.changed_channels:
            after = cmap.width_after * block
            columns = (np.arange(after), after + np.arange(cmap.width_before * block))
        else:
            columns = (kept_columns(cmap, block), np.arange(cmap.width_before * block))
        errors = refit_consumer(consumer, gram, weight, bias, store, columns)
        results.append({"consumer": consumer.node.name, "refit": True,
                        "calibration_err_paper": errors["paper"], "calibration_err_refit": errors["refit"]})
    return results
