"""The catalog of per-channel ops that channels may flow through between producer and consumer.

An op belongs here when output channel k depends on input channel k alone. `check_node` returns
None when a node can carry the channels, or the reason it cannot; the reasons end up in the
report's `skipped` list.

Channels live on one axis of the data: the last one for dense layers ([N, C], [N, S, C]) and
axis 1 for convolutions ([N, C, H, W]). `Channels` says which.

Three properties drive the merge math (see `condense_graph.merge`):
- *affine* (elementwise): y_k = s_k * x_k + t_k (BatchNormalization, Add/Mul with a constant,
  Identity...). Affine ops right after the producer fold into the neuron vector; right before the
  consumer they fold into the consumer.
- *positively homogeneous*: f(lambda * x) = lambda * f(x) for lambda > 0 (Relu, LeakyRelu, PRelu,
  Clip(min=0), scaling, max/average pooling, zero padding, reshaping). Only then is merging exact
  multiples exact (paper eq. 5-7, A.1).
- everything else (Sigmoid, Tanh, GELU, ReLU6...) is carried through, but the merge is approximate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

# Unary ops applied element by element; extra inputs (Clip bounds, PRelu slope) must be constants.
ACTIVATIONS = {
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Clip",
    "Sigmoid",
    "Tanh",
    "Elu",
    "Selu",
    "Softplus",
    "Softsign",
    "HardSigmoid",
    "HardSwish",
    "Gelu",
    "Erf",
    "Mish",
}
# Ops that are affine per channel when their other operands are constants.
AFFINE = {"Add", "Sub", "Mul", "Div", "BatchNormalization", "Identity", "Dropout", "Cast", "Neg"}
# Binary ops whose two operands may both carry the channels (x * Sigmoid(x), x * (1 + Erf(..))).
BINARY = {"Add", "Sub", "Mul", "Div"}
# Per-channel ops that move values within a channel (pooling, padding, resizing, cropping).
SPATIAL = {
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Pad",
    "Resize",
    "Upsample",
    "Slice",
    "ReduceMean",
    "ReduceMax",
    "ReduceSum",
    "Squeeze",
}
# [N, C, H, W] -> [N, C*H*W]: channel c becomes a block of H*W consecutive features.
LAYOUT = {"Flatten", "Reshape"}
# Quantized graphs are left untouched: merging would need requantization.
QUANTIZED = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "QGemm",
    "QLinearAdd",
}
# Affine ops that never add a constant: they keep positive homogeneity.
_SCALING = {"Mul", "Div", "Identity", "Dropout", "Cast", "Neg"}
_HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu"} | _SCALING | LAYOUT | SPATIAL
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}


@dataclass(frozen=True)
class Channels:
    """Which axis of the data holds the channels, and how many there are."""

    width: int
    axis: int  # 1 for convolutions, -1 for dense layers

    def axis_in(self, rank: int) -> int:
        return self.axis % rank


def is_per_channel_op(node: gs.Node) -> bool:
    return (
        node.op in ACTIVATIONS
        or node.op in AFFINE
        or node.op in SPATIAL
        or node.op in LAYOUT
        or is_depthwise_conv(node)
    )


def is_depthwise_conv(node: gs.Node) -> bool:
    """Conv with one filter per input channel (group = C_in = C_out)."""
    if node.op != "Conv" or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return False
    weight = node.inputs[1].values
    group = node.attrs.get("group", 1)
    return group > 1 and weight.shape[0] == group and weight.shape[1] == 1


def per_channel_shape_reason(values: np.ndarray, channels: Channels, rank: int | None) -> str | None:
    """None when a constant broadcasts per channel: a scalar, or width along the channel axis."""
    if values.size == 1:
        return None
    if rank is None:
        if channels.axis == -1 and values.shape[-1] == channels.width == values.size:
            return None
        return f"constant of shape {list(values.shape)} on data of unknown rank"
    shape = (1,) * (rank - values.ndim) + values.shape
    wanted = [1] * rank
    wanted[channels.axis_in(rank)] = channels.width
    if values.ndim <= rank and list(shape) == wanted:
        return None
    return f"constant of shape {list(values.shape)} does not broadcast per channel (width {channels.width})"


def check_node(node: gs.Node, region: set[str], channels: Channels, rank: int | None) -> str | None:
    """Why `node` cannot carry the channels of `region` (tensor names), or None when it can.

    `rank` is the rank of the node's channel input when shape inference knows it.
    """
    data = [t for t in node.inputs if t.name in region]
    if node.op in BINARY and len(data) == 2:
        return None
    if len(data) != 1 or node.inputs[0] not in data and node.op not in BINARY:
        return f"{node.op} '{node.name}' mixes the channels with another tensor"
    params = [t for t in node.inputs if t.name not in region and not _is_empty(t)]
    for param in params:
        if isinstance(param, gs.Constant):
            continue
        if node.op in BINARY:
            return coupling_reason(node, data[0], param)
        return f"{node.op} '{node.name}' has a computed (non-constant) input '{param.name}'"
    if node.op in SPATIAL or node.op in LAYOUT:
        return _structural_reason(node, channels, rank)
    if is_depthwise_conv(node):
        return _depthwise_reason(node, channels)
    shape_reason = _batchnorm_shape_reason if node.op == "BatchNormalization" else per_channel_shape_reason
    for param in params:
        reason = shape_reason(param.values, channels, rank)
        if reason:
            return f"{node.op} '{node.name}': {reason}"
    return _elementwise_reason(node, channels, rank)


def coupling_reason(node: gs.Node, data: gs.Tensor, other: gs.Tensor) -> str:
    """Why a binary op whose other operand is computed leaves the channels alone, naming the kind:
    a Mul by a computed per-channel scale ([N, C, 1, 1], or a Sigmoid/HardSigmoid) is a channel gate,
    an op of equal shapes a residual join, anything else a broadcast."""
    name = node.name or node.outputs[0].name
    gate = _is_channel_scale(data, other) or _is_channel_scale(other, data) or _is_sigmoid(other, data)
    if node.op == "Mul" and gate:
        return f"channel gate (squeeze-excitation Mul '{name}') couples these channels: left alone"
    if data.shape is None or other.shape is None or len(data.shape) == len(other.shape):
        same = (
            data.shape is None
            or other.shape is None
            or all((a == 1) == (b == 1) for a, b in zip(data.shape, other.shape, strict=True))
        )
        if same:
            return (
                f"residual {node.op} '{name}' joins these channels with another producer's "
                f"('{other.name}'): left alone"
            )
    return f"{node.op} '{name}' broadcasts these channels against computed '{other.name}': left alone"


def _is_channel_scale(data: gs.Tensor, other: gs.Tensor) -> bool:
    """`other` is [N, C, 1, ..., 1] against `data` [N, C, H, ...] with H > 1 or unknown."""
    if (
        data.shape is None
        or other.shape is None
        or len(data.shape) != len(other.shape)
        or len(data.shape) < 3
    ):
        return False
    return all(d == 1 for d in other.shape[2:]) and any(d != 1 for d in data.shape[2:])


def _is_sigmoid(*tensors: gs.Tensor) -> bool:
    """One of `tensors` comes from a Sigmoid/HardSigmoid (through reshapes): a gate's factor."""
    return any(_sigmoid_source(t) for t in tensors)


def _sigmoid_source(tensor: gs.Tensor) -> bool:
    node = tensor.inputs[0] if tensor.inputs else None
    while (
        node is not None and node.op in ("Reshape", "Unsqueeze", "Identity", "Cast") and node.inputs[0].inputs
    ):
        node = node.inputs[0].inputs[0]
    return node is not None and node.op in ("Sigmoid", "HardSigmoid")


def _batchnorm_shape_reason(values: np.ndarray, channels: Channels, rank: int | None) -> str | None:
    """BatchNormalization's scale, B, mean and var are [C] and always index axis 1 of the data
    (unlike Add/Mul, they do not broadcast from the right); `_elementwise_reason` checks that axis 1
    is the channel axis."""
    if values.ndim == 1 and values.size == channels.width:
        return None
    return f"parameter of shape {list(values.shape)} is not [{channels.width}]"


def _elementwise_reason(node: gs.Node, channels: Channels, rank: int | None) -> str | None:
    if node.op == "BatchNormalization":
        if rank is None or channels.axis_in(rank) != 1:
            return f"BatchNormalization '{node.name}' on data of rank {rank}: its channel axis is not ours"
        if node.attrs.get("training_mode", 0):
            return f"BatchNormalization '{node.name}' is in training mode"
    if node.op == "Cast" and node.attrs.get("to") not in _FLOAT_TYPES:
        return f"Cast '{node.name}' to a non-float type"
    if node.op == "Dropout" and len(node.inputs) > 2 and not _is_empty(node.inputs[2]):
        if bool(np.asarray(node.inputs[2].values).any()):
            return f"Dropout '{node.name}' runs in training mode"
    return None


def _depthwise_reason(node: gs.Node, channels: Channels) -> str | None:
    if channels.axis != 1 or node.inputs[1].values.shape[0] != channels.width:
        return f"depthwise Conv '{node.name}' does not match the channels"
    return None


def _structural_reason(node: gs.Node, channels: Channels, rank: int | None) -> str | None:
    """Pooling, padding, resizing, slicing and flattening must leave the channel axis alone."""
    if channels.axis != 1:
        return f"{node.op} '{node.name}' on dense features"
    checks = {
        "Pad": _pad_reason,
        "Resize": _resize_reason,
        "Upsample": _resize_reason,
        "Slice": _slice_reason,
        "Flatten": _flatten_reason,
        "Reshape": _reshape_reason,
        "ReduceMean": _axes_reason,
        "ReduceMax": _axes_reason,
        "ReduceSum": _axes_reason,
        "Squeeze": _axes_reason,
    }
    check = checks.get(node.op)
    return check(node, channels, rank) if check else None


def _pad_reason(node, channels, rank) -> str | None:
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = node.attrs.get("pads")
    if pads is None and len(node.inputs) > 1:
        pads = node.inputs[1].values
    value = node.attrs.get("value", 0.0)
    if len(node.inputs) > 2 and not _is_empty(node.inputs[2]):
        value = float(np.asarray(node.inputs[2].values).reshape(-1)[0])
    if mode != "constant" or value != 0.0:
        return f"Pad '{node.name}' pads with {mode} {value}, not zeros"
    if len(node.inputs) > 3 and not _is_empty(node.inputs[3]):
        return f"Pad '{node.name}' names its axes"
    pads = np.asarray(pads).reshape(-1)
    half = len(pads) // 2
    if pads[1] != 0 or pads[half + 1] != 0:
        return f"Pad '{node.name}' pads the channel axis"
    return None


def _resize_reason(node, channels, rank) -> str | None:
    inputs = node.inputs
    scales = (
        inputs[2]
        if len(inputs) > 2 and not _is_empty(inputs[2])
        else (inputs[1] if node.op == "Upsample" else None)
    )
    sizes = inputs[3] if len(inputs) > 3 and not _is_empty(inputs[3]) else None
    if sizes is None and scales is not None and np.asarray(scales.values).size >= 2:
        if np.asarray(scales.values).reshape(-1)[1] == 1.0:
            return None
    if sizes is not None:  # sizes name the channel count, which the reduction changes
        return f"{node.op} '{node.name}' fixes its output sizes, channels included"
    return f"{node.op} '{node.name}' may resize the channel axis"


def _slice_reason(node, channels, rank) -> str | None:
    if len(node.inputs) < 4 or _is_empty(node.inputs[3]) or rank is None:
        return f"Slice '{node.name}' does not name its axes"
    axes = [int(a) % rank for a in np.asarray(node.inputs[3].values).reshape(-1)]
    if channels.axis_in(rank) in axes:
        return f"Slice '{node.name}' slices the channel axis"
    return None


def _axes_reason(node, channels, rank) -> str | None:
    """Reductions and squeezes over spatial axes only (axes as attribute or input)."""
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and not _is_empty(node.inputs[1]):
        axes = np.asarray(node.inputs[1].values).reshape(-1).tolist()
    if axes is None or rank is None or node.attrs.get("noop_with_empty_axes", 0):
        return f"{node.op} '{node.name}' does not name its axes"
    if channels.axis_in(rank) in [int(a) % rank for a in axes]:
        return f"{node.op} '{node.name}' acts across channels"
    return None


def _flatten_reason(node, channels, rank) -> str | None:
    if node.attrs.get("axis", 1) != 1:
        return f"Flatten '{node.name}' with axis {node.attrs.get('axis')}"
    return _static_block_reason(node)


def _reshape_reason(node, channels, rank) -> str | None:
    out = node.outputs[0].shape
    reason = _static_block_reason(node)
    if reason:
        return reason
    if out is None or len(out) != 2 or out[1] != int(np.prod(node.inputs[0].shape[1:])):
        return f"Reshape '{node.name}' is not a flatten to [N, C*H*W]"
    return None


def _static_block_reason(node) -> str | None:
    shape = node.inputs[0].shape
    if shape is None or not all(isinstance(d, int) for d in shape[1:]):
        return f"{node.op} '{node.name}': spatial size unknown"
    return None


def flattened_block(node: gs.Node) -> int:
    """How many features each channel becomes after a Flatten/Reshape node."""
    return int(np.prod(node.inputs[0].shape[2:]))


def is_affine(node: gs.Node, region: set[str]) -> bool:
    """True when the node is y = s*x + t per element, with exactly one channel-carrying input."""
    data = [t for t in node.inputs if t.name in region]
    if node.op not in AFFINE or len(data) != 1:
        return False
    # c / x is not affine in x
    return not (node.op == "Div" and node.inputs[0].name not in region)


def is_homogeneous(node: gs.Node, region: set[str]) -> bool:
    """True when the node is positively homogeneous in its channel input: f(l*x) = l*f(x), l > 0."""
    if node.op == "Clip":
        return _clip_is_relu(node)
    if node.op in BINARY and len([t for t in node.inputs if t.name in region]) == 2:
        return False  # x*x is homogeneous of degree 2, not 1
    if node.op in ("Mul", "Div"):
        return is_affine(node, region)
    if is_depthwise_conv(node):  # linear, unless it adds a bias
        return len(node.inputs) < 3 or _is_empty(node.inputs[2]) or not node.inputs[2].values.any()
    return node.op in _HOMOGENEOUS


def _clip_is_relu(node: gs.Node) -> bool:
    bounds = [_scalar(t) for t in node.inputs[1:3]] + [None] * (3 - len(node.inputs))
    low = node.attrs.get("min", bounds[0])
    high = node.attrs.get("max", bounds[1])
    low_ok = low is None or low == 0.0 or low == -np.inf
    high_ok = high is None or high == np.inf
    return low_ok and high_ok


def _scalar(tensor: gs.Tensor) -> float | None:
    if _is_empty(tensor) or not isinstance(tensor, gs.Constant):
        return None
    return float(np.asarray(tensor.values).reshape(-1)[0])


def _is_empty(tensor: gs.Tensor) -> bool:
    return tensor.is_empty() if hasattr(tensor, "is_empty") else not tensor.name
