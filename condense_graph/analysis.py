"""Channel analysis: find the layers whose output channels can be condensed.

A *layer* is a producer (Gemm, MatMul with a constant weight, or Conv with group 1) whose output
channels flow through per-channel ops (the *region*, see `condense_graph.ops`) into one or more
consumers (Gemm/MatMul/Conv reading the channels as their data input with a constant weight).
The region is split into three parts, which the merge math needs (`condense_graph.merge`):

    producer -> pre (affine) -> middle (nonlinear, spatial) -> post (affine) -> consumers

A Flatten/Reshape on the way turns channel c of [N, C, H, W] into H*W consecutive features: the
layer's `block`. Everything the analysis cannot prove safe is returned as a `Skipped` entry with
the reason. This module only reads the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from condense_graph import ops
from condense_graph.ops import Channels

# float16 and bfloat16 weights are analyzed in float32 and written back in their own dtype
_FLOAT_DTYPES = (np.float32, np.float64, np.float16, ml_dtypes.bfloat16)
_MATRIX_OPS = ("Gemm", "MatMul", "Conv")


@dataclass
class Skipped:
    name: str
    reason: str


@dataclass
class Producer:
    node: gs.Node
    weight: gs.Constant
    axis: int  # axis of `weight` that indexes output channels
    scale: float  # Gemm alpha
    bias: str  # key of the bias array (an initializer name, or a new one to create)
    bias_scale: float  # Gemm beta

    @property
    def width(self) -> int:
        return self.weight.values.shape[self.axis]

    @property
    def channels(self) -> Channels:
        return Channels(self.width, 1 if self.node.op == "Conv" else -1)

    @property
    def rank(self) -> int | None:
        """Rank of the output when the op alone tells it."""
        return {"Gemm": 2, "Conv": self.weight.values.ndim}.get(self.node.op, _rank(self.node.outputs[0]))


@dataclass
class Consumer:
    node: gs.Node
    weight: gs.Constant
    axis: int  # axis of `weight` that indexes the input channels we reduce
    scale: float
    bias: str
    bias_scale: float
    output_name: str = ""  # the consumer's output in the original model (the refit's target)

    def __post_init__(self):
        self.output_name = self.output_name or self.node.outputs[0].name

    @property
    def pads_borders(self) -> bool:
        """A padded Conv sees a constant input as constant only away from the borders."""
        attrs = self.node.attrs
        return self.node.op == "Conv" and (
            any(attrs.get("pads", []))
            or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID")
        )


@dataclass
class ChannelConstant:
    tensor: gs.Constant
    axis: int  # the axis of the constant that indexes channels


@dataclass
class Layer:
    name: str
    producer: Producer
    consumers: list[Consumer]
    start: gs.Tensor  # producer output
    end: gs.Tensor  # the tensor the consumers read
    pre: list[gs.Node] = field(default_factory=list)
    middle: list[gs.Node] = field(default_factory=list)
    post: list[gs.Node] = field(default_factory=list)
    channel_constants: list[ChannelConstant] = field(default_factory=list)  # sliced with channels
    middle_constants: list[gs.Constant] = field(default_factory=list)  # per-channel, in g_k
    reshape_shapes: list[gs.Constant] = field(default_factory=list)  # hold C*H*W literally
    block: int = 1  # consumer features per channel (H*W after Flatten)
    homogeneous: bool = True
    depthwise: gs.Node | None = None  # a depthwise Conv inside the region (paper A.3)
    depthwise_affine: list[gs.Node] = field(default_factory=list)  # its BN, right after it

    @property
    def channels(self) -> Channels:
        return self.producer.channels

    @property
    def activation(self) -> str:
        return "+".join(n.op for n in self.pre + self.middle + self.post) or "none"

    @property
    def middle_input(self) -> gs.Tensor:
        return self.pre[-1].outputs[0] if self.pre else self.start

    @property
    def middle_output(self) -> gs.Tensor:
        if not self.post:
            return self.end
        first = self.post[0]
        return next(t for t in first.inputs if not isinstance(t, gs.Constant) and t.name)


@dataclass
class Analysis:
    layers: list[Layer]
    skipped: list[Skipped]
    groups: list = field(default_factory=list)  # `coupled.CoupledGroup`s: channels across producers


def analyze(graph: gs.Graph, subgraph_tensors: set[str] = frozenset()) -> Analysis:
    """Find every reducible layer of `graph` (toposorted) and the reasons for the others."""
    outputs = {t.name for t in graph.outputs}
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    layers, skipped = [], []
    for node in graph.nodes:
        if node.op in ops.QUANTIZED and node.op not in ("QuantizeLinear", "DequantizeLinear"):
            skipped.append(Skipped(_name(node), f"quantized op {node.op}: left untouched"))
            continue
        if node.op not in _MATRIX_OPS and node.op != "ConvTranspose" or ops.is_depthwise_conv(node):
            continue
        producer = as_producer(node, outputs, subgraph_tensors)
        if isinstance(producer, str):
            skipped.append(Skipped(_name(node), producer))
            continue
        result = trace_layer(producer, order, outputs, subgraph_tensors)
        (layers if isinstance(result, Layer) else skipped).append(result)
    return Analysis(layers, skipped)


def as_producer(node: gs.Node, outputs: set[str], subgraph_tensors: set[str]) -> Producer | str:
    """The node as a producer, or why it cannot be one."""
    if node.op == "ConvTranspose":
        return f"ConvTranspose '{_name(node)}' is not supported"
    weight = node.inputs[1]
    reason = _weight_reason(node, weight) or _protected_reason(node.outputs[0], outputs, subgraph_tensors)
    if reason:
        return reason
    if node.op == "MatMul":
        return Producer(node, weight, 1, 1.0, _new_bias_key(node), 1.0)
    if node.op == "Conv":
        bias = _conv_bias(node)
        return bias if isinstance(bias, str) else Producer(node, weight, 0, 1.0, *bias)
    if node.attrs.get("transA", 0):
        return f"Gemm '{node.name}' has transA=1"
    axis = 0 if node.attrs.get("transB", 0) else 1
    bias = _gemm_bias(node, weight.values.shape[axis])
    if isinstance(bias, str):
        return bias
    return Producer(node, weight, axis, float(node.attrs.get("alpha", 1.0)), *bias)


def as_consumer(node: gs.Node, tensor: gs.Tensor) -> Consumer | str:
    """The node as a consumer of the channels in `tensor`, or why it cannot be one."""
    if node.op == "ConvTranspose":
        return f"channels reach ConvTranspose '{_name(node)}', which is not supported"
    if node.inputs[0] is not tensor or (len(node.inputs) > 1 and node.inputs[1] is tensor):
        return f"{node.op} '{_name(node)}' reads the channels as its weight"
    weight = node.inputs[1]
    reason = _weight_reason(node, weight)
    if reason:
        return reason
    if node.op == "MatMul":
        return Consumer(node, weight, 0, 1.0, _new_bias_key(node), 1.0)
    if node.op == "Conv":
        bias = _conv_bias(node)
        return bias if isinstance(bias, str) else Consumer(node, weight, 1, 1.0, *bias)
    if node.attrs.get("transA", 0):
        return f"Gemm '{node.name}' reads the channels transposed (transA=1)"
    axis = 1 if node.attrs.get("transB", 0) else 0
    bias = _gemm_bias(node, weight.values.shape[1 - axis])
    if isinstance(bias, str):
        return bias
    return Consumer(node, weight, axis, float(node.attrs.get("alpha", 1.0)), *bias)


def _weight_reason(node: gs.Node, weight: gs.Tensor) -> str | None:
    if weight.inputs and weight.inputs[0].op == "DequantizeLinear":
        return f"{node.op} '{_name(node)}' weight is dequantized (a quantized graph): left untouched"
    if not isinstance(weight, gs.Constant):
        return f"{node.op} '{_name(node)}' has no constant weight"
    values = weight.values
    if node.op != "Conv" and values.ndim != 2:
        return f"{node.op} '{_name(node)}' weight '{weight.name}' is not 2-D"
    if node.op == "Conv" and node.attrs.get("group", 1) != 1:
        return f"grouped Conv '{_name(node)}' (group={node.attrs['group']}) is not supported"
    if values.dtype not in _FLOAT_DTYPES:
        return f"{node.op} '{_name(node)}' weight '{weight.name}' has dtype {values.dtype}"
    if len(weight.outputs) > 1:
        return f"weight '{weight.name}' is shared by {len(weight.outputs)} nodes (weight tying)"
    return nonfinite_reason(weight)


def nonfinite_reason(tensor: gs.Constant) -> str | None:
    """NaN or Inf in an array the merge reads or writes would spread through the merged weights.
    Only such arrays are checked: elsewhere (an Inf Clip bound) non-finite values are legitimate."""
    values = np.asarray(tensor.values)
    if values.dtype in _FLOAT_DTYPES and not np.all(np.isfinite(values.astype(np.float64))):
        return f"'{tensor.name}' contains NaN or Inf values: the layer is left alone"
    return None


def _protected_reason(tensor: gs.Tensor, outputs: set[str], subgraph_tensors: set[str]) -> str | None:
    """Graph outputs are the model's interface; subgraph reads are not analyzed."""
    if tensor.name in outputs:
        return f"channels reach graph output '{tensor.name}' (the model's interface)"
    if tensor.name in subgraph_tensors:
        return f"channels reach '{tensor.name}', which an If/Loop/Scan subgraph reads"
    return None


def _gemm_bias(node: gs.Node, width: int) -> tuple[str, float] | str:
    beta = float(node.attrs.get("beta", 1.0))
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return _new_bias_key(node), 1.0
    bias = node.inputs[2]
    if not isinstance(bias, gs.Constant):
        return f"Gemm '{node.name}' bias '{bias.name}' is not a constant"
    if len(bias.outputs) > 1:
        return f"bias '{bias.name}' is shared by {len(bias.outputs)} nodes"
    if nonfinite_reason(bias):
        return nonfinite_reason(bias)
    if beta == 0.0:
        return f"Gemm '{node.name}' has beta=0"
    if float(node.attrs.get("alpha", 1.0)) == 0.0:
        return f"Gemm '{node.name}' has alpha=0"
    reason = ops.per_channel_shape_reason(bias.values, Channels(width, -1), 2)
    if reason:
        return f"Gemm '{node.name}' bias: {reason}"
    return bias.name, beta


def _conv_bias(node: gs.Node) -> tuple[str, float] | str:
    """The bias key, or why the bias cannot be read and written (it is sliced or rewritten in
    place, so another node reading it would change too)."""
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return _new_bias_key(node), 1.0
    bias = node.inputs[2]
    if not isinstance(bias, gs.Constant):
        return f"Conv '{_name(node)}' bias '{bias.name}' is not a constant"
    if len(bias.outputs) > 1:
        return f"bias '{bias.name}' is shared by {len(bias.outputs)} nodes"
    return nonfinite_reason(bias) or (bias.name, 1.0)


def _new_bias_key(node: gs.Node) -> str:
    return f"{node.outputs[0].name}.bias"


def _name(node: gs.Node) -> str:
    return node.name or node.outputs[0].name


def _rank(tensor: gs.Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


def trace_layer(
    producer: Producer, order: dict[int, int], outputs: set[str], subgraph_tensors: set[str]
) -> Layer | Skipped:
    """Follow the producer's channels through per-channel ops to their consumers."""
    name = _name(producer.node)
    start = producer.node.outputs[0]
    region, nodes, consumers = {start.name}, [], []
    pending, seen = {id(n): n for n in start.outputs}, set()
    while pending:  # visit users in graph order so both inputs of x * Sigmoid(x) are known
        key = min(pending, key=lambda i: order.get(i, -1))
        node = pending.pop(key)
        seen.add(key)
        if node.op in _MATRIX_OPS + ("ConvTranspose",) and not ops.is_depthwise_conv(node):
            reason = _add_consumer(node, region, consumers)
        else:
            reason = _add_region_node(node, region, producer, nodes)
        if reason:
            return Skipped(name, reason)
        if nodes and nodes[-1] is node:
            reason = _grow_region(node, region, outputs, subgraph_tensors, pending, seen)
            if reason:
                return Skipped(name, reason)
    return _finish_layer(name, producer, start, nodes, consumers, region)


def _add_consumer(node: gs.Node, region: set[str], consumers: list[Consumer]) -> str | None:
    tensor = next(t for t in node.inputs if t.name in region)
    consumer = as_consumer(node, tensor)
    if isinstance(consumer, str):
        return consumer
    consumers.append(consumer)
    return None


def _add_region_node(node: gs.Node, region: set[str], producer: Producer, nodes) -> str | None:
    if node.op == "Concat":
        return f"Concat '{_name(node)}' joins these channels with other tensors' at an offset: left alone"
    if node.op in ("Split", "SplitToSequence"):
        return f"{node.op} '{_name(node)}' cuts the tensor these channels are in into parts: left alone"
    if node.op in ("If", "Loop", "Scan"):
        return f"channels enter control flow ({node.op} '{_name(node)}'): left alone"
    if not ops.is_per_channel_op(node) or node.domain not in (None, "", "ai.onnx"):
        return f"channels reach {node.op} '{_name(node)}', which does not act per channel"
    data = next(t for t in node.inputs if t.name in region)
    rank = _rank(data) or (None if any(n.op in ops.LAYOUT for n in nodes) else producer.rank)
    reason = ops.check_node(node, region, producer.channels, rank)
    if reason:
        return reason
    for extra in node.outputs[1:]:
        if extra.outputs:
            return f"{node.op} '{_name(node)}' uses its second output"
    nodes.append(node)
    return None


def _grow_region(node, region, outputs, subgraph_tensors, pending, seen) -> str | None:
    out = node.outputs[0]
    reason = _protected_reason(out, outputs, subgraph_tensors)
    if reason:
        return reason
    region.add(out.name)
    pending.update({id(n): n for n in out.outputs if id(n) not in seen})
    return None


def _finish_layer(name, producer, start, nodes, consumers, region) -> Layer | Skipped:
    ends = {id(c.node.inputs[0]): c.node.inputs[0] for c in consumers}
    if not ends:
        return Skipped(name, "channels reach no Gemm/MatMul/Conv consumer")
    if len(ends) != 1:
        return Skipped(name, "consumers read the channels at different points of the chain")
    end = next(iter(ends.values()))
    layer = Layer(name, producer, consumers, start, end)
    _split_region(layer, nodes, region)
    layer.block = int(np.prod([ops.flattened_block(n) for n in nodes if n.op in ops.LAYOUT]))
    reason = (
        _block_reason(layer)
        or _collect_constants(layer, nodes, producer.width)
        or _nonfinite_constants_reason(layer)
    )
    if reason:
        return Skipped(name, reason)
    layer.homogeneous = all(ops.is_homogeneous(n, region) for n in layer.middle)
    depthwise = [n for n in layer.middle if ops.is_depthwise_conv(n)]
    if len(depthwise) > 1:
        return Skipped(name, "channels pass through more than one depthwise Conv")
    if depthwise:
        layer.depthwise = depthwise[0]
        layer.depthwise_affine = _affine_chain_after(depthwise[0], layer.middle, region)
    return layer


def _affine_chain_after(node: gs.Node, nodes: list[gs.Node], region: set[str]) -> list[gs.Node]:
    """The single-user affine ops (BatchNormalization...) that directly follow `node`."""
    chain, cur = [], node.outputs[0]
    while len(cur.outputs) == 1 and cur.outputs[0] in nodes and ops.is_affine(cur.outputs[0], region):
        chain.append(cur.outputs[0])
        cur = cur.outputs[0].outputs[0]
    return chain


def _block_reason(layer: Layer) -> str | None:
    """Consumers must contract over the channel axis: Conv over axis 1, Gemm/MatMul over the last."""
    for consumer in layer.consumers:
        if consumer.node.op == "Conv" and (layer.channels.axis != 1 or layer.block != 1):
            return f"Conv '{_name(consumer.node)}' reads the channels on another axis"
        if consumer.node.op != "Conv" and layer.channels.axis == 1 and _rank(layer.end) != 2:
            return f"{consumer.node.op} '{_name(consumer.node)}' does not read the channels as its last axis"
        rows = consumer.weight.values.shape[consumer.axis]
        if rows != layer.producer.width * layer.block:
            wanted = f"{layer.producer.width} x {layer.block}"
            return f"consumer '{_name(consumer.node)}' reads {rows} features, not {wanted}"
    return None


def _split_region(layer: Layer, nodes: list[gs.Node], region: set[str]) -> None:
    """pre: affine ops right after the producer; post: affine ops right before the consumers."""
    pre, cur = [], layer.start
    while (
        cur is not layer.end
        and len(cur.outputs) == 1
        and cur.outputs[0] in nodes
        and ops.is_affine(cur.outputs[0], region)
    ):
        pre.append(cur.outputs[0])
        cur = cur.outputs[0].outputs[0]
    post, cur = [], layer.end
    while (
        cur.inputs
        and cur.inputs[0] in nodes
        and cur.inputs[0] not in pre
        and ops.is_affine(cur.inputs[0], region)
    ):
        node = cur.inputs[0]
        source = node.inputs[_data_index(node, region)]
        if len(source.outputs) != 1 or any(n.op in ops.LAYOUT for n in nodes):
            break  # after a Flatten, per-channel constants would be per feature: keep it simple
        post.insert(0, node)
        cur = source
    layer.pre, layer.post = pre, post
    layer.middle = [n for n in nodes if n not in pre and n not in post]


def _data_index(node: gs.Node, region: set[str]) -> int:
    return next(i for i, t in enumerate(node.inputs) if t.name in region)


def _collect_constants(layer: Layer, nodes: list[gs.Node], width: int) -> str | None:
    """Per-channel constants are sliced with the channels, so nobody else may use them."""
    members = {id(n) for n in nodes}
    for node in nodes:
        for tensor, axis in _per_channel_inputs(node, width):
            if any(id(user) not in members for user in tensor.outputs):
                return f"per-channel constant '{tensor.name}' is also used outside the layer"
            if all(c.tensor is not tensor for c in layer.channel_constants):
                layer.channel_constants.append(ChannelConstant(tensor, axis))
                if node in layer.middle:
                    layer.middle_constants.append(tensor)
        if node.op == "Reshape" and np.asarray(node.inputs[1].values).reshape(-1)[1] > 0:
            if len(node.inputs[1].outputs) > 1:
                return f"Reshape shape '{node.inputs[1].name}' is shared with other nodes"
            layer.reshape_shapes.append(node.inputs[1])
    return None


def _nonfinite_constants_reason(layer: Layer) -> str | None:
    """The per-channel constants (sliced with the channels) and the constants of the affine ops
    around the activation (folded into the merged weights) must be finite."""
    read = [c.tensor for c in layer.channel_constants]
    read += [t for n in layer.pre + layer.post for t in n.inputs if isinstance(t, gs.Constant)]
    return next((reason for reason in map(nonfinite_reason, read) if reason), None)


def _per_channel_inputs(node: gs.Node, width: int):
    """(constant, channel axis) of every per-channel constant input of a region node."""
    if ops.is_depthwise_conv(node):  # kernel [C, 1, k, k] and bias [C]
        return [(t, 0) for t in node.inputs[1:] if isinstance(t, gs.Constant)]
    if node.op in ops.SPATIAL or node.op in ops.LAYOUT:
        return []  # pads, scales, axes, shapes: structure, not channels
    found = []
    for tensor in node.inputs:
        if isinstance(tensor, gs.Constant) and tensor.values.size == width and width > 1:
            found.append((tensor, tensor.values.shape.index(width)))
    return found
