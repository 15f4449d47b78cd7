"""Calibration data: capture hidden activations with ONNX Runtime and summarize them per layer.

The needed intermediate tensors are exposed as extra outputs of a copy of the model (the network
reduced so far, and the original one), which run on the calibration data in batches; each batch is
folded into Gram matrices or normal equations (`condense_graph.refit`) and dropped, so no more than
one batch of one layer's activations is in memory at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from condense_graph import runtime
from condense_graph.analysis import Consumer, Layer
from condense_graph.errors import CondenseError
from condense_graph.refit import Gram, LayerStatistics, Normal, channel_rows, im2col
from condense_graph.verify import data_batches, graph_inputs, load_data, row_count

MAX_FEATURES = 6144  # a consumer with more input features is not refit (its Gram would be huge)

logger = logging.getLogger(__name__)


@dataclass
class Calibration:
    """Calibration rows and how to batch them. `warnings` collects the fallbacks taken while
    capturing activations: the object travels from `condense` through the pass to `capture`, so
    the report gets them without any state outside this call."""

    data: dict[str, np.ndarray]
    batch_size: int = 64
    warnings: list[str] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return row_count(self.data)


def load_calibration(path: str, model: onnx.ModelProto, **options) -> Calibration:
    data, _ = load_data(path, model)
    calibration = Calibration(data, **options)
    if calibration.samples == 0:
        raise CondenseError(f"calibration data {path} has no samples")
    return calibration


def capture(model: onnx.ModelProto, names: list[str], calibration: Calibration):
    """Yield, batch by batch, the values of tensors `names` of `model` on the calibration data.

    Only the part of the model that computes them runs: it is cut out with onnx.utils.Extractor
    (the whole model, with the tensors as extra outputs, when that fails)."""
    sess = prefix_session(model, names, calibration.warnings)
    for feeds in data_batches(model, calibration.data, calibration.batch_size):
        yield [np.asarray(v) for v in runtime.run(sess, feeds, names)]


def prefix_session(model: onnx.ModelProto, names: list[str], warnings: list | None = None):
    """A session computing the tensors `names`: on the cut-out prefix of `model` when it can be cut
    and loads (onnx.utils.Extractor does not follow what If/Loop/Scan bodies read from the outer
    graph, so a cut through them can miss nodes), else on the whole model with them as extra
    outputs, which is logged and added to `warnings`."""
    inputs = [i.name for i in graph_inputs(model)]
    # the Extractor finds the cut tensors' types in value_info, which written models do not keep
    inferred, _ = runtime.infer_shapes(model)
    try:
        return runtime.session(onnx.utils.Extractor(inferred).extract_model(inputs, names))
    except Exception as err:  # noqa: BLE001 - subgraphs, missing shapes: run the whole model instead
        why = runtime.one_line(err, last=False)
        runtime.degraded(
            logger,
            warnings,
            "calibration runs the whole model: the part computing the "
            f"captured tensors cannot be cut out ({why})",
        )
        return runtime.session(with_outputs(model, names))


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    typed = {v.name: v for v in copy.graph.value_info}
    copy.graph.output.extend(
        typed.get(n) or onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
        for n in names
        if n not in present
    )
    return copy


def layer_statistics(
    model: onnx.ModelProto,
    layer: Layer,
    calibration: Calibration,
    consumers: bool = True,
    original: onnx.ModelProto | None = None,
) -> LayerStatistics:
    """The layer's channel Gram and (with `consumers`) each consumer's input-feature Gram, from one
    run of `model` (the network reduced so far) over the calibration data, in float64. With
    `original`, the same run also gathers the refit's normal equations toward the original
    network's consumer outputs (`LayerStatistics.refit_normals`), so the refit needs no second."""
    width = layer.producer.width
    channels = Gram(width)
    features = [consumer_features(c, width, layer.block) if consumers else None for c in layer.consumers]
    if original is None:
        grams = [Gram(f) if f else None for f in features]
    else:
        grams = [
            Normal(f, _outputs(c)) if f else None for f, c in zip(features, layer.consumers, strict=True)
        ]
    for values, outputs in _lockstep(model, original, layer, calibration):
        channels.add(_channels_of(values, layer))
        for k, (consumer, gram) in enumerate(zip(layer.consumers, grams, strict=True)):
            if gram is None:
                continue
            rows = feature_rows(consumer, values)
            if outputs is None:
                gram.add(rows)
            else:
                gram.add(rows, _output_rows(consumer, outputs[k]))
    hessians = [channels.matrix if g is None else g.a if isinstance(g, Normal) else g.matrix for g in grams]
    blocks = [f // width if f else 1 for f in features]
    normals = grams if original is not None else None
    proxy = [f is None for f in features]
    return LayerStatistics(channels.matrix[:-1, :-1], hessians, blocks, proxy, normals)


def _lockstep(model, original, layer: Layer, calibration: Calibration):
    """Yield (the layer's values in `model`, its consumers' outputs in `original` or None), batch
    by batch on the same rows."""
    inputs = capture(model, [layer.end.name], calibration)
    if original is None:
        for (values,) in inputs:
            yield values, None
        return
    targets = capture(original, [c.output_name for c in layer.consumers], calibration)
    for (values,), outputs in zip(inputs, targets, strict=True):
        yield values, outputs


def refit_statistics(
    reduced: onnx.ModelProto, original: onnx.ModelProto, layer: Layer, width: int, calibration: Calibration
) -> list[Normal | None]:
    """For each consumer, the normal equations relating its inputs in the reduced network (this
    layer merged) to its outputs in the original network, on the same samples; None for consumers
    that are not refit (too many input features, unsupported padding). `width`: the layer's
    width after the merge."""
    normals = [
        Normal(f, _outputs(c)) if (f := consumer_features(c, width, layer.block)) else None
        for c in layer.consumers
    ]
    inputs = capture(reduced, [layer.end.name], calibration)
    targets = capture(original, [c.output_name for c in layer.consumers], calibration)
    for (values,), outputs in zip(inputs, targets, strict=True):
        for consumer, normal, out in zip(layer.consumers, normals, outputs, strict=True):
            if normal is not None:
                normal.add(feature_rows(consumer, values), _output_rows(consumer, out))
    return normals


def reader_refit_statistics(
    reduced: onnx.ModelProto, original: onnx.ModelProto, readers: list, calibration: Calibration
) -> list[Normal | None]:
    """`refit_statistics` for consumers of a coupled group: `readers` lists (consumer, its input
    width after the merge, features per channel, the original output rows it keeps or None). A
    consumer whose own output rows were reduced before (a layer's producer, a group's member) is
    refit toward the original outputs of the rows it kept."""
    normals = []
    for consumer, width, block, keep in readers:
        features = consumer_features(consumer, width, block)
        outputs = len(keep) if keep is not None else _outputs(consumer)
        normals.append(Normal(features, outputs) if features else None)
    sources = list(dict.fromkeys(c.node.inputs[0].name for c, *_ in readers))
    sinks = list(dict.fromkeys(c.output_name for c, *_ in readers))
    inputs, targets = capture(reduced, sources, calibration), capture(original, sinks, calibration)
    for values, outputs in zip(inputs, targets, strict=True):
        by_name = dict(zip(sources, values, strict=True)) | dict(zip(sinks, outputs, strict=True))
        for (consumer, _, _, keep), normal in zip(readers, normals, strict=True):
            if normal is None:
                continue
            out = _output_rows(consumer, by_name[consumer.output_name])
            rows = feature_rows(consumer, by_name[consumer.node.inputs[0].name])
            normal.add(rows, out if keep is None else out[:, keep])
    return normals


@dataclass
class ReaderStatistics:
    """What structured OBS reads for one consumer of a coupled group, on the network reduced so
    far: the channel Gram of its input (projection factors) and its input-feature Gram (`hessian`,
    [features + 1]^2 with the ones column last; None when it is too wide to gather)."""

    channels: np.ndarray  # [width, width]
    hessian: np.ndarray | None
    block: int  # features per channel


def reader_statistics(model: onnx.ModelProto, readers: list, calibration: Calibration) -> list:
    """`ReaderStatistics` of each (consumer, width, block) in `readers`, from one run of `model`."""
    sources = list(dict.fromkeys(c.node.inputs[0].name for c, _, _ in readers))
    channels = [Gram(width) for _, width, _ in readers]
    features = [consumer_features(c, width, block) for c, width, block in readers]
    grams = [Gram(f) if f else None for f in features]
    for values in capture(model, sources, calibration):
        by_name = dict(zip(sources, values, strict=True))
        for (consumer, width, block), channel, gram in zip(readers, channels, grams, strict=True):
            data = by_name[consumer.node.inputs[0].name]
            if consumer.node.op == "Conv" or (data.ndim > 2 and block == 1 and data.shape[1] == width):
                channel.add(channel_rows(data, 1))
            else:
                rows = data.reshape(-1, data.shape[-1])
                channel.add(rows.reshape(len(rows), width, -1).transpose(0, 2, 1).reshape(-1, width))
            if gram is not None:
                gram.add(feature_rows(consumer, data))
    return [
        ReaderStatistics(
            channel.matrix[:-1, :-1], gram.matrix if gram is not None else None, (f or width) // width
        )
        for channel, gram, f, (_, width, _) in zip(channels, grams, features, readers, strict=True)
    ]


def _outputs(consumer: Consumer) -> int:
    weight = consumer.weight.values
    return weight.shape[0] if consumer.node.op == "Conv" else weight.shape[1 - consumer.axis]


def _output_rows(consumer: Consumer, out: np.ndarray) -> np.ndarray:
    """Consumer outputs as rows [samples * positions, outputs]."""
    return channel_rows(out, 1) if consumer.node.op == "Conv" else out.reshape(-1, out.shape[-1])


def _channels_of(values: np.ndarray, layer: Layer) -> np.ndarray:
    if layer.channels.axis == 1 and layer.block == 1 and values.ndim > 2:
        return channel_rows(values, 1)
    rows = values.reshape(-1, values.shape[-1])  # dense features (channel-major after Flatten)
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
    return im2col(
        values,
        kernel,
        attrs.get("strides", [1, 1]),
        (top, left, bottom, right),
        attrs.get("dilations", [1, 1]),
    )
