"""Verification: run the original and the reduced model in ONNX Runtime on the same inputs.

Inputs are real data from an .npz file (arrays named after the graph inputs, run in batches) or
random, drawn from the declared shapes and dtypes of the graph inputs; a dynamic dimension is 1
unless `input_shapes` names it (the `name:d0,d1,...` form of onnxsim and Polygraphy).
Per output:
- max_abs_err: max |reduced - original|
- max_rel_err: max_abs_err / max |original|, the error relative to the output's scale
  (an element-wise ratio explodes on outputs that are near zero, such as ReLU outputs);
- cosine: cosine similarity of the flattened outputs;
- for class-score outputs ([batch, classes] made by Softmax/LogSoftmax or named like logits,
  probs, scores; every [batch, classes] output when labels are given): top1_agreement, and with
  labels accuracy_original and accuracy_reduced.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort

from condense_graph.errors import CondenseError
from condense_graph.progress import Progress, silent


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
    """An ONNX Runtime CPU session (`threads` intra-op threads, 0: all cores)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception classes
        raise CondenseError(f"ONNX Runtime cannot load the model: {_last_line(err)}") from None


def _last_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def compare_models(original: onnx.ModelProto, reduced: onnx.ModelProto,
                   input_shapes: dict[str, list[int]] | None = None, runs: int = 4,
                   seed: int = 0, data: dict[str, np.ndarray] | None = None,
                   labels: np.ndarray | None = None, batch_size: int = 256,
                   progress: Progress | None = None) -> dict:
    """Compare `reduced` with `original` on `data` (arrays named after the graph inputs) or, without
    data, on `runs` random draws. Returns the overall and per-output numbers (see module doc)."""
    input_shapes = dict(input_shapes or {})
    unknown = set(input_shapes) - {v.name for v in graph_inputs(original)}
    if unknown:
        raise CondenseError(f"--input-shape names no graph input: {', '.join(sorted(unknown))}")
    reference, candidate = session(original), session(reduced)
    names = [o.name for o in reference.get_outputs()]
    classes = class_score_outputs(original) if labels is None else set(names)
    stats = {name: OutputStats(name in classes) for name in names}
    if data is not None:
        batches = list(data_batches(original, data, batch_size))
    else:
        rng = np.random.default_rng(seed)
        batches = [random_feeds(original, input_shapes, rng) for _ in range(runs)]
    progress = progress or silent()
    progress.total, start = max(len(batches), 1), 0
    for feeds in batches:
        expected, actual = run_session(reference, feeds, None), run_session(candidate, feeds, names)
        rows = len(next(iter(feeds.values()))) if feeds else 1
        batch_labels = labels[start:start + rows] if labels is not None else None
        for name, e, a in zip(names, expected, actual):
            stats[name].add(np.asarray(e), np.asarray(a), batch_labels)
        start += rows
        progress.advance()
    progress.close()
    outputs = {name: s.summary() for name, s in stats.items()}
    return {
        "max_abs_err": max((o["max_abs_err"] for o in outputs.values()), default=0.0),
        "max_rel_err": max((o["max_rel_err"] for o in outputs.values()), default=0.0),
        "inputs": "data" if data is not None else "random",
        "runs": len(batches),
        "outputs": outputs,
    }


def run_session(sess: ort.InferenceSession, feeds: dict, names) -> list:
    """Run a session; ONNX Runtime's failures become one-line user errors."""
    try:
        return sess.run(names, feeds)
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception classes
        raise CondenseError(f"ONNX Runtime failed to run the model: {_last_line(err)}") from None


class OutputStats:
    """Running error numbers of one output over batches."""

    def __init__(self, class_scores: bool):
        self.abs_err = self.scale = self.dot = self.norm_e = self.norm_a = 0.0
        self.rows = self.agree = self.correct_e = self.correct_a = 0
        self.class_scores = class_scores
        self.labelled = False

    def add(self, expected: np.ndarray, actual: np.ndarray, labels: np.ndarray | None) -> None:
        e, a = expected.astype(np.float64), actual.astype(np.float64)
        self.abs_err = max(self.abs_err, float(np.max(np.abs(e - a), initial=0.0)))
        self.scale = max(self.scale, float(np.max(np.abs(e), initial=0.0)))
        self.dot += float(np.sum(e * a))
        self.norm_e += float(np.sum(e * e))
        self.norm_a += float(np.sum(a * a))
        self.class_scores &= looks_like_class_scores(expected)
        if self.class_scores:
            top_e, top_a = e.argmax(axis=1), a.argmax(axis=1)
            self.rows += len(e)
            self.agree += int(np.sum(top_e == top_a))
            if labels is not None:
                self.labelled = True
                self.correct_e += int(np.sum(top_e == labels))
                self.correct_a += int(np.sum(top_a == labels))

    def summary(self) -> dict:
        out = {"max_abs_err": self.abs_err, "max_rel_err": _ratio(self.abs_err, self.scale),
               "cosine": _cosine(self.dot, self.norm_e, self.norm_a)}
        if self.class_scores and self.rows:
            out["top1_agreement"] = self.agree / self.rows
            if self.labelled:
                out["accuracy_original"] = self.correct_e / self.rows
                out["accuracy_reduced"] = self.correct_a / self.rows
        return out


def looks_like_class_scores(output: np.ndarray) -> bool:
    """[batch, classes] floats with at least two classes."""
    return output.ndim == 2 and output.shape[1] >= 2 and np.issubdtype(output.dtype, np.floating)


_CLASS_NAMES = re.compile(r"logit|prob|score|class|label|pred", re.IGNORECASE)


def class_score_outputs(model: onnx.ModelProto) -> set[str]:
    """Outputs that are class scores by their producer (Softmax, LogSoftmax) or their name
    (logits, probs, scores...); a regression output of the same shape is not one."""
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    return {o.name for o in model.graph.output
            if producers.get(o.name) in ("Softmax", "LogSoftmax") or _CLASS_NAMES.search(o.name)}


def _cosine(dot: float, norm_e: float, norm_a: float) -> float:
    if norm_e == 0.0 and norm_a == 0.0:
        return 1.0
    if norm_e == 0.0 or norm_a == 0.0:
        return 0.0
    return dot / np.sqrt(norm_e * norm_a)


def load_data(path: str, model: onnx.ModelProto, labels_key: str | None = None):
    """Arrays named after the graph inputs from an .npz file, and the labels array if asked."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CondenseError(f"cannot read data file {path}: {err}") from None
    with archive:
        data = {}
        for value in graph_inputs(model):
            if value.name not in archive.files:
                raise CondenseError(f"{path} has no array '{value.name}' for graph input "
                                    f"'{value.name}' (it has: {', '.join(archive.files)})")
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            data[value.name] = archive[value.name].astype(dtype)
        labels = None
        if labels_key is not None:
            if labels_key not in archive.files:
                raise CondenseError(f"{path} has no labels array '{labels_key}'")
            labels = archive[labels_key].reshape(-1)
    check_lengths(path, data, labels)
    return data, labels


def check_lengths(path, data, labels) -> None:
    lengths = {len(a) for a in data.values()} | ({len(labels)} if labels is not None else set())
    if len(lengths) > 1:
        raise CondenseError(f"arrays in {path} have different lengths: {sorted(lengths)}")


def data_batches(model: onnx.ModelProto, data: dict[str, np.ndarray], batch_size: int):
    """Consecutive batches; a model whose batch dimension is fixed gets batches of that size."""
    fixed = [d.dim_value for v in graph_inputs(model) for d in v.type.tensor_type.shape.dim[:1]
             if d.HasField("dim_value")]
    size = fixed[0] if fixed else batch_size
    total = len(next(iter(data.values()))) if data else 0
    if fixed and total % size:
        raise CondenseError(f"the model takes batches of {size}; the data has {total} rows")
    for start in range(0, total, size):
        yield {name: values[start:start + size] for name, values in data.items()}


def breaches(verify: dict, atol: float | None, rtol: float | None,
             min_agreement: float | None) -> list[str]:
    """The tolerances a verification result breaks, in words (empty: it passes)."""
    failures = []
    for name, out in verify["outputs"].items():
        if atol is not None and out["max_abs_err"] > atol:
            failures.append(f"{name}: max_abs_err {out['max_abs_err']:.3g} > atol {atol:g}")
        if rtol is not None and out["max_rel_err"] > rtol:
            failures.append(f"{name}: max_rel_err {out['max_rel_err']:.3g} > rtol {rtol:g}")
        agreement = out.get("top1_agreement")
        if min_agreement is not None and agreement is not None and agreement < min_agreement:
            failures.append(f"{name}: top-1 agreement {agreement:.4f} < {min_agreement:g}")
    return failures


def _ratio(err: float, scale: float) -> float:
    if err == 0.0:
        return 0.0
    return err / scale if scale > 0 else float("inf")

