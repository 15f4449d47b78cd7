"""The safety net: a model condense-graph produced is checked before anyone gets it.

`check_output(model, original)` runs in `condense` before it returns (so before `reduce` writes
anything). The model must
1. pass `onnx.checker.check_model(full_check=True)` (the checker plus strict shape inference);
2. load in an ONNX Runtime CPU session;
3. hold only finite float weights: initializers and tensor attributes (Constant nodes) of the main
   graph and of every If/Loop/Scan body, except tensors whose values equal those of a tensor of the
   input model (an input may legitimately hold an Inf Clip bound; we did not make it). Values are
   compared in float64, whatever the dtype: folding `CastLike(Constant(inf, double), x)` turns the
   input's double Inf into a float32 one.
A failure is a bug of condense-graph and raises `InternalError` with one line naming the reason.
When the input model itself fails the same check, the failure is not ours: an input that fails
check 1 cannot give a valid output (`CondenseError`, exit 2); check 2 is waived when the input does
not load in ONNX Runtime either (it has no CPU kernels for most bfloat16 ops), and the returned
dict says so.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from condense_graph import model_io
from condense_graph.errors import CondenseError, InternalError

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16}
BUG = "internal error (a bug in condense-graph, please report it)"


def check_output(model: onnx.ModelProto, original: onnx.ModelProto) -> dict:
    """Raise unless `model` is valid, loads in ONNX Runtime and has finite weights (module doc).
    Returns what was checked: {"checker": "full", "onnxruntime": "loads" | "waived: ...",
    "finite_weights": True}."""
    checker_error = checker_failure(model)
    if checker_error is not None:
        if checker_failure(original) is not None:
            raise CondenseError(f"the input model fails onnx.checker's full check, so no valid output "
                                f"can be written: {checker_error}")
        raise InternalError(f"{BUG}: the reduced model fails onnx.checker (full check): {checker_error}; "
                            "nothing was written")
    runtime = runtime_status(model, original)
    broken = nonfinite_tensors(model, original)
    if broken:
        raise InternalError(f"{BUG}: the reduced model has NaN/Inf weights ({', '.join(broken)}); "
                            "nothing was written")
    return {"checker": "full", "onnxruntime": runtime, "finite_weights": True}


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
        with _as_path_if_large(model) as path:
            onnx.checker.check_model(str(path) if path else model, full_check=True)
    except Exception as err:  # noqa: BLE001 - ValidationError, InferenceError, ValueError (size)...
        return _first_line(err)
    return None


def runtime_failure(model: onnx.ModelProto) -> str | None:
    """Why ONNX Runtime cannot create a CPU session for the model, or None when it can."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    try:
        with _as_path_if_large(model) as path:
            source = str(path) if path else model.SerializeToString()
            ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception classes
        return _last_line(err)
    return None


def nonfinite_tensors(model: onnx.ModelProto, original: onnx.ModelProto) -> list[str]:
    """Names of float tensors holding NaN/Inf whose values are not those of an input tensor."""
    inherited = None  # fingerprints of the input's tensors, computed only when needed
    broken = []
    for tensor in all_tensors(model.graph):
        if tensor.data_type not in FLOAT_TYPES:
            continue
        values = numpy_helper.to_array(tensor).astype(np.float64)
        bad = int(np.sum(~np.isfinite(values)))
        if not bad:
            continue
        if inherited is None:
            inherited = {fingerprint(t) for t in all_tensors(original.graph) if t.data_type in FLOAT_TYPES}
        if fingerprint(tensor) not in inherited:
            broken.append(f"'{tensor.name or 'unnamed'}': {bad} of {values.size} values")
    return broken


def fingerprint(tensor: onnx.TensorProto) -> tuple:
    """Size and a digest of the values in float64: equal for tensors holding the same numbers,
    whatever their name, dtype or (broadcast-equivalent) shape."""
    values = numpy_helper.to_array(tensor).astype(np.float64).reshape(-1)
    return values.size, hashlib.sha256(values.tobytes()).hexdigest()


def all_tensors(graph: onnx.GraphProto):
    """Initializers and tensor attributes of `graph` and of every subgraph in it."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from all_tensors(attr.g)
            for sub in attr.graphs:
                yield from all_tensors(sub)


class _as_path_if_large:
    """Context: None for a model that fits a protobuf message, else the path of a temporary copy
    saved with external data (the checker and ONNX Runtime read such models from files)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.directory = None

    def __enter__(self) -> Path | None:
        if self.model.ByteSize() < model_io.PROTOBUF_LIMIT:
            return None
        self.directory = tempfile.TemporaryDirectory(prefix="condense-check-")
        path = Path(self.directory.name) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(self.model)  # onnx.save rewrites the tensors it externalizes
        onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=1024)
        return path

    def __exit__(self, *exc) -> None:
        if self.directory is not None:
            self.directory.cleanup()


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _last_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__
