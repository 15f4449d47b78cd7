"""The one place that opens ONNX Runtime and runs onnx shape inference.

A model that fits one protobuf message (under `PROTOBUF_LIMIT` bytes) goes to ONNX Runtime and to
shape inference as bytes. A larger one cannot be serialized: it is saved to a temporary directory
with its tensors in an external-data file, and ONNX Runtime (`session`) or onnx
(`infer_shapes`, through `onnx.shape_inference.infer_shapes_path`) read it from there, the way
onnxscript's test utilities open large models.

ONNX Runtime's exceptions become one-line messages here (`one_line`): `session` raises
`SessionError`, a `CondenseError` whose `reason` is that line. Shape inference does not raise:
`infer_shapes` returns the model as it was and why inference failed, and the caller, who knows
what the failure costs, logs it with its module logger and lists it in its warnings (`degraded`).
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnxruntime as ort

from condense_graph import model_io
from condense_graph.errors import CondenseError
from condense_graph.protos import all_tensors

# one protobuf message holds at most this many bytes; the same limit as model_io's (tests lower it)
PROTOBUF_LIMIT = model_io.PROTOBUF_LIMIT
PROVIDERS = ["CPUExecutionProvider"]

logger = logging.getLogger(__name__)


class SessionError(CondenseError):
    """ONNX Runtime cannot load a model; `reason` is its complaint in one line."""

    def __init__(self, reason: str):
        super().__init__(f"ONNX Runtime cannot load the model: {reason}")
        self.reason = reason


def is_large(model: onnx.ModelProto) -> bool:
    """Whether the model is too large for one protobuf message (it must go through a file)."""
    return model.ByteSize() >= PROTOBUF_LIMIT


@contextmanager
def path_if_large(model: onnx.ModelProto):
    """Context: None for a model under the protobuf limit, else the path of a temporary copy saved
    with external data (removed on exit)."""
    if not is_large(model):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="condense-runtime-", ignore_cleanup_errors=True) as directory:
        path = Path(directory) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # onnx.save rewrites the tensors it externalizes
        onnx.save(
            copy,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="model.onnx.data",
            size_threshold=1024,
        )
        logger.debug("model of %d bytes goes through the file %s", model.ByteSize(), path)
        yield path


def quiet_runtime_logs() -> None:
    """ONNX Runtime's process-wide logger prints warnings (e.g. "UnsqueezeElimination cannot remove
    node") while it builds sessions, whatever the session's own severity: keep it to errors. The
    command line calls this; the library leaves the process's logger alone."""
    ort.set_default_logger_severity(3)


def session(model: onnx.ModelProto, threads: int = 0, arena: bool = True) -> ort.InferenceSession:
    """An ONNX Runtime CPU session (`threads` intra-op threads, 0: all cores; `arena`: ORT's CPU
    memory arena). Raises `SessionError` when ONNX Runtime cannot load the model."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = arena
    try:
        with path_if_large(model) as path:
            # ORT has read the external data once the session exists: the file may go
            source = str(path) if path else model.SerializeToString()
            return ort.InferenceSession(source, options, providers=PROVIDERS)
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception classes
        raise SessionError(one_line(err)) from None


def run(sess: ort.InferenceSession, feeds: dict, names, hint: str = "") -> list:
    """Run a session; ONNX Runtime's failures become one-line `CondenseError`s."""
    try:
        return sess.run(names, feeds)
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception classes
        raise CondenseError(f"ONNX Runtime failed to run the model: {one_line(err)}{hint}") from None


def infer_shapes(model: onnx.ModelProto, data_prop: bool = False) -> tuple[onnx.ModelProto, str | None]:
    """(the model with inferred shapes, None), or (`model` itself, why inference failed)."""
    try:
        with path_if_large(model) as path:
            if path is None:
                return onnx.shape_inference.infer_shapes(model, data_prop=data_prop), None
            return _infer_shapes_path(path, data_prop), None
    except Exception as err:  # noqa: BLE001 - InferenceError, ValidationError, ValueError...
        return model, one_line(err, last=False)


def _infer_shapes_path(path: Path, data_prop: bool) -> onnx.ModelProto:
    inferred = path.with_name("inferred.onnx")  # beside the data file its tensors point to
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred), data_prop=data_prop)
    model = onnx.load(str(inferred))  # external data loaded back into the tensors
    for tensor in all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.DEFAULT:
            # loading sets the default explicitly: cleared, the bytes are those of the in-memory path
            tensor.ClearField("data_location")
    return model


def one_line(err: Exception, last: bool = True) -> str:
    """An exception's message in one line: its last line (ONNX Runtime puts the reason there) or
    its first (onnx's checker and shape inference put it there)."""
    text = str(err).strip().splitlines()
    if not text:
        return type(err).__name__
    return text[-1] if last else text[0]


def degraded(log: logging.Logger, warnings: list | None, message: str) -> None:
    """A degraded path was taken: log it and add it to the caller's warnings (when it keeps any)."""
    log.warning("%s", message)
    if warnings is not None and message not in warnings:
        warnings.append(message)
