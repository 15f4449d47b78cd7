"""Loading and saving ONNX models, safely.

Loading accepts a path or an `onnx.ModelProto` and never modifies the caller's object. It refuses,
with one line naming the problem: a missing or unreadable file, a truncated protobuf, an empty
graph, a model that fails onnx.checker, an opset older than 7 or newer than the installed onnx
knows, and external data whose location leaves the model's directory (`../`, absolute paths,
symbolic links): nothing outside the directories the user named is ever read.

Non-finite values are not refused at load: an Inf Clip bound (`torch.clamp(min=...)`) is
legitimate, and NaN or Inf in other tensors is the user's model, left as it is. A layer whose
weights the merge would read or write hold NaN or Inf is skipped by the analysis, which names the
tensor (`condense_graph.analysis.nonfinite_reason`).

Saving writes to temporary files in the destination directory and renames them into place, so an
interrupted run leaves the old file or the new one, never half of one. Models over the 2 GB
protobuf limit (or with `external_data=True`) are saved with their weights in `<name>.data`.

`PROTOBUF_LIMIT` is the one limit of the package: saving, validation and `condense_graph.runtime`
read it at call time through `is_large`, so a test that lowers it (monkeypatch) sends every path of
a small model the way of a large one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError

from condense_graph.errors import CondenseError
from condense_graph.protos import all_tensors

MIN_OPSET = 7
PROTOBUF_LIMIT = 2**31 - 1  # bytes one protobuf message can hold; read at call time (tests lower it)
SMALL_TENSOR = 128  # sys.getsizeof of raw_data (about 95 data bytes): smaller stay in the model file


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Return a private, validated copy of the model with its external data loaded.

    Args:
        source (str | os.PathLike | onnx.ModelProto): a path to an .onnx file (its external data
            is read from the file's directory) or a model (copied, never modified).
    Raises:
        CondenseError: the file is missing, unreadable or the model invalid (one line)."""
    return load_model_and_layout(source)[0]


def load_model_and_layout(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """`load_model`, and whether the file kept its weights in external data (False for a model
    given in memory): saving the result the same way keeps the input's layout."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        validate(model)
        return model, False
    model, external = _read(Path(source))
    validate(model, Path(source) if external else None)
    clear_default_locations(model)
    return model, external


def _read(path: Path) -> tuple[onnx.ModelProto, bool]:
    """The model with its external data loaded, and whether it had any."""
    if not path.is_file():
        raise CondenseError(f"no such file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as err:
        raise CondenseError(f"{path} is not a readable ONNX model ({type(err).__name__})") from None
    external = uses_external_data(model)
    if external:
        check_external_locations(model, path.parent)
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as err:
            raise CondenseError(f"cannot read the external data of {path}: {err}") from None
    return model, external


def clear_default_locations(model: onnx.ModelProto) -> None:
    """Clear `data_location` where it says DEFAULT (tensor bytes in the message). onnx sets it
    explicitly when it loads external data; cleared, a model read from a file with external data
    has the bytes of the same model read from one file, whichever way it went since."""
    for tensor in all_tensors(model.graph):
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.DEFAULT:
            tensor.ClearField("data_location")


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(model.graph))


def check_external_locations(model: onnx.ModelProto, base: Path) -> None:
    """Every external-data file must lie inside `base`, reached without leaving it."""
    root = base.resolve()
    for tensor in all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = (base / location).resolve()
        if os.path.isabs(location) or ".." in Path(location).parts or not target.is_relative_to(root):
            raise CondenseError(
                f"external data of '{tensor.name}' points outside the model's "
                f"directory ({location!r}): refused"
            )


def validate(model: onnx.ModelProto, external_path: Path | None = None) -> None:
    """Refuse empty graphs, unsupported opsets and checker failures (non-finite values are
    judged per layer by the analysis). A model read with external data is checked from its path
    (which handles > 2 GB)."""
    if not model.graph.node:
        raise CondenseError("the model's graph is empty (no nodes)")
    _check_opset(model)
    try:
        if external_path is not None:
            onnx.checker.check_model(str(external_path))
        elif is_large(model):  # onnx refuses to check a > 2 GB message in memory
            with external_copy(model) as path:
                onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "invalid model"
        raise CondenseError(f"model fails onnx.checker: {first}") from None


def _check_opset(model: onnx.ModelProto) -> None:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise CondenseError("the model imports no default ONNX opset")
    newest = onnx.defs.onnx_opset_version()
    if versions[0] < MIN_OPSET:
        raise CondenseError(f"opset {versions[0]} is older than {MIN_OPSET}, the oldest supported")
    if versions[0] > newest:
        raise CondenseError(
            f"opset {versions[0]} is newer than the installed onnx knows ({newest}); upgrade onnx"
        )


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool = False) -> int:
    """Write `model` atomically to `path`; return the size in bytes of what was written (model
    file + data file): the report's `file_size_after`.

    Weights go to `<name>.data` beside the model when asked or when the model would exceed
    the 2 GB protobuf limit (tensors under `SMALL_TENSOR` bytes stay in the model file unless the
    model is that large: ONNX Runtime reads axes and shapes at load from the model only). The
    data file gets the model file's permissions (onnx creates it readable by its owner only),
    which are those of any file the user creates (umask).

    Args:
        model (onnx.ModelProto): the model to write (not modified).
        path (str | os.PathLike): the .onnx file; its directory must exist.
        external_data (bool, default False): weights in `<name>.data` even under 2 GB.
    Raises:
        CondenseError: the directory is missing or not writable."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CondenseError(f"output directory does not exist: {path.parent}")
    external = external_data or is_large(model)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as err:
        raise CondenseError(f"cannot write in {path.parent}: {err.strerror}") from None
    try:
        # below the protobuf limit, tiny tensors (axes, shapes, Resize scales: ONNX Runtime's shape
        # inference cannot read them from a data file) stay in the model; weights go to the data
        files = _write(model, staging / path.name, external, 0 if is_large(model) else SMALL_TENSOR)
        mode = (staging / path.name).stat().st_mode & 0o777
        for name in files:
            os.chmod(staging / name, mode)
        for name in sorted(files, key=lambda n: n == path.name):  # data first, model last
            os.replace(staging / name, path.parent / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sum((path.parent / name).stat().st_size for name in files)


def is_large(model: onnx.ModelProto) -> bool:
    """Whether the model is too large for one protobuf message (`PROTOBUF_LIMIT`, read now): it
    must be written with its tensors in an external-data file."""
    if tensor_bytes(model) >= PROTOBUF_LIMIT:
        return True
    try:
        return model.ByteSize() >= PROTOBUF_LIMIT
    except EncodeError:  # upb cannot even measure a message over 2 GB
        return True


@contextmanager
def external_copy(model: onnx.ModelProto, prefix: str = "condense-") -> Iterator[Path]:
    """Context: the path of a temporary copy of `model` with every tensor in `model.onnx.data`
    beside it (the directory is removed on exit). `model` itself is left as it was."""
    with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as directory:
        path = Path(directory) / "model.onnx"
        _write(model, path, external=True)
        yield path


def _write(model: onnx.ModelProto, target: Path, external: bool, size_threshold: int = 0) -> list[str]:
    if not external:
        onnx.save(model, str(target))
        return [target.name]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    data = f"{target.name}.data"
    onnx.save(
        copy,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data,
        size_threshold=size_threshold,
    )
    return [target.name] + ([data] if (target.parent / data).exists() else [])


def serialized_size(model: onnx.ModelProto) -> int:
    """The model's size in bytes: its serialized size, or for a model too large for one protobuf
    message (which upb cannot even measure) the bytes of its tensors, nearly all of it."""
    if is_large(model):
        return tensor_bytes(model)
    return model.ByteSize()


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data the model holds in memory (computable at any size, unlike ByteSize)."""
    return sum(len(t.raw_data) for t in all_tensors(model.graph))
