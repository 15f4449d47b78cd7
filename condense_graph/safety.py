"""The safety net: a model condense-graph produced is checked before anyone gets it.

`check_output(model, original)` runs in `condense` before it returns (so before `reduce` writes
anything). The model must
1. pass `onnx.checker.check_model(full_check=True)` (the checker plus strict shape inference);
2. load in an ONNX Runtime CPU session;
3. hold only finite float weights: initializers and tensor attributes (Constant nodes) of the main
   graph and of every If/Loop/Scan body. Non-finite values the input itself holds or computes are
   the input's (an Inf Clip bound, a causal mask of -inf): a tensor passes when its values equal
   those of a tensor of the input (compared in float64, whatever the dtype: folding
   `CastLike(Constant(inf, double), x)` makes a float32 Inf), or when it is the folded value of a
   node output of the input. An array the pass wrote (`written`) never passes non-finite.
A failure is a bug of condense-graph and raises `InternalError` with one line naming the reason.
When the input model itself fails the same check, the failure is not ours: an input that fails
check 1 cannot give a valid output (`CondenseError`, exit 2); check 2 is waived when the input does
not load in ONNX Runtime either (it has no CPU kernels for most bfloat16 ops), and the returned
dict says so.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx
from onnx import numpy_helper

from condense_graph import runtime
from condense_graph.errors import CondenseError, InternalError
from condense_graph.protos import all_graphs, all_tensors

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}
BUG = "internal error (a bug in condense-graph, please report it)"

logger = logging.getLogger(__name__)


def check_output(
    model: onnx.ModelProto,
    original: onnx.ModelProto,
    warnings: list | None = None,
    written: set[str] = frozenset(),
) -> dict:
    """Raise unless `model` is valid, loads in ONNX Runtime and has finite weights (module doc);
    `written` names the arrays the pass computed.
    Returns what was checked: {"checker": "full", "onnxruntime": "loads" | "waived: ...",
    "finite_weights": True}. A waived check is logged and added to `warnings`."""
    checker_error = checker_failure(model)
    if checker_error is not None:
        if checker_failure(original) is not None:
            raise CondenseError(
                f"the input model fails onnx.checker's full check, so no valid output "
                f"can be written: {checker_error}"
            )
        raise InternalError(
            f"{BUG}: the reduced model fails onnx.checker (full check): {checker_error}; nothing was written"
        )
    loads = runtime_status(model, original)
    if loads != "loads":
        runtime.degraded(logger, warnings, f"ONNX Runtime check {loads}")
    broken = nonfinite_tensors(model, original, written)
    if broken:
        raise InternalError(
            f"{BUG}: the reduced model has NaN/Inf weights ({', '.join(broken)}); nothing was written"
        )
    return {"checker": "full", "onnxruntime": loads, "finite_weights": True}


def runtime_status(model: onnx.ModelProto, original: onnx.ModelProto) -> str:
    error = runtime_failure(model)
    if error is None:
        return "loads"
    if runtime_failure(original) is not None:
        return f"waived: the input model does not load in ONNX Runtime either ({error})"
    raise InternalError(f"{BUG}: ONNX Runtime cannot load the reduced model: {error}; nothing was written")


def checker_failure(model: onnx.ModelProto) -> str | None:
    """The first line of onnx.checker's full-check complaint, or None when the model passes."""
    try:
        with runtime.path_if_large(model) as path:
            onnx.checker.check_model(str(path) if path else model, full_check=True)
    except Exception as err:  # noqa: BLE001 - ValidationError, InferenceError, ValueError (size)...
        return runtime.one_line(err, last=False)
    return None


def runtime_failure(model: onnx.ModelProto) -> str | None:
    """Why ONNX Runtime cannot create a CPU session for the model, or None when it can."""
    try:
        runtime.session(model, threads=1)
    except runtime.SessionError as err:
        return err.reason
    return None


def nonfinite_tensors(
    model: onnx.ModelProto, original: onnx.ModelProto, written: set[str] = frozenset()
) -> list[str]:
    """Names of float tensors holding NaN/Inf that are not the input's (module doc, check 3)."""
    inherited = None  # what the input holds and computes, gathered only when needed
    broken = []
    for tensor in all_tensors(model.graph):
        if tensor.data_type not in FLOAT_TYPES:
            continue
        values = numpy_helper.to_array(tensor).astype(np.float64)
        bad = int(np.sum(~np.isfinite(values)))
        if not bad:
            continue
        if inherited is None:
            inherited = inherited_values(original)
        prints, computed = inherited
        ours = tensor.name in written
        if ours or (fingerprint(tensor) not in prints and tensor.name not in computed):
            broken.append(f"'{tensor.name or 'unnamed'}': {bad} of {values.size} values")
    return broken


def inherited_values(original: onnx.ModelProto) -> tuple[set, set[str]]:
    """Fingerprints of the input's float tensors and scalar float attributes (`value_float(s)` of
    Constant nodes), and the names of its node outputs, whose folded values the input computes."""
    prints = {fingerprint(t) for t in all_tensors(original.graph) if t.data_type in FLOAT_TYPES}
    computed = set()
    for graph in all_graphs(original.graph):
        for node in graph.node:
            computed.update(node.output)
            for attr in node.attribute:
                if attr.type in (onnx.AttributeProto.FLOAT, onnx.AttributeProto.FLOATS):
                    values = [attr.f] if attr.type == onnx.AttributeProto.FLOAT else list(attr.floats)
                    prints.add(fingerprint(numpy_helper.from_array(np.array(values, np.float64))))
    return prints, computed


def fingerprint(tensor: onnx.TensorProto) -> tuple:
    """Size and a digest of the values in float64: equal for tensors holding the same numbers,
    whatever their name, dtype or (broadcast-equivalent) shape."""
    values = numpy_helper.to_array(tensor).astype(np.float64).reshape(-1)
    return values.size, hashlib.sha256(values.tobytes()).hexdigest()
