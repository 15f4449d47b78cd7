"""The Python API: one straight line, load -> analyze -> plan -> rewrite -> verify.

    result = condense_graph.condense("model.onnx", threshold=0.95)
    result.model   # onnx.ModelProto, smaller
    result.report  # dict, the same data as `condense-graph reduce --report`
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from condense_graph.calibration import Calibration, load_calibration
from condense_graph.errors import CondenseError
from condense_graph.model_io import load_model
from condense_graph.progress import Progress
from condense_graph.report import build_report, count_params
from condense_graph.verify import compare_models
from passes.condense_channels import CondenseChannelsPass

INSPECT_THRESHOLDS = (0.8, 0.9, 0.95, 0.99, 0.999)

ModelLike = str | os.PathLike | onnx.ModelProto


@dataclass
class CondenseResult:
    model: onnx.ModelProto
    report: dict
    plans: list = field(default_factory=list, repr=False)  # per-layer plans (groups, for plots)


def condense(model: ModelLike, threshold: float = 0.95,
             layer_thresholds: dict[str, float] | None = None, verify: bool = False,
             input_shapes: dict[str, list[int]] | None = None,
             progress: Progress | None = None, round_to: int = 1,
             calibration: str | os.PathLike | dict | None = None, similarity: str = "weights",
             layer_widths: dict[str, int] | None = None, target_params: float | None = None) -> CondenseResult:
    """Merge condensed neurons of every reducible layer; the input model is never modified.

    `layer_thresholds` maps a layer (its producer node name or weight name) to its own threshold.
    `round_to` rounds every new width up to a multiple of it (8 or 16 suit CPU GEMM kernels).
    `calibration` (an .npz path or a dict of arrays named after the graph inputs) turns on the
    data-aware merge: consumers are refit by least squares on the calibration activations, and
    `similarity="activations"` groups neurons by their activations instead of their weights;
    `similarity="magnitude"` is the pruning baseline (keep the largest neurons, drop the rest).
    `layer_widths` asks for a width per layer (the threshold that lands on it is found);
    `target_params` (a fraction of the original parameters) picks those widths for every layer.
    With `verify`, both models run in ONNX Runtime on random inputs and the report gets `verify`.
    """
    _check_threshold(threshold, "threshold")
    for name, value in (layer_thresholds or {}).items():
        _check_threshold(value, f"threshold of layer '{name}'")
    if not isinstance(round_to, int) or round_to < 1:
        raise CondenseError(f"round_to must be a positive integer, got {round_to!r}")
    original = load_model(model)
    data = _calibration(calibration, original, similarity)
    if similarity == "magnitude" and not layer_widths and target_params is None:
        raise CondenseError("magnitude pruning needs layer widths or target_params")
    widths = dict(layer_widths or {})
    _check_widths(widths, target_params)
    fraction = None
    if target_params is not None:
        fraction, target_widths = widths_for_params(original, target_params, widths, similarity)
        widths = target_widths | widths
    result = CondenseChannelsPass(threshold, layer_thresholds, progress, round_to, data, widths,
                                  similarity)(original)
    plans = result.details["plans"]
    report = build_report(original, result.model, plans, result.details["skipped"])
    if target_params is not None:
        report["target_params"] = {"requested": target_params, "width_fraction": fraction,
                                   "achieved": report["params_after"] / report["params_before"]}
    if verify:
        report["verify"] = compare_models(original, result.model, input_shapes)
    return CondenseResult(result.model, report, plans)


def inspect(model: ModelLike, thresholds=INSPECT_THRESHOLDS) -> dict:
    """Every reducible layer with the width `condense` would give it at each threshold."""
    for t in thresholds:
        _check_threshold(t, "threshold")
    original = load_model(model)
    graph, analysis = CondenseChannelsPass.analyze(original)
    widths = {}
    for t in thresholds:  # a fresh plan per threshold: layers depend on the ones before them
        plans, _ = CondenseChannelsPass(t).plan(graph, analysis)
        for plan in plans:
            widths.setdefault(plan.layer.name, {})[str(t)] = plan.cmap.width_after
    layers = [{"name": layer.name, "op": layer.producer.node.op, "activation": layer.activation,
               "width": layer.producer.width, "exact": layer.homogeneous,
               "widths": widths[layer.name]} for layer in analysis.layers]
    return {"params": count_params(original), "thresholds": list(thresholds), "layers": layers,
            "skipped": [{"name": s.name, "reason": s.reason} for s in analysis.skipped]}


def widths_for_params(model: onnx.ModelProto, target: float, fixed: dict[str, int],
                      similarity: str = "weights", steps: int = 14) -> tuple[float, dict[str, int]]:
    """Widths round(r * width) for every layer, with r found by bisection so that the reduced model
    keeps about `target` of the parameters (layers in `fixed` keep their requested width). Each
    step plans the reduction on one analysis of the model and counts parameters from the plan."""
    graph, analysis = CondenseChannelsPass.analyze(model)
    before = count_params(model)
    # sizes from the analyzed graph, where Constant nodes have become initializers
    sizes = {name: int(t.values.size) for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    selection = "magnitude" if similarity == "magnitude" else "weights"
    free = [layer for layer in analysis.layers
            if layer.name not in fixed and layer.producer.weight.name not in fixed]

    def widths_at(r: float) -> dict[str, int]:
        return {layer.name: max(1, round(r * layer.producer.width)) for layer in free}

    def fraction_at(r: float) -> float:
        condense = CondenseChannelsPass(1.0, layer_widths=widths_at(r) | fixed, similarity=selection)
        _, store = condense.plan(graph, analysis, model)
        delta = sum(values.size - sizes.get(name, 0) for name, values in store.changed.items())
        return (before + delta) / before

    low, high = 0.0, 1.0
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if fraction_at(mid) <= target else (low, mid)
    return low, widths_at(low)


def _check_widths(widths: dict, target: float | None) -> None:
    for name, width in widths.items():
        if not isinstance(width, int) or width < 1:
            raise CondenseError(f"width of layer '{name}' must be a positive integer, got {width!r}")
    if target is not None and not 0.0 < target <= 1.0:
        raise CondenseError(f"target_params is a fraction of the parameters in (0, 1], got {target!r}")


def _calibration(source, model: onnx.ModelProto, similarity: str) -> Calibration | None:
    if similarity not in ("weights", "activations", "magnitude"):
        raise CondenseError(f"similarity must be 'weights', 'activations' or 'magnitude', got {similarity!r}")
    if source is None:
        if similarity == "activations":
            raise CondenseError("similarity 'activations' needs calibration data")
        return None
    if isinstance(source, dict):
        from condense_graph.verify import check_lengths, graph_inputs
        missing = {v.name for v in graph_inputs(model)} - set(source)
        if missing:
            raise CondenseError(f"calibration data has no array for input(s): {', '.join(sorted(missing))}")
        dtypes = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
                  for v in graph_inputs(model)}
        data = {k: np.asarray(v).astype(dtypes[k]) for k, v in source.items() if k in dtypes}
        check_lengths("the calibration data", data, None)
        return Calibration(data)
    return load_calibration(str(source), model)


def _check_threshold(value: float, what: str) -> None:
    if not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
        raise CondenseError(f"{what} must be a cosine between -1 and 1, got {value!r}")
