"""Verification: run the original and the reduced model in ONNX Runtime on the same inputs.

Inputs are real data from an .npz file (arrays named after the graph inputs, run in batches) or
random, drawn from the declared shapes and dtypes of the graph inputs (`input_shapes` sets a shape,
the `name:d0,d1,...` form of onnxsim and Polygraphy). A dynamic dimension of a random draw is
DEFAULT_BATCH (2) in position 0 (the batch) and DEFAULT_DIM (32) elsewhere: large enough for the
kernels and strides of a convolution stack or a sequence, small enough to run fast; dimensions with
the same symbolic name get the same size. An integer input that only indexes constant tables
(Gather, GatherElements) is drawn in [0, rows of the smallest table); any other integer input
needs real data (`CondenseError`, the input named), since random integers are rarely valid for it.
Per output:
- max_abs_err: max |reduced - original|
- max_rel_err: max_abs_err / max |original|, the error relative to the output's scale
  (an element-wise ratio explodes on outputs that are near zero, such as ReLU outputs);
- max_elem_rel_err: max |reduced - original| / (|original| + ELEMENT_EPS), the element-wise
  relative error (reported, not a default gate, for that reason);
- cosine: cosine similarity of the flattened outputs;
- nonfinite: elements that are NaN/Inf in the reduced output where the original is finite (or
  that differ from a non-finite original); any makes max_abs_err inf and fails verification;
- for class-score outputs ([batch, classes] made by Softmax/LogSoftmax or named like logits,
  probs, scores; every [batch, classes] output when labels or a minimum agreement are given):
  top1_agreement, and with labels accuracy_original and accuracy_reduced.

`breaches` judges a result against `Tolerances`. Verification fails by default, as Polygraphy's
does: unless overridden, an output must have max_rel_err <= DEFAULT_RTOL (1e-3) and cosine >=
DEFAULT_MIN_COSINE (0.9999). Every gate is written so that NaN fails it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import onnx

from condense_graph import runtime
from condense_graph.errors import CondenseError
from condense_graph.progress import Progress, silent
from condense_graph.protos import all_graphs

DEFAULT_RTOL = 1e-3  # largest max_rel_err (scale-relative) accepted by default
DEFAULT_MIN_COSINE = 0.9999  # smallest output cosine accepted by default
ELEMENT_EPS = 1e-6  # keeps outputs that are zero to rounding from dominating max_elem_rel_err
DEFAULT_BATCH = 2  # a dynamic batch dimension of a random draw (2: batch effects show)
DEFAULT_DIM = 32  # any other dynamic dimension of a random draw
LOOKUPS = {"Gather": "axis", "GatherElements": "axis"}  # ops whose input 1 indexes input 0


def parse_input_shape(spec: str) -> tuple[str, list[int]]:
    """'name:1,3,224' (or 'name:[1,3,224]', the onnxslim/Polygraphy spelling) -> ('name', [1, 3, 224])."""
    name, sep, dims = spec.rpartition(":")
    try:
        shape = [int(d) for d in dims.strip().strip("[]").split(",")]
    except ValueError:
        shape = None
    if not sep or not name or not shape or min(shape) < 0:
        raise CondenseError(f"bad --input-shape '{spec}': expected NAME:D0,D1,... with integers")
    return name, shape


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def default_shapes(model: onnx.ModelProto, batch: int = DEFAULT_BATCH) -> dict[str, list[int]]:
    """Declared input shapes with every dynamic dimension set: `batch` in position 0, DEFAULT_DIM
    elsewhere; a symbolic name seen before keeps the size it got first (shared dims agree)."""
    named: dict[str, int] = {}
    shapes = {}
    for value in graph_inputs(model):
        shape = []
        for position, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
                continue
            size = batch if position == 0 else DEFAULT_DIM
            if dim.dim_param:
                size = named.setdefault(dim.dim_param, size)
            shape.append(size)
        shapes[value.name] = shape
    return shapes


def random_feeds(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]],
    rng: np.random.Generator,
    strict: bool = True,
    batch: int = DEFAULT_BATCH,
) -> dict[str, np.ndarray]:
    """Random inputs of the declared (or `input_shapes`) shapes. Integer inputs that index constant
    tables get valid indices; other integer inputs are refused (`strict`) or drawn in [0, 10)."""
    shapes = default_shapes(model, batch) | dict(input_shapes)
    bounds = index_bounds(model)
    feeds = {}
    for value in graph_inputs(model):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        high = integer_high(value.name, dtype, bounds, strict)
        feeds[value.name] = _random_array(rng, shapes[value.name], dtype, high)
    return feeds


def check_random_draws(model: onnx.ModelProto) -> None:
    """Raise the CondenseError of `random_feeds` now, before a long reduction, if it would come."""
    bounds = index_bounds(model)
    for value in graph_inputs(model):
        integer_high(
            value.name,
            onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type),
            bounds,
            strict=True,
        )


def integer_high(name: str, dtype, bounds: dict[str, int | None], strict: bool) -> int:
    """Exclusive upper bound of random values for an integer input."""
    if not np.issubdtype(dtype, np.integer):
        return 0
    if name not in bounds:  # read by no node: any value will do
        return 10
    bound = bounds[name]
    if bound is not None:
        return bound
    if strict:
        raise CondenseError(
            f"cannot draw random values for integer input '{name}': it does not only "
            "index constant tables (Gather), so random integers may be invalid for it; "
            "give real inputs with --data"
        )
    return 10


def index_bounds(model: onnx.ModelProto) -> dict[str, int | None]:
    """For each graph input read by nodes: the number of rows of the smallest constant table it
    indexes when it only ever indexes constant tables (input 1 of Gather/GatherElements), else None."""
    tables = constant_shapes(model)
    bounds: dict[str, int | None] = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            rows = _lookup_rows(node, slot, tables)
            if name in bounds and bounds[name] is None:
                continue
            bounds[name] = None if rows is None else min(rows, bounds.get(name) or rows)
    for name in _read_by_subgraphs(model):
        bounds[name] = None
    return bounds


def _lookup_rows(node: onnx.NodeProto, slot: int, tables: dict[str, list[int]]) -> int | None:
    """Rows of the table that input `slot` of `node` indexes, or None when it is not such an index."""
    if node.op_type not in LOOKUPS or slot != 1 or node.input[0] not in tables:
        return None
    shape = tables[node.input[0]]
    axis = next((a.i for a in node.attribute if a.name == LOOKUPS[node.op_type]), 0)
    if not shape or not -len(shape) <= axis < len(shape) or shape[axis] < 1:
        return None
    return shape[axis]


def constant_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Shapes of the main graph's initializers and Constant node outputs."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
    return shapes


def _read_by_subgraphs(model: onnx.ModelProto) -> set[str]:
    """Names read inside If/Loop/Scan bodies (outer-scope reads are not lookups we understand)."""
    bodies = list(all_graphs(model.graph))[1:]  # the main graph comes first
    return {name for g in bodies for node in g.node for name in node.input}


def _random_array(rng, shape, dtype, high: int) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, high, shape).astype(dtype)


def compare_models(
    original: onnx.ModelProto,
    reduced: onnx.ModelProto,
    input_shapes: dict[str, list[int]] | None = None,
    runs: int = 4,
    seed: int = 0,
    data: dict[str, np.ndarray] | None = None,
    labels: np.ndarray | None = None,
    batch_size: int = 256,
    progress: Progress | None = None,
    all_class_scores: bool = False,
) -> dict:
    """Compare `reduced` with `original` on `data` (arrays named after the graph inputs) or, without
    data, on `runs` random draws. Returns the overall and per-output numbers (see module doc).
    Both run in ONNX Runtime sessions on `condense_graph.runtime.PROVIDERS`.

    Args:
        original (onnx.ModelProto): the reference model.
        reduced (onnx.ModelProto): the model to check (same inputs and outputs).
        input_shapes (dict[str, list[int]] | None, default None): shapes of the random draws
            (dynamic dims default to DEFAULT_BATCH for the batch, DEFAULT_DIM otherwise).
        runs (int, default 4): random draws without `data`.
        seed (int, default 0): seed of the random draws.
        data (dict[str, np.ndarray] | None, default None): real inputs, fed in batches.
        labels (np.ndarray | None, default None): 1-D class indices of `data`'s rows (accuracy).
        batch_size (int, default 256): rows per run with `data` (a fixed-batch model: its own).
        progress (Progress | None, default None): progress display.
        all_class_scores (bool, default False): every [batch, classes] float output counts as
            class scores (top-1 agreement).

    Returns:
        dict: inputs, runs, and per output max_abs_err, max_rel_err, max_elem_rel_err, cosine,
        nonfinite (+ top1_agreement and accuracies for class scores).

    Raises:
        CondenseError: an input shape names no graph input, or ONNX Runtime cannot load or run
            a model."""
    input_shapes = dict(input_shapes or {})
    unknown = set(input_shapes) - {v.name for v in graph_inputs(original)}
    if unknown:
        raise CondenseError(f"--input-shape names no graph input: {', '.join(sorted(unknown))}")
    reference, candidate = runtime.session(original), runtime.session(reduced)
    names = [o.name for o in reference.get_outputs()]
    every = labels is not None or all_class_scores
    classes = set(names) if every else class_score_outputs(original)
    stats = {name: OutputStats(name in classes) for name in names}
    if data is not None:
        batches = list(data_batches(original, data, batch_size))
    else:
        rng = np.random.default_rng(seed)
        batches = [random_feeds(original, input_shapes, rng) for _ in range(runs)]
    hint = "" if data is not None else " (set dynamic dimensions with --input-shape)"
    progress = progress or silent()
    progress.total, start = max(len(batches), 1), 0
    for feeds in batches:
        expected = runtime.run(reference, feeds, None, hint)
        actual = runtime.run(candidate, feeds, names, hint)
        rows = row_count(feeds)
        batch_labels = labels[start : start + rows] if labels is not None else None
        for name, e, a in zip(names, expected, actual, strict=True):
            stats[name].add(np.asarray(e), np.asarray(a), batch_labels)
        start += rows
        progress.advance()
    progress.close()
    outputs = {name: s.summary() for name, s in stats.items()}
    return {
        "max_abs_err": worst(o["max_abs_err"] for o in outputs.values()),
        "max_rel_err": worst(o["max_rel_err"] for o in outputs.values()),
        "max_elem_rel_err": worst(o["max_elem_rel_err"] for o in outputs.values()),
        "nonfinite": sum(o["nonfinite"] for o in outputs.values()),
        "inputs": "data" if data is not None else "random",
        "runs": len(batches),
        "rows": start,
        "outputs": outputs,
    }


def worst(values) -> float:
    """The largest value, NaN if any is NaN (Python's max(x, nan) would drop it)."""
    values = list(values)
    if any(math.isnan(v) for v in values):
        return float("nan")
    return max(values, default=0.0)


class OutputStats:
    """Running error numbers of one output over batches."""

    def __init__(self, class_scores: bool):
        self.abs_err = self.scale = self.elem_rel_err = self.dot = self.norm_e = self.norm_a = 0.0
        self.rows = self.agree = self.correct_e = self.correct_a = self.nonfinite = 0
        self.class_scores = class_scores
        self.labelled = False

    def add(self, expected: np.ndarray, actual: np.ndarray, labels: np.ndarray | None) -> None:
        e, a = expected.astype(np.float64), actual.astype(np.float64)
        finite = np.isfinite(e)
        self.nonfinite += count_nonfinite(e, a, finite)
        e_f, a_f = e[finite], a[finite]
        # a NaN in the reduced output where the original is finite is an infinitely large error
        diff = np.abs(e_f - a_f)
        diff[np.isnan(diff)] = np.inf
        self.abs_err = max(self.abs_err, float(np.max(diff, initial=0.0)))
        self.scale = max(self.scale, float(np.max(np.abs(e_f), initial=0.0)))
        with np.errstate(over="ignore"):  # an Inf error stays Inf
            elem = diff / (np.abs(e_f) + ELEMENT_EPS)
        self.elem_rel_err = max(self.elem_rel_err, float(np.max(elem, initial=0.0)))
        if not self.nonfinite:
            self.dot += float(np.sum(e_f * a_f))
            self.norm_e += float(np.sum(e_f * e_f))
            self.norm_a += float(np.sum(a_f * a_f))
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
        cosine = float("nan") if self.nonfinite else _cosine(self.dot, self.norm_e, self.norm_a)
        out = {
            "max_abs_err": self.abs_err,
            "max_rel_err": _ratio(self.abs_err, self.scale),
            "max_elem_rel_err": self.elem_rel_err,
            "cosine": cosine,
            "nonfinite": self.nonfinite,
        }
        if self.class_scores and self.rows:
            out["top1_agreement"] = self.agree / self.rows
            if self.labelled:
                out["accuracy_original"] = self.correct_e / self.rows
                out["accuracy_reduced"] = self.correct_a / self.rows
        return out


def count_nonfinite(e: np.ndarray, a: np.ndarray, finite: np.ndarray) -> int:
    """Elements where the reduced output is NaN/Inf and the original finite, or where a non-finite
    original value is not reproduced (Inf by the same Inf, NaN by NaN)."""
    broken = finite & ~np.isfinite(a)
    lost = ~finite & ~((a == e) | (np.isnan(a) & np.isnan(e)))
    return int(np.sum(broken) + np.sum(lost))


def looks_like_class_scores(output: np.ndarray) -> bool:
    """[batch, classes] floats with at least two classes."""
    return output.ndim == 2 and output.shape[1] >= 2 and np.issubdtype(output.dtype, np.floating)


_CLASS_NAMES = re.compile(r"logit|prob|score|class|label|pred", re.IGNORECASE)


def class_score_outputs(model: onnx.ModelProto) -> set[str]:
    """Outputs that are class scores by their producer (Softmax, LogSoftmax) or their name
    (logits, probs, scores...); a regression output of the same shape is not one."""
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    return {
        o.name
        for o in model.graph.output
        if producers.get(o.name) in ("Softmax", "LogSoftmax") or _CLASS_NAMES.search(o.name)
    }


def may_be_class_scores(model: onnx.ModelProto) -> list[str]:
    """Outputs whose declared type allows [batch, classes >= 2] floats (unknown shapes allow it)."""
    names = []
    for value in model.graph.output:
        tensor = value.type.tensor_type
        dims = tensor.shape.dim if tensor.HasField("shape") else None
        floating = np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type), np.floating)
        if floating and (
            dims is None or (len(dims) == 2 and not (dims[1].HasField("dim_value") and dims[1].dim_value < 2))
        ):
            names.append(value.name)
    return names


def check_agreement_applies(model: onnx.ModelProto) -> None:
    """--min-agreement must apply to some output: one whose declared type allows class scores."""
    if not may_be_class_scores(model):
        shapes = ", ".join(f"{o.name} {_declared(o)}" for o in model.graph.output)
        raise CondenseError(
            f"--min-agreement applies to no output: none is [batch, classes] float "
            f"class scores (outputs: {shapes})"
        )


def check_agreement_measured(verify: dict) -> None:
    """After the runs: some output must have had [batch, classes] values (top1_agreement)."""
    if not any("top1_agreement" in out for out in verify["outputs"].values()):
        raise CondenseError(
            "--min-agreement applies to no output: none produced [batch, classes] float "
            f"class scores (outputs: {', '.join(verify['outputs'])})"
        )


def _declared(value: onnx.ValueInfoProto) -> str:
    dims = value.type.tensor_type.shape.dim
    return (
        "["
        + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
        + "]"
    )


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
                raise CondenseError(
                    f"{path} has no array '{value.name}' for graph input "
                    f"'{value.name}' (it has: {', '.join(archive.files)})"
                )
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            data[value.name] = archive[value.name].astype(dtype)
            check_fits(value, data[value.name], path)
        labels = None
        if labels_key is not None:
            if labels_key not in archive.files:
                raise CondenseError(f"{path} has no labels array '{labels_key}'")
            labels = archive[labels_key]
            if labels.ndim != 1:
                raise CondenseError(f"labels must be 1-D class indices; got shape {labels.shape}")
    check_lengths(path, data, labels)
    return data, labels


def check_fits(value: onnx.ValueInfoProto, array: np.ndarray, source: str) -> None:
    """The array must fit the input's declared shape (rank, and every fixed dimension after the
    batch): said now, naming both shapes, instead of an ONNX Runtime error later."""
    dims = value.type.tensor_type.shape.dim
    if not value.type.tensor_type.HasField("shape"):
        return
    declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    fits = array.ndim == len(dims) and all(
        not isinstance(want, int) or want == got
        for want, got in zip(declared[1:], array.shape[1:], strict=True)
    )
    if array.ndim == 0 and not dims:
        return
    if not fits:
        wanted = "[" + ", ".join(str(d) for d in declared) + "]"
        raise CondenseError(
            f"array '{value.name}' in {source} has shape {tuple(array.shape)}; graph input "
            f"'{value.name}' expects {wanted}"
        )


def batched(values: np.ndarray) -> bool:
    """Arrays of rank >= 1 hold one row per sample; a 0-d input (a temperature, a flag) is not
    batched: every batch gets it whole."""
    return np.ndim(values) >= 1


def row_count(arrays: dict[str, np.ndarray]) -> int:
    """Rows of the batched arrays (1 when every input is 0-d, 0 when there are none)."""
    if not arrays:
        return 0
    return next((len(v) for v in arrays.values() if batched(v)), 1)


def check_lengths(path, data, labels) -> None:
    lengths = {len(a) for a in data.values() if batched(a)} | ({len(labels)} if labels is not None else set())
    if len(lengths) > 1:
        raise CondenseError(f"arrays in {path} have different lengths: {sorted(lengths)}")


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size a model's inputs declare (their first dimension), None when it is dynamic."""
    fixed = [
        d.dim_value
        for v in graph_inputs(model)
        for d in v.type.tensor_type.shape.dim[:1]
        if d.HasField("dim_value")
    ]
    return fixed[0] if fixed else None


def data_batches(model: onnx.ModelProto, data: dict[str, np.ndarray], batch_size: int):
    """Consecutive batches; a model whose batch dimension is fixed gets batches of that size."""
    fixed = fixed_batch(model)
    size = fixed or batch_size
    total = row_count(data)
    if fixed and total % size:
        raise CondenseError(f"the model takes batches of {size}; the data has {total} rows")
    for start in range(0, total, size):
        yield {
            name: values[start : start + size] if batched(values) else values for name, values in data.items()
        }


def split_holdout(data: dict[str, np.ndarray], fraction: float, multiple: int = 1):
    """(calibration rows, held-out rows): the last max(1, round(fraction * rows)) rows are held out
    (a multiple of `multiple`, the model's fixed batch size, so both parts run)."""
    total = row_count(data)
    held = max(1, round(fraction * total))
    held = max(multiple, round(held / multiple) * multiple)
    if total - held < multiple:
        raise CondenseError(
            f"verifying on held-out data needs rows for both calibration and "
            f"verification: the data has {total} row(s), at least {2 * multiple} "
            "are needed (or verify afterwards with `condense-graph verify`)"
        )
    cut = total - held
    return (
        {k: v[:cut] if batched(v) else v for k, v in data.items()},
        {k: v[cut:] if batched(v) else v for k, v in data.items()},
    )


@dataclass
class Tolerances:
    """What a verification result must meet. Gates left at their default are named in `defaults`
    (the FAIL and PASS lines say so); None switches a gate off."""

    atol: float | None = None
    rtol: float | None = DEFAULT_RTOL
    min_cosine: float | None = DEFAULT_MIN_COSINE
    min_agreement: float | None = None
    defaults: frozenset = field(default_factory=lambda: frozenset({"rtol", "min_cosine"}))

    @classmethod
    def given(cls, atol=None, rtol=None, min_cosine=None, min_agreement=None) -> Tolerances:
        """The user's tolerances; rtol and min_cosine not given keep their defaults."""
        defaults = frozenset(
            name for name, value in (("rtol", rtol), ("min_cosine", min_cosine)) if value is None
        )
        tolerances = cls(
            atol,
            DEFAULT_RTOL if rtol is None else rtol,
            DEFAULT_MIN_COSINE if min_cosine is None else min_cosine,
            min_agreement,
            defaults,
        )
        tolerances.check()
        return tolerances

    def check(self) -> None:
        for name, value, low, high in (
            ("--atol", self.atol, 0.0, math.inf),
            ("--rtol", self.rtol, 0.0, math.inf),
            ("--min-cosine", self.min_cosine, -1.0, 1.0),
            ("--min-agreement", self.min_agreement, 0.0, 1.0),
        ):
            if value is not None and not low <= value <= high:
                raise CondenseError(f"{name} must be between {low:g} and {high:g}, got {value!r}")

    def describe(self) -> str:
        """'rtol 0.001 (default), min-cosine 0.9999 (default), atol 0.01'."""
        parts = []
        for key, label in (
            ("rtol", "rtol"),
            ("min_cosine", "min-cosine"),
            ("atol", "atol"),
            ("min_agreement", "min-agreement"),
        ):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{label} {value:g}" + (" (default)" if key in self.defaults else ""))
        return ", ".join(parts) or "none"


def breaches(verify: dict, tolerances: Tolerances) -> list[str]:
    """The tolerances a verification result breaks, in words (empty: it passes). Comparisons are
    written `not (value within bound)` so that a NaN number fails."""
    failures = []
    for name, out in verify["outputs"].items():
        if out.get("nonfinite"):
            failures.append(f"{name}: {out['nonfinite']} NaN/Inf value(s) where the original is finite")
            continue
        failures += _output_breaches(name, out, tolerances)
    return failures


def _output_breaches(name: str, out: dict, tol: Tolerances) -> list[str]:
    failures = []
    if tol.atol is not None and not out["max_abs_err"] <= tol.atol:
        failures.append(f"{name}: max_abs_err {out['max_abs_err']:.3g} > atol {tol.atol:g}")
    if tol.rtol is not None and not out["max_rel_err"] <= tol.rtol:
        failures.append(f"{name}: max_rel_err {out['max_rel_err']:.3g} > rtol {tol.rtol:g}")
    if tol.min_cosine is not None and not out["cosine"] >= tol.min_cosine:
        failures.append(f"{name}: cosine {out['cosine']:.6f} < min-cosine {tol.min_cosine:g}")
    agreement = out.get("top1_agreement")
    if tol.min_agreement is not None and agreement is not None and not agreement >= tol.min_agreement:
        failures.append(f"{name}: top-1 agreement {agreement:.4f} < {tol.min_agreement:g}")
    return failures


def _ratio(err: float, scale: float) -> float:
    if err == 0.0:
        return 0.0
    return err / scale if scale > 0 else float("inf")
