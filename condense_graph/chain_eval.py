"""Evaluate a per-channel chain of nodes on chosen channel values with ONNX Runtime.

Half-precision chains run in float32 (float16 and bfloat16 models are analyzed in float32; ONNX
Runtime has no bfloat16 kernels for most ops on CPU); float64 stays float64.

The merge math needs numbers the graph computes per channel: the scale and shift of the affine
ops around the activation, and the constant a dead channel outputs. Rather than re-implement every
activation, we cut the chain out as a tiny model (with the current, possibly already reduced,
constants) and let ONNX Runtime run it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from condense_graph import runtime
from condense_graph.errors import InternalError

_HALF = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def float32_if_half(values: np.ndarray) -> np.ndarray:
    """float16 and bfloat16 arrays as float32 (the precision the math runs in); others as they are."""
    half = values.dtype == np.float16 or str(values.dtype) == "bfloat16"
    return values.astype(np.float32) if half else values


def evaluate_chain(
    nodes: list[gs.Node],
    source: gs.Tensor,
    sink: gs.Tensor,
    arrays: Mapping[str, np.ndarray],
    x: np.ndarray,
    versions: tuple[int, int],
) -> np.ndarray:
    """Run `nodes` from `source` to `sink` on `x` ([rows, width, 1...]); return [rows, width].

    `versions` is the (opset, IR version) of the model the nodes come from.
    """
    if not nodes:
        return x.reshape(x.shape[0], -1)
    x = x.astype(np.float32) if x.dtype != np.float64 else x
    tensors: dict[str, gs.Tensor] = {source.name: gs.Variable(source.name, dtype=x.dtype)}
    copies = [_copy(n, tensors, arrays) for n in nodes]
    graph = gs.Graph(
        nodes=copies,
        inputs=[tensors[source.name]],
        outputs=[tensors[sink.name]],
        opset=versions[0],
        ir_version=versions[1],
    )
    tensors[sink.name].dtype = x.dtype
    try:
        session = runtime.session(gs.export_onnx(graph), threads=1)
    except runtime.SessionError as err:  # we cut the chain out: a chain ORT refuses is our bug
        raise InternalError(
            f"internal error (a bug in condense-graph, please report it): ONNX Runtime "
            f"cannot run the chain {source.name} -> {sink.name}: {err.reason}"
        ) from None
    (out,) = session.run(None, {source.name: x})
    return np.asarray(out).reshape(x.shape[0], -1)  # constants of rank 3 add leading 1s


def _copy(node: gs.Node, tensors: dict, arrays: Mapping[str, np.ndarray]) -> gs.Node:
    copy = gs.Node(
        op=node.op,
        name=node.name,
        attrs=dict(node.attrs),
        domain=node.domain,
        inputs=[_tensor(t, tensors, arrays) for t in node.inputs],
        outputs=[_tensor(t, tensors, arrays) for t in node.outputs],
    )
    if node.op == "Conv" and node.attrs.get("group", 1) > 1:  # depthwise: one group per kernel
        copy.attrs["group"] = len(copy.inputs[1].values)
    if node.op == "Cast" and copy.attrs.get("to") in _HALF:
        copy.attrs["to"] = onnx.TensorProto.FLOAT
    return copy


def _tensor(t: gs.Tensor, tensors: dict[str, gs.Tensor], arrays: Mapping[str, np.ndarray]) -> gs.Tensor:
    if not t.name:
        return gs.Variable.empty()
    if t.name not in tensors:
        if isinstance(t, gs.Constant):
            values = np.asarray(arrays[t.name] if t.name in arrays else t.values)
            tensors[t.name] = gs.Constant(t.name, float32_if_half(values))
        else:
            tensors[t.name] = gs.Variable(t.name)
    return tensors[t.name]


def affine_coefficients(
    nodes: list[gs.Node],
    source: gs.Tensor,
    sink: gs.Tensor,
    arrays: Mapping[str, np.ndarray],
    probe_shape: tuple,
    dtype,
    versions,
):
    """Scale s and shift t of an affine per-channel chain: chain(x) = s * x + t.

    `probe_shape` is the shape of one probe row: (width,) or (width, 1, 1) for [N, C, H, W] data.
    """
    probe = np.stack([np.zeros(probe_shape), np.ones(probe_shape)]).astype(dtype)
    out = evaluate_chain(nodes, source, sink, arrays, probe, versions).astype(np.float64)
    return out[1] - out[0], out[0]
