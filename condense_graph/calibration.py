"""Calibration data: capture hidden activations with ONNX Runtime and summarize them per layer.

The needed intermediate tensor is exposed as an extra output of a copy of the (partially reduced)
model, which runs on the calibration data in batches; each batch is folded into Gram matrices
(`condense_graph.refit.Gram`) and dropped, so no more than one batch of one layer's activations is
in memory at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from condense_graph.analysis import Consumer, Layer
from condense_graph.errors import CondenseError
from condense_graph.refit import Gram, channel_rows, im2col
from condense_graph.verify import data_batches, load_data, session

MAX_FEATURES = 6144  # a consumer with more input features is not refit (its Gram would be huge)


@dataclass
class Calibration:
    data: dict[str, np.ndarray]
    batch_size: int = 128
    similarity: str = "weights"   # "weights" (the paper) or "activations"

    @property
    def samples(self) -> int:
        return len(next(iter(self.data.values())))


def load_calibration(path: str, model: onnx.ModelProto, **options) -> Calibration:
    data, _ = load_data(path, model)
    calibration = Calibration(data, **options)
    if calibration.samples == 0:
        raise CondenseError(f"calibration data {path} has no samples")
    return calibration


@dataclass
class LayerStats:
    channel_gram: np.ndarray | None               # [C+1, C+1], channels' activations + ones
    consumer_grams: list[np.ndarray | None] = field(default_factory=list)  # features + ones
    changed_channels: bool = False                # grams hold [after merge, before merge] features


def capture(model: onnx.ModelProto, names: list[str], calibration: Calibration):
    """Yield, batch by batch, the values of tensors `names` of `model` on the calibration data."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    typed = {v.name: v for v in copy.graph.value_info}
    for name in names:
        if name not in present:
            copy.graph.output.append(typed.get(name) or onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
    sess = session(copy)
    for feeds in data_batches(model, calibration.data, calibration.batch_size):
        yield [np.asarray(v) for v in sess.run(names, feeds)]


def layer_statistics(model: onnx.ModelProto, layer: Layer, calibration: Calibration) -> LayerStats:
    """Gram matrices of the layer's channels and of each consumer's input features."""
    width = layer.producer.width
    channels = Gram(width)
    consumers = [Gram(features) if (features := consumer_features(c, width, layer.block)) else None
                 for c in layer.consumers]
    for (values,) in capture(model, [layer.end.name], calibration):
        channels.add(_channels_of(values, layer))
        for consumer, gram in zip(layer.consumers, consumers):
            if gram is not None:
                gram.add(feature_rows(consumer, values))
    return LayerStats(channels.matrix, [g.matrix if g is not None else None for g in consumers])


def _channels_of(values: np.ndarray, layer: Layer) -> np.ndarray:
    if layer.channels.axis == 1 and layer.block == 1 and values.ndim > 2:
        return channel_rows(values, 1)
    rows = values.reshape(-1, values.shape[-1])          # dense features (block-major after Flatten)
    width = layer.producer.width
    return rows.reshape(len(rows), width, -1).transpose(0, 2, 1).reshape(-1, width)


def consumer_features(consumer: Consumer, width: int, block: int) -> int | None:
    """How many input features a refit of this consumer solves for, or None when it is not refit."""
    if consumer.node.op == "Conv":
        attrs = consumer.node.attrs
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or consumer.weight.values.ndim != 4:
            return None
        features = width * int(np.prod(consumer.weight.values.shape[2:]))
    else:
        features = width * block
    return features if features <= MAX_FEATURES else None


def feature_rows(consumer: Consumer, values: np.ndarray) -> np.ndarray:
    """The consumer's input rows: dense features, or im2col patches of a convolution."""
    if consumer.node.op != "Conv":
        return values.reshape(-1, values.shape[-1])
    attrs = consumer.node.attrs
    kernel = consumer.weight.values.shape[2:]
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    top, left, bottom, right = pads[0], pads[1], pads[2], pads[3]
    return im2col(values, kernel, attrs.get("strides", [1, 1]), (top, left, bottom, right),
                  attrs.get("dilations", [1, 1]))


def cross_statistics(before: onnx.ModelProto, after: onnx.ModelProto, layer: Layer,
                     width_after: int, calibration: Calibration) -> LayerStats:
    """Gram matrices of [features after the merge, features before] for each consumer: the kept
    channels of a depthwise block change when it is merged, so both are captured on the same data."""
    width = layer.producer.width
    sizes = [(consumer_features(c, width_after, layer.block), consumer_features(c, width, layer.block))
             for c in layer.consumers]
    grams = [Gram(a + b) if a and b else None for a, b in sizes]
    pairs = zip(capture(after, [layer.end.name], calibration), capture(before, [layer.end.name], calibration))
    for (new,), (old,) in pairs:
        for consumer, gram in zip(layer.consumers, grams):
            if gram is not None:
                gram.add(np.concatenate([feature_rows(consumer, new), feature_rows(consumer, old)], axis=1))
    return LayerStats(None, [g.matrix if g is not None else None for g in grams], changed_channels=True)
