"""Verification: run the original and the reduced model in ONNX Runtime on the same inputs.

Inputs are random, drawn from the declared shapes and dtypes of the graph inputs; a dynamic
dimension is 1 unless `input_shapes` names it (the `name:d0,d1,...` form of onnxsim and
Polygraphy). Errors are reported per output and overall:
- max_abs_err: max |reduced - original|
- max_rel_err: max_abs_err / max |original|, the error relative to the output's scale
  (an element-wise ratio explodes on outputs that are near zero, such as ReLU outputs).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from condense_graph.errors import CondenseError


def parse_input_shape(spec: str) -> tuple[str, list[int]]:
    """'name:1,3,224' -> ('name', [1, 3, 224])."""
    name, sep, dims = spec.rpartition(":")
    try:
        shape = [int(d) for d in dims.split(",")]
    except ValueError:
        shape = None
    if not sep or not name or not shape or min(shape) < 0:
        raise CondenseError(f"bad --input-shape '{spec}': expected NAME:D0,D1,... with integers")
    return name, shape


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def random_feeds(model: onnx.ModelProto, input_shapes: dict[str, list[int]],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for value in graph_inputs(model):
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        shape = input_shapes.get(value.name) or [d.dim_value if d.HasField("dim_value") else 1
                                                  for d in tensor.shape.dim]
        feeds[value.name] = _random_array(rng, shape, dtype)
    return feeds


def _random_array(rng, shape, dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 10, shape).astype(dtype)


def session(model: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception classes
        raise CondenseError(f"ONNX Runtime cannot load the model: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def compare_models(original: onnx.ModelProto, reduced: onnx.ModelProto,
                   input_shapes: dict[str, list[int]] | None = None, runs: int = 4,
                   seed: int = 0) -> dict:
    """Max absolute and relative error of `reduced` against `original` over `runs` random draws."""
    input_shapes = dict(input_shapes or {})
    unknown = set(input_shapes) - {v.name for v in graph_inputs(original)}
    if unknown:
        raise CondenseError(f"--input-shape names no graph input: {', '.join(sorted(unknown))}")
    reference, candidate = session(original), session(reduced)
    names = [o.name for o in reference.get_outputs()]
    abs_err = dict.fromkeys(names, 0.0)
    scale = dict.fromkeys(names, 0.0)
    rng = np.random.default_rng(seed)
    for _ in range(runs):
        feeds = random_feeds(original, input_shapes, rng)
        try:
            expected, actual = reference.run(None, feeds), candidate.run(names, feeds)
        except Exception as err:  # noqa: BLE001
            raise CondenseError(f"ONNX Runtime failed to run the model: {_first_line(err)}") from None
        for name, e, a in zip(names, expected, actual):
            e64, a64 = np.asarray(e, dtype=np.float64), np.asarray(a, dtype=np.float64)
            abs_err[name] = max(abs_err[name], float(np.max(np.abs(e64 - a64), initial=0.0)))
            scale[name] = max(scale[name], float(np.max(np.abs(e64), initial=0.0)))
    outputs = {n: {"max_abs_err": abs_err[n], "max_rel_err": _ratio(abs_err[n], scale[n])}
               for n in names}
    return {
        "max_abs_err": max(abs_err.values(), default=0.0),
        "max_rel_err": max((o["max_rel_err"] for o in outputs.values()), default=0.0),
        "runs": runs,
        "outputs": outputs,
    }


def _ratio(err: float, scale: float) -> float:
    if err == 0.0:
        return 0.0
    return err / scale if scale > 0 else float("inf")

