"""Loading and saving ONNX models.

Loading accepts a path or an `onnx.ModelProto` and never modifies the caller's object. Saving
writes to a temporary file in the destination directory and renames it into place, so an
interrupted run leaves either the old file or the new one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from condense_graph.errors import CondenseError


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Return a private copy of the model, checked by onnx.checker."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
    else:
        model = _read(Path(source))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "invalid model"
        raise CondenseError(f"model fails onnx.checker: {first}") from None
    return model


def _read(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise CondenseError(f"no such file: {path}")
    try:
        return onnx.load(str(path))
    except (DecodeError, RuntimeError, ValueError) as err:
        raise CondenseError(f"{path} is not a readable ONNX model ({type(err).__name__})") from None


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    """Write `model` atomically to `path`; return the file size in bytes."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CondenseError(f"output directory does not exist: {path.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.stat().st_size


def serialized_size(model: onnx.ModelProto) -> int:
    """Bytes the model takes as one protobuf file."""
    return model.ByteSize()
