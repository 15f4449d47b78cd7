"""A trainable PyTorch module rebuilt from an ONNX graph, for users who only have an .onnx file.

`from_onnx(model)` returns an `OnnxModule` that runs the graph node by node with torch ops
(`torch.nn.functional` for the math), so that it can be fine-tuned; `to_onnx(module)` writes the
trained values back into a copy of the source model. `condense-graph finetune` alternates the two
with the condense pass (reduce, rebuild, train, write back, repeat).

Choices:
- Float initializers become `nn.Parameter`s (trainable), registered in `module.weights` (an
  `nn.ParameterDict`) under sanitized keys (ONNX names contain '.', '/', ':');
  `module.initializer_names` maps each parameter or buffer name (as `named_parameters()` /
  `named_buffers()` report it) back to its initializer, `module.onnx_name(name)` does one.
- Buffers, not trained (in `module.constants`): integer and bool initializers (shape constants,
  indices), 0-d float initializers (scalars such as Clip bounds or the decomposed GELU's sqrt(2)),
  float initializers read as Clip bounds or a Pow exponent, and BatchNormalization's running mean
  and variance. BatchNormalization always runs with its running statistics (the exported eval
  semantics), also in `train()` mode; its scale and bias are trainable.
- Constant nodes become buffers too (never trained, even when they look like weights), and are
  not written back: `to_onnx` replaces initializers only.
- Shapes (Shape, Reshape, Expand, ConstantOfShape, Slice bounds ...) are computed at run time from
  the tensors, so dynamic batch sizes work.
- Model-local functions are inlined first.

Ops: see `HANDLERS` (Gemm, MatMul, elementwise arithmetic and activations, Conv 1d/2d/3d with
every auto_pad, BatchNormalization, pooling, reductions, and the shape ops that exporters and the
condense pass emit). Refused, with one CondenseError naming every unsupported op type and a node
of each: any op not in `HANDLERS`, any op of a non-default domain, any node with a subgraph
(If, Loop, Scan), MaxPool with its Indices output, Pad in a mode other than constant, and
string or sparse Constants.

Needs the `torch` extra: importing this module without torch raises CondenseError.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from condense_graph.errors import CondenseError

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise CondenseError(
        "condense_graph.onnx_module needs the torch extra: pip install 'condense-graph[torch]'"
    ) from exc

__all__ = ["OnnxModule", "from_onnx", "to_onnx", "HANDLERS"]

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class _Node:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    opset: int = 17


# ---- attribute and value helpers ------------------------------------------------------------


def _attr_value(attr: onnx.AttributeProto):
    if attr.type == onnx.AttributeProto.TENSOR:
        return _to_torch(numpy_helper.to_array(attr.t))
    return onnx.helper.get_attribute_value(attr)


def _to_torch(array: np.ndarray) -> torch.Tensor:
    array = np.array(array)  # writable copy
    try:
        return torch.from_numpy(array)
    except TypeError:  # e.g. ml_dtypes bfloat16
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)


def _ints(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _optional(xs: list, i: int):
    return xs[i] if i < len(xs) else None


# ---- elementwise ----------------------------------------------------------------------------


def _unary(fn):
    return lambda node, xs: fn(xs[0])


def _div(node, xs):
    a, b = xs
    if not a.dtype.is_floating_point and not b.dtype.is_floating_point:
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _pow(node, xs):
    return torch.pow(xs[0], xs[1]).to(xs[0].dtype)


def _variadic(fn):
    return lambda node, xs: functools.reduce(fn, [x for x in xs if x is not None])


def _leaky_relu(node, xs):
    return F.leaky_relu(xs[0], node.attrs.get("alpha", 0.01))


def _prelu(node, xs):
    x, slope = xs
    return torch.where(x < 0, x * slope, x)


def _hard_sigmoid(node, xs):
    return torch.clamp(node.attrs.get("alpha", 0.2) * xs[0] + node.attrs.get("beta", 0.5), 0.0, 1.0)


def _clip(node, xs):
    x = xs[0]
    low, high = _optional(xs, 1), _optional(xs, 2)
    if node.opset < 11:
        low, high = node.attrs.get("min"), node.attrs.get("max")
    if low is not None:
        x = torch.maximum(x, torch.as_tensor(low, dtype=x.dtype, device=x.device))
    if high is not None:
        x = torch.minimum(x, torch.as_tensor(high, dtype=x.dtype, device=x.device))
    return x


def _elu(node, xs):
    return F.elu(xs[0], node.attrs.get("alpha", 1.0))


def _selu(node, xs):
    alpha = node.attrs.get("alpha", 1.67326319217681884765625)
    gamma = node.attrs.get("gamma", 1.05070102214813232421875)
    x = xs[0]
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


def _gelu(node, xs):
    return F.gelu(xs[0], approximate=node.attrs.get("approximate", "none"))


def _softmax_like(fn):
    def handler(node, xs):
        x = xs[0]
        if node.opset >= 13:
            return fn(x, dim=node.attrs.get("axis", -1))
        axis = _axis(node.attrs.get("axis", 1), x.dim())  # old opsets: coerced to 2-D
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, dim=1).reshape(x.shape)

    return handler


# ---- linear algebra and convolutions --------------------------------------------------------


def _gemm(node, xs):
    a, b, c = xs[0], xs[1], _optional(xs, 2)
    a = a.t() if node.attrs.get("transA", 0) else a
    alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
    if node.attrs.get("transB", 0) and alpha == 1.0 and beta == 1.0:
        return F.linear(a, b, c)
    y = a @ (b.t() if node.attrs.get("transB", 0) else b)
    if alpha != 1.0:
        y = alpha * y
    if c is not None:
        y = y + (c if beta == 1.0 else beta * c)
    return y


def _spatial_pads(node, shape, kernel, strides, dilations) -> list[int]:
    """ONNX pads [x1_begin, x2_begin, ..., x1_end, ...] for the spatial dims of `shape`."""
    n = len(kernel)
    auto_pad = node.attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(shape[-n:], kernel, strides, dilations, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else total - small)
            ends.append(total - begins[-1])
        return begins + ends
    if auto_pad == "VALID":
        return [0] * (2 * n)
    return _ints(node.attrs.get("pads")) or [0] * (2 * n)


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX spatial pads to F.pad's (last_begin, last_end, ...)."""
    n = len(pads) // 2
    out = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def _window(node, x, kernel):
    n = len(kernel)
    strides = _ints(node.attrs.get("strides")) or [1] * n
    dilations = _ints(node.attrs.get("dilations")) or [1] * n
    pads = _spatial_pads(node, x.shape, kernel, strides, dilations)
    return strides, dilations, pads


def _symmetric(pads: list[int]) -> bool:
    n = len(pads) // 2
    return pads[:n] == pads[n:]


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv(node, xs):
    x, w, b = xs[0], xs[1], _optional(xs, 2)
    kernel = list(w.shape[2:])
    strides, dilations, pads = _window(node, x, kernel)
    n = len(kernel)
    if not _symmetric(pads):
        x, pads = F.pad(x, _torch_pad(pads)), [0] * (2 * n)
    group = node.attrs.get("group", 1)
    return _CONV[n](x, w, b, strides, pads[:n], dilations, group)


def _batch_norm(node, xs):
    x, scale, bias, mean, var = xs[:5]
    y = F.batch_norm(x, mean, var, scale, bias, training=False, eps=node.attrs.get("epsilon", 1e-5))
    return [y, mean, var, mean, var][: len(node.outputs)]


# ---- pooling and reductions -----------------------------------------------------------------


def _spatial(x) -> tuple[int, ...]:
    return tuple(range(2, x.dim()))


def _global_average_pool(node, xs):
    return xs[0].mean(_spatial(xs[0]), keepdim=True)


def _global_max_pool(node, xs):
    return xs[0].amax(_spatial(xs[0]), keepdim=True)


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _max_pool(node, xs):
    x = xs[0]
    kernel = _ints(node.attrs["kernel_shape"])
    strides, dilations, pads = _window(node, x, kernel)
    n = len(kernel)
    if not _symmetric(pads) or any(p > k // 2 for p, k in zip(pads, kernel * 2, strict=True)):
        x, pads = F.pad(x, _torch_pad(pads), value=-math.inf), [0] * (2 * n)
    ceil = bool(node.attrs.get("ceil_mode", 0))
    return _MAX_POOL[n](x, kernel, strides, pads[:n], dilations, ceil_mode=ceil)


def _average_pool(node, xs):
    x = xs[0]
    kernel = _ints(node.attrs["kernel_shape"])
    strides, _, pads = _window(node, x, kernel)
    n, pool = len(kernel), _AVG_POOL[len(kernel)]
    ceil = bool(node.attrs.get("ceil_mode", 0))
    include = bool(node.attrs.get("count_include_pad", 0))
    if _symmetric(pads) and all(p <= k // 2 for p, k in zip(pads, kernel * 2, strict=True)):
        return pool(x, kernel, strides, pads[:n], ceil_mode=ceil, count_include_pad=include)
    padded = F.pad(x, _torch_pad(pads))
    total = pool(padded, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    if include:
        return total
    ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(pads))
    return total / pool(ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)


def _reduce(fn):
    def handler(node, xs):
        x = xs[0]
        axes = _ints(_optional(xs, 1)) if "axes" not in node.attrs else _ints(node.attrs["axes"])
        if not axes:
            if node.attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, [_axis(a, x.dim()) for a in axes], bool(node.attrs.get("keepdims", 1)))

    return handler


def _reduce_mean(x, axes, keep):
    return x.mean(axes, keepdim=keep)


def _reduce_sum(x, axes, keep):
    return x.sum(axes, keepdim=keep)


def _reduce_max(x, axes, keep):
    return x.amax(axes, keepdim=keep)


def _reduce_min(x, axes, keep):
    return x.amin(axes, keepdim=keep)


# ---- shapes ---------------------------------------------------------------------------------


def _flatten(node, xs):
    x = xs[0]
    axis = _axis(node.attrs.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _reshape(node, xs):
    x, shape = xs[0], _ints(xs[1])
    if not node.attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _transpose(node, xs):
    x = xs[0]
    perm = _ints(node.attrs.get("perm")) or list(reversed(range(x.dim())))
    return x.permute(perm)


def _axes(node, xs) -> list[int]:
    return _ints(node.attrs["axes"]) if "axes" in node.attrs else _ints(_optional(xs, 1))


def _squeeze(node, xs):
    x, axes = xs[0], _axes(node, xs)
    if not axes:
        return x.squeeze()
    return x.squeeze(tuple(_axis(a, x.dim()) for a in axes))


def _unsqueeze(node, xs):
    x, axes = xs[0], _axes(node, xs)
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


def _concat(node, xs):
    return torch.cat([x for x in xs if x is not None], dim=node.attrs["axis"])


def _split(node, xs):
    x = xs[0]
    axis = _axis(node.attrs.get("axis", 0), x.dim())
    sizes = _ints(node.attrs["split"]) if "split" in node.attrs else _ints(_optional(xs, 1))
    if not sizes:
        parts = node.attrs.get("num_outputs", len(node.outputs))
        return list(torch.split(x, math.ceil(x.shape[axis] / parts), dim=axis))
    return list(torch.split(x, sizes, dim=axis))


def _slice(node, xs):
    x = xs[0]
    if node.opset < 10:
        starts, ends = _ints(node.attrs["starts"]), _ints(node.attrs["ends"])
        axes, steps = _ints(node.attrs.get("axes")), []
    else:
        starts, ends = _ints(xs[1]), _ints(xs[2])
        axes, steps = _ints(_optional(xs, 3)), _ints(_optional(xs, 4))
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis, size = _axis(axis, x.dim()), x.shape[_axis(axis, x.dim())]
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
            x = x[(slice(None),) * axis + (slice(start, end, step),)]
        else:
            start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
            index = torch.arange(start, end, step, device=x.device)
            x = x.index_select(axis, index)
    return x


def _gather(node, xs):
    data, indices = xs
    axis = _axis(node.attrs.get("axis", 0), data.dim())
    indices = torch.where(indices < 0, indices + data.shape[axis], indices).long()
    out = data.index_select(axis, indices.reshape(-1))
    return out.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1 :])


def _shape(node, xs):
    x = xs[0]
    start, end = node.attrs.get("start", 0), node.attrs.get("end", x.dim())
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64, device=x.device)


_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def _cast(node, xs):
    return xs[0].to(_DTYPES[node.attrs["to"]])


def _cast_like(node, xs):
    return xs[0].to(xs[1].dtype)


def _identity(node, xs):
    return xs[0]


def _dropout(node, xs):
    return [xs[0], torch.ones_like(xs[0], dtype=torch.bool)][: len(node.outputs)]


def _pad(node, xs):
    x = xs[0]
    if node.opset < 11:
        pads, value = _ints(node.attrs["pads"]), node.attrs.get("value", 0.0)
        axes = []
    else:
        pads, axes = _ints(xs[1]), _ints(_optional(xs, 3))
        value = _optional(xs, 2)
        value = 0.0 if value is None else value.reshape(-1)[0].item()
    axes = [_axis(a, x.dim()) for a in axes] or list(range(x.dim()))
    full = [0] * (2 * x.dim())
    for i, a in enumerate(axes):
        full[a], full[a + x.dim()] = pads[i], pads[i + len(axes)]
    return F.pad(x, _torch_pad(full), value=value)


def _constant_of_shape(node, xs):
    value = node.attrs.get("value")
    shape = _ints(xs[0])
    if value is None:
        return torch.zeros(shape, dtype=torch.float32, device=xs[0].device)
    return torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype, device=xs[0].device)


def _expand(node, xs):
    x = xs[0]
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(xs[1]))))


def _where(node, xs):
    return torch.where(xs[0], xs[1], xs[2])


def _binary(fn):
    return lambda node, xs: fn(xs[0], xs[1])


HANDLERS = {
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _pow,
    "Sqrt": _unary(torch.sqrt),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Erf": _unary(torch.erf),
    "Relu": _unary(F.relu),
    "LeakyRelu": _leaky_relu,
    "PRelu": _prelu,
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _unary(F.hardswish),
    "Clip": _clip,
    "Elu": _elu,
    "Selu": _selu,
    "Softplus": _unary(F.softplus),
    "Softsign": _unary(F.softsign),
    "Mish": _unary(F.mish),
    "Gelu": _gelu,
    "Softmax": _softmax_like(torch.softmax),
    "LogSoftmax": _softmax_like(torch.log_softmax),
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "GlobalAveragePool": _global_average_pool,
    "GlobalMaxPool": _global_max_pool,
    "AveragePool": _average_pool,
    "MaxPool": _max_pool,
    "ReduceMean": _reduce(_reduce_mean),
    "ReduceSum": _reduce(_reduce_sum),
    "ReduceMax": _reduce(_reduce_max),
    "ReduceMin": _reduce(_reduce_min),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Shape": _shape,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Identity": _identity,
    "Dropout": _dropout,
    "Pad": _pad,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Where": _where,
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "Not": _unary(torch.logical_not),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Min": _variadic(torch.minimum),
    "Max": _variadic(torch.maximum),
    "Sum": _variadic(torch.add),
}


# ---- the module -----------------------------------------------------------------------------


class _Constants(nn.Module):
    """Holds the buffers (a plain module: there is no BufferDict)."""


def _sanitize(name: str, taken: set[str]) -> str:
    key = re.sub(r"\W", "_", name) or "_"
    key = "_" + key if key[0].isdigit() else key
    base, i = key, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


def _default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return 1


_CONSTANT_ATTRS = {"value", "value_float", "value_floats", "value_int", "value_ints"}


def _unsupported(node: onnx.NodeProto) -> str | None:
    """Why `node` cannot run here (its op type, qualified), or None."""
    if node.domain not in ("", "ai.onnx"):
        return f"{node.domain}.{node.op_type}"
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return f"{node.op_type} (subgraphs)"
    if node.op_type not in HANDLERS and node.op_type != "Constant":
        return node.op_type
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        return "MaxPool (Indices output)"
    if node.op_type == "Pad" and attrs.get("mode", b"constant") not in (b"constant", "constant"):
        return f"Pad (mode={attrs['mode'].decode()})"
    if node.op_type == "Constant" and not _CONSTANT_ATTRS & set(attrs):
        return "Constant (string or sparse)"
    return None


def _refuse_unsupported(graph: onnx.GraphProto) -> None:
    first: dict[str, str] = {}
    for node in graph.node:
        reason = _unsupported(node)
        if reason is not None:
            first.setdefault(reason, node.name or node.output[0])
    if first:
        listed = ", ".join(f"{op} (node {name!r})" for op, name in first.items())
        raise CondenseError(f"cannot rebuild a torch module from this graph: unsupported ops {listed}")


def _constant_value(node: onnx.NodeProto) -> torch.Tensor:
    attr = node.attribute[0]
    if attr.name == "value":
        return _to_torch(numpy_helper.to_array(attr.t))
    value = onnx.helper.get_attribute_value(attr)
    dtype = torch.float32 if attr.name.startswith("value_float") else torch.int64
    return torch.tensor(value, dtype=dtype)


def _frozen_floats(graph: onnx.GraphProto) -> set[str]:
    """Float tensors kept as buffers: BN running statistics (followed back through Identity),
    Clip bounds and Pow exponents."""
    producer = {out: node for node in graph.node for out in node.output}
    frozen = set()
    for node in graph.node:
        positions = {"BatchNormalization": (3, 4), "Clip": (1, 2), "Pow": (1,)}.get(node.op_type, ())
        for i in positions:
            name = node.input[i] if i < len(node.input) else ""
            while name in producer and producer[name].op_type == "Identity":
                name = producer[name].input[0]
            frozen.add(name)
    return frozen


class OnnxModule(nn.Module):
    """Runs one ONNX graph with torch ops. Float initializers become nn.Parameters (trainable); integer
    initializers and shape constants are buffers/python constants. BatchNormalization runs with its running
    statistics (the exported eval semantics; its scale and bias are trainable, mean/var are buffers).

    Attributes:
        input_names (list[str]): the graph inputs fed by `forward`, in graph order (initializers
            listed as graph inputs are not among them).
        output_names (list[str]): the graph outputs, in graph order.
        weights (nn.ParameterDict): the trainable float initializers, by sanitized key.
        constants (nn.Module): the buffers: frozen initializers and Constant node values.
        initializer_names (dict[str, str]): parameter or buffer name (`weights.<key>`,
            `constants.<key>`) -> ONNX initializer name (Constant values are not listed).
    """

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        self._source = copy.deepcopy(model)
        if model.functions:
            model = onnx.inliner.inline_local_functions(model)
        graph = model.graph
        _refuse_unsupported(graph)
        opset = _default_opset(model)
        self.weights = nn.ParameterDict()
        self.constants = _Constants()
        self.initializer_names: dict[str, str] = {}
        self._slots: dict[str, str] = {}  # tensor name -> "weights.<key>" / "constants.<key>"
        taken: set[str] = set()
        frozen = _frozen_floats(graph)
        for tensor in graph.initializer:
            value = _to_torch(numpy_helper.to_array(tensor))
            trainable = value.dtype in _FLOAT_TYPES and value.dim() > 0 and tensor.name not in frozen
            self._store(tensor.name, value, trainable, taken)
        self._nodes: list[_Node] = []
        for node in graph.node:
            if node.op_type == "Constant":
                self._store(node.output[0], _constant_value(node), False, taken, initializer=False)
                continue
            attrs = {a.name: _attr_value(a) for a in node.attribute}
            for key in ("auto_pad", "approximate", "mode"):
                if isinstance(attrs.get(key), bytes):
                    attrs[key] = attrs[key].decode()
            self._nodes.append(
                _Node(node.op_type, node.name, list(node.input), list(node.output), attrs, opset)
            )
        initializers = {t.name for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initializers]
        self.output_names = [o.name for o in graph.output]

    def _store(self, name: str, value, trainable: bool, taken: set, initializer: bool = True) -> None:
        key = _sanitize(name, taken)
        if trainable:
            self.weights[key] = nn.Parameter(value)
            slot = f"weights.{key}"
        else:
            self.constants.register_buffer(key, value)
            slot = f"constants.{key}"
        self._slots[name] = slot
        if initializer:
            self.initializer_names[slot] = name

    def onnx_name(self, param_name: str) -> str:
        """The ONNX initializer behind a parameter or buffer name (`weights.<key>` or `<key>`)."""
        for prefix in ("", "weights.", "constants."):
            if prefix + param_name in self.initializer_names:
                return self.initializer_names[prefix + param_name]
        raise KeyError(param_name)

    def tensor(self, onnx_name: str) -> torch.Tensor:
        """The current value (parameter or buffer) of an initializer or Constant, by its ONNX name."""
        holder, key = self._slots[onnx_name].split(".", 1)
        return self.weights[key] if holder == "weights" else getattr(self.constants, key)

    def forward(self, *inputs):
        if len(inputs) != len(self.input_names):
            raise CondenseError(
                f"expected {len(self.input_names)} inputs ({self.input_names}), got {len(inputs)}"
            )
        env = {name: self.tensor(name) for name in self._slots}
        env.update(zip(self.input_names, inputs, strict=True))
        for node in self._nodes:
            xs = [env[name] if name else None for name in node.inputs]
            result = HANDLERS[node.op](node, xs)
            results = result if isinstance(result, (list, tuple)) else [result]
            for name, value in zip(node.outputs, results, strict=False):
                if name:
                    env[name] = value
        outputs = tuple(env[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs


def from_onnx(model: onnx.ModelProto) -> OnnxModule:
    """Rebuild `model` as a trainable `OnnxModule` (the model is not modified).

    Raises:
        CondenseError: naming every unsupported op type (and one node of each) in one message;
            nodes with subgraphs (If, Loop, Scan) are refused with the op named.
    """
    return OnnxModule(model)


def to_onnx(module: OnnxModule) -> onnx.ModelProto:
    """A copy of the source model with every initializer replaced by the module's current value
    (same names, same dtypes); the source model is never modified."""
    model = copy.deepcopy(module._source)
    for i, tensor in enumerate(model.graph.initializer):
        value = module.tensor(tensor.name).detach().cpu()
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        if value.dtype == torch.bfloat16:
            value = value.float()
        array = value.numpy().astype(dtype)
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, tensor.name))
    return model
