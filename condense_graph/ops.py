"""The catalog of per-channel ops that channels may flow through between producer and consumer.

An op belongs here when output channel k depends on input channel k alone. Each op has a `check`
that returns None when a node can be carried through, or the reason it cannot; the reasons end up
in the report's `skipped` list.

Three properties drive the merge math (see `condense_graph.merge`):
- *affine*: y_k = s_k * x_k + t_k (BatchNormalization, Add/Mul with a constant, Identity...).
  Affine ops right after the producer fold into the neuron vector; right before the consumer they
  fold into the consumer.
- *positively homogeneous*: f(lambda * x) = lambda * f(x) for lambda > 0 (Relu, LeakyRelu, PRelu,
  Clip(min=0), scaling). Only then is merging exact multiples exact (paper eq. 5-7).
- everything else (Sigmoid, Tanh, GELU...) is carried through, but the merge is approximate.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

# Unary ops applied element by element; extra inputs (Clip bounds, PRelu slope) must be constants.
ACTIVATIONS = {
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus",
    "Softsign", "HardSigmoid", "HardSwish", "Gelu", "Erf", "Mish",
}
# Ops that are affine per channel when their other operands are constants.
AFFINE = {"Add", "Sub", "Mul", "Div", "BatchNormalization", "Identity", "Dropout", "Cast", "Neg"}
# Binary ops whose two operands may both carry the channels (x * Sigmoid(x), x * (1 + Erf(..))).
BINARY = {"Add", "Sub", "Mul", "Div"}
# Affine ops that never add a constant: they keep positive homogeneity.
_SCALING = {"Mul", "Div", "Identity", "Dropout", "Cast", "Neg"}
_HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu"} | _SCALING
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}


def is_per_channel_op(op: str) -> bool:
    return op in ACTIVATIONS or op in AFFINE


def per_channel_shape_reason(values: np.ndarray, width: int) -> str | None:
    """None when a constant broadcasts per channel (a scalar, or [1, ..., 1, width])."""
    if values.size == 1:
        return None
    if values.shape[-1] == width and values.size == width:
        return None
    return f"constant of shape {list(values.shape)} does not broadcast per channel (width {width})"


def check_node(node: gs.Node, region: set[str], width: int, rank: int | None) -> str | None:
    """Why `node` cannot carry the channels of `region` (tensor names), or None when it can.

    `rank` is the rank of the channel tensor when shape inference knows it.
    """
    data = [t for t in node.inputs if t.name in region]
    params = [t for t in node.inputs if t.name not in region and not _is_empty(t)]
    if node.op in BINARY and len(data) == 2:
        return None
    if len(data) != 1:
        return f"{node.op} '{node.name}' mixes the channels with another tensor"
    for param in params:
        if not isinstance(param, gs.Constant):
            return f"{node.op} '{node.name}' combines the channels with non-constant '{param.name}'"
        reason = per_channel_shape_reason(param.values, width)
        if reason:
            return f"{node.op} '{node.name}': {reason}"
    return _op_specific_reason(node, rank)


def _op_specific_reason(node: gs.Node, rank: int | None) -> str | None:
    if node.op == "BatchNormalization":
        if rank != 2:
            return f"BatchNormalization '{node.name}' on data of rank {rank}: its channel axis is not the features"
        if node.attrs.get("training_mode", 0):
            return f"BatchNormalization '{node.name}' is in training mode"
    if node.op == "Cast" and node.attrs.get("to") not in _FLOAT_TYPES:
        return f"Cast '{node.name}' to a non-float type"
    if node.op == "Dropout" and len(node.inputs) > 2:
        mode = node.inputs[2]
        if not isinstance(mode, gs.Constant) or bool(np.asarray(mode.values).any()):
            return f"Dropout '{node.name}' may run in training mode"
    return None


def is_affine(node: gs.Node, region: set[str]) -> bool:
    """True when the node is y = s*x + t per channel, with exactly one channel-carrying input."""
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
