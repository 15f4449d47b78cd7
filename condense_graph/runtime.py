"""The one place that opens ONNX Runtime and runs onnx shape inference.

A model that fits one protobuf message (under `model_io.PROTOBUF_LIMIT` bytes, the package's one
limit, read at each call) goes to ONNX Runtime and to shape inference as bytes. A larger one cannot
be serialized: it is saved to a temporary directory with its tensors in an external-data file
(`model_io.external_copy`), and ONNX Runtime (`session`) or onnx
(`infer_shapes`, through `onnx.shape_inference.infer_shapes_path`) read it from there, the way
onnxscript's test utilities open large models.

ONNX Runtime's exceptions become one-line messages here (`one_line`): `session` raises
`SessionError`, a `CondenseError` whose `reason` is that line. Shape inference does not raise:
`infer_shapes` returns the model as it was and why inference failed, and the caller, who knows
what the failure costs, logs it with its module logger and lists it in its warnings (`degraded`).

Every session runs on the execution providers of `PROVIDERS` (CPU by default), a module-level
setting: `set_providers("cuda,cpu")` (the CLI's `--providers`) checks the names against
`onnxruntime.get_available_providers()` and sets it for calibration, verification, benchmarks and
the safety net's load check alike; `using_providers` sets it for a block and restores it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnxruntime as ort

from condense_graph import model_io
from condense_graph.errors import CondenseError

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
PROVIDERS = list(DEFAULT_PROVIDERS)  # what every session runs on; set by `set_providers`
SHORT_NAMES = {  # the CLI's short spellings, lower case
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}

logger = logging.getLogger(__name__)


class SessionError(CondenseError):
    """ONNX Runtime cannot load a model; `reason` is its complaint in one line."""

    def __init__(self, reason: str):
        super().__init__(f"ONNX Runtime cannot load the model: {reason}")
        self.reason = reason


def is_large(model: onnx.ModelProto) -> bool:
    """Whether the model is too large for one protobuf message (it must go through a file); the
    limit is model_io's, read now: no copy of it here that a lowered limit would miss."""
    return model_io.is_large(model)


@contextmanager
def path_if_large(model: onnx.ModelProto):
    """Context: None for a model under the protobuf limit, else the path of a temporary copy saved
    with external data (removed on exit)."""
    if not is_large(model):
        yield None
        return
    with model_io.external_copy(model, prefix="condense-runtime-") as path:
        # tensor bytes, not ByteSize(): upb raises EncodeError measuring a message over 2 GB
        logger.debug("model of %d tensor bytes goes through the file %s", model_io.tensor_bytes(model), path)
        yield path


def parse_providers(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """ONNX Runtime provider names from "cuda,cpu" or "CUDAExecutionProvider,CPUExecutionProvider"
    (either spelling, case-insensitive, a comma-separated string or a list), in order of preference.
    A provider that this onnxruntime does not have is a `CondenseError` naming the ones it has."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    available = ort.get_available_providers()
    by_lower = {name.lower(): name for name in available}
    chosen, missing = [], []
    for item in (i.strip() for i in items):
        if not item:
            continue
        full = SHORT_NAMES.get(item.lower(), item)
        name = by_lower.get(full.lower()) or by_lower.get(f"{item.lower()}executionprovider")
        if name is None:
            missing.append(item)
        elif name not in chosen:
            chosen.append(name)
    if missing or not chosen:
        what = ", ".join(missing) if missing else "none given"
        gpu = (
            " (CUDA and TensorRT need the onnxruntime-gpu package)"
            if "CUDAExecutionProvider" not in available
            else ""
        )
        raise CondenseError(
            f"execution provider(s) not available in this onnxruntime: {what}; available: "
            f"{', '.join(available)}{gpu}"
        )
    return chosen


def set_providers(spec: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Make every session of the package run on these providers (`parse_providers`; None: the
    default, CPU only); returns the list now in use."""
    PROVIDERS[:] = list(DEFAULT_PROVIDERS) if spec is None else parse_providers(spec)
    return list(PROVIDERS)


@contextmanager
def using_providers(spec: str | list[str] | tuple[str, ...] | None):
    """Context: `set_providers(spec)` inside, the previous providers restored on exit."""
    before = list(PROVIDERS)
    try:
        yield set_providers(spec)
    finally:
        PROVIDERS[:] = before


def quiet_runtime_logs() -> None:
    """ONNX Runtime's process-wide logger prints warnings (e.g. "UnsqueezeElimination cannot remove
    node") while it builds sessions, whatever the session's own severity: keep it to errors. The
    command line calls this; the library leaves the process's logger alone."""
    ort.set_default_logger_severity(3)


def session(model: onnx.ModelProto, threads: int = 0, arena: bool = True) -> ort.InferenceSession:
    """An ONNX Runtime session on `PROVIDERS` (CPU unless `set_providers` said otherwise;
    `threads` intra-op threads, 0: all cores; `arena`: ORT's CPU memory arena). Raises
    `SessionError` when ONNX Runtime cannot load the model."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = arena
    try:
        with path_if_large(model) as path:
            # ORT has read the external data once the session exists: the file may go
            source = str(path) if path else model.SerializeToString()
            return ort.InferenceSession(source, options, providers=list(PROVIDERS))
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
    # loading sets the default location explicitly: cleared, the bytes are the in-memory path's
    model_io.clear_default_locations(model)
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
