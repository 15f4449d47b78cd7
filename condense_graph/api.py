"""The Python API: one straight line, load -> analyze -> plan -> rewrite -> check -> verify.

result = condense_graph.condense("model.onnx", threshold=0.95)
result.model   # onnx.ModelProto, smaller
result.report  # dict, the same data as `condense-graph reduce --report`
result.save("small.onnx")  # atomic; report["file_size_after"] becomes the bytes written

Messages of a `CondenseError` name the API's parameters (`target_params`); the command line
shows them under its flags (`FLAGS`: `--target-params`), so one message serves both.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from condense_graph.allocate import Budget, allocate, removal_curves
from condense_graph.analysis import Analysis
from condense_graph.calibration import Calibration, load_calibration
from condense_graph.coupled import prepare
from condense_graph.errors import CondenseError
from condense_graph.graph import subgraph_tensor_names
from condense_graph.groups import find_groups, group_entry, summarize
from condense_graph.model_io import load_model, load_model_and_layout, save_model
from condense_graph.progress import Progress
from condense_graph.report import build_report, count_params
from condense_graph.safety import check_output
from condense_graph.selectors import AUTO, DEFAULT, Selector, StructuredOBS, choose, get_selector
from condense_graph.verify import (
    check_agreement_applies,
    check_random_draws,
    compare_models,
    fixed_batch,
    split_holdout,
)
from passes.condense_channels import (
    CondenseChannelsPass,
    CondenseChannelsResult,
    CondenseOptions,
    unit_keys,
    unit_width,
    unit_widths,
)

logger = logging.getLogger(__name__)

INSPECT_THRESHOLDS = (0.8, 0.9, 0.95, 0.99, 0.999)
HOLDOUT_FRACTION = 0.2  # with calibration data and verify: the last 20% of the rows verify
MIN_WIDTH_FRACTION = 0.1  # target_params never cuts a layer below 10% of its width

ModelLike = str | os.PathLike | onnx.ModelProto

FLAGS = {  # API parameter named in messages: the CLI flag that sets it (the CLI shows the flag)
    "layer_thresholds": "--layer",
    "layer_widths": "--layer-width",
    "target_params": "--target-params",
    "target_macs": "--target-macs",
    "max_error": "--max-error",
    "round_to": "--round-to",
    "holdout": "--holdout",
    "min_width_fraction": "--min-width-fraction",
    "all_class_scores": "--min-agreement",
}


@dataclass
class CondenseResult:
    """What `condense` returns.

    Attributes:
        model (onnx.ModelProto): the reduced model (the input is never modified).
        report (dict): the same data as `condense-graph reduce --report`: params_before,
            params_after, file_size_before, file_size_after, layers, skipped, warnings, method,
            output_checks (+ verify, allocation or target_params when asked).
        plans (list): the per-layer plans (the groups merged; `condense_graph.plots` reads them).
        external_data (bool, default False): whether the input file kept its weights in external
            data; `save` keeps that layout unless told otherwise.

    `report["file_size_after"]` is the size in bytes of the reduced model as `save` writes it
    (model file plus data file): before `save`, the size of a one-file save (the serialized size;
    the tensor bytes above the 2 GB limit); after `save`, the bytes written. The CLI's table, JSON
    report and bench read the same number.
    """

    model: onnx.ModelProto
    report: dict
    plans: list = field(default_factory=list, repr=False)  # per-layer plans (groups, for plots)
    external_data: bool = False

    def save(self, path: str | os.PathLike, external_data: bool | None = None) -> int:
        """Write the model atomically to `path` (`condense_graph.model_io.save_model`: temporary
        files renamed into place, the checker already passed); return the bytes written, which
        become `report["file_size_after"]`.

        Args:
            path (str | os.PathLike): the output .onnx file; its directory must exist.
            external_data (bool | None, default None): True puts the weights in `<path>.data`;
                None keeps the input's layout (`self.external_data`). A model over the 2 GB
                protobuf limit always gets the data file.
        Raises:
            CondenseError: the directory is missing or not writable."""
        external = self.external_data if external_data is None else external_data
        size = save_model(self.model, path, external)
        self.report["file_size_after"] = size
        return size


def condense(
    model: ModelLike,
    threshold: float = 0.95,
    layer_thresholds: dict[str, float] | None = None,
    verify: bool = False,
    input_shapes: dict[str, list[int]] | None = None,
    progress: Progress | None = None,
    round_to: int = 1,
    calibration: str | os.PathLike | dict | None = None,
    similarity: str | None = None,
    layer_widths: dict[str, int] | None = None,
    target_params: float | None = None,
    holdout: float = HOLDOUT_FRACTION,
    min_width_fraction: float = MIN_WIDTH_FRACTION,
    all_class_scores: bool = False,
    method: str | Selector = AUTO,
    target_macs: float | None = None,
    max_error: float | None = None,
) -> CondenseResult:
    """Merge condensed neurons of every reducible layer; the input model is never modified.

    Args:
        model (str | os.PathLike | onnx.ModelProto): an .onnx path (external data read from its
            directory) or a model in memory.
        threshold (float, default 0.95): cosine similarity at or above which neurons merge.
        layer_thresholds (dict[str, float] | None, default None): a layer (its producer node name
            or weight name) to its own threshold.
        verify (bool, default False): run both models in ONNX Runtime; the report gets `verify`,
            on random inputs or, with `calibration`, on its last `holdout` fraction of rows, which
            then do not calibrate.
        input_shapes (dict[str, list[int]] | None, default None): shapes of graph inputs for the
            random draws of `verify` (dynamic dims default to 1 for the batch, 8 otherwise).
        progress (Progress | None, default None): progress display (`condense_graph.progress`).
        round_to (int, default 1): every new width rounded up to a multiple of it (8 or 16 suit
            CPU GEMM kernels), requested widths too (never above the layer's width).
        calibration (str | os.PathLike | dict | None, default None): an .npz path or a dict of
            arrays named after the graph inputs; turns on the data-aware merge (consumers refit by
            least squares on the calibration activations).
        similarity (str | None, default None): the deprecated spelling of `method` ("weights" is
            "condense").
        layer_widths (dict[str, int] | None, default None): a width per layer (the threshold that
            lands on it is found).
        target_params (float | None, default None): the fraction of the original parameters to
            keep: one width fraction for all layers without data, per-layer widths chosen globally
            by their OBS costs with it (`condense_graph.allocate`).
        holdout (float, default 0.2): with data and `verify` or `max_error`: the last fraction of
            the rows that measure and do not calibrate.
        min_width_fraction (float, default 0.1): no layer is cut below this fraction of its width
            (a CondenseError when the budget cannot be reached then).
        all_class_scores (bool, default False): every [batch, classes] output is class scores
            (top-1 agreement is measured).
        method (str | Selector, default "auto"): the rule (`condense_graph.selectors`): "auto" is
            "obs" with calibration data (exact merges, then structured OBS, then the refit) and
            "condense" (the paper's merge) without; "activations" groups by activation cosine;
            "magnitude" is the pruning baseline (keep the largest neurons, needs widths); a
            `Selector` object is used as given (`StructuredOBS(damping)`).
        target_macs (float | None, default None): like `target_params` for the multiply-
            accumulates (needs data).
        max_error (float | None, default None): the smallest model whose held-out max_rel_err
            stays within it (needs data). At most one of target_params, target_macs, max_error.

    Returns:
        CondenseResult: the model, the report (`report["warnings"]` lists every degraded path
        taken, e.g. shape inference failed; empty when none) and the plans; `save` writes it.

    Raises:
        CondenseError: bad input or options (messages name the API parameters; the CLI shows
            its flags).
        InternalError: the reduced model fails `condense_graph.safety.check_output` (full
            onnx.checker, ONNX Runtime loads it, finite weights): a bug of condense-graph.
    """
    _check_options(threshold, layer_thresholds, round_to, holdout, min_width_fraction)
    original, external = load_model_and_layout(model)
    if verify and all_class_scores:
        check_agreement_applies(original)
    selector = _selector(method, similarity, calibration is not None)
    budget = _budget(target_params, target_macs, max_error, calibration is not None, selector)
    data, held = _split_for_verification(
        _calibration(calibration, original, selector), original, verify or max_error is not None, holdout
    )
    options, target = _pass_options(
        original,
        threshold,
        layer_thresholds,
        selector,
        round_to,
        data,
        layer_widths,
        target_params,
        min_width_fraction,
    )
    result = None
    if budget is not None and selector.needs_consumer_statistics:  # widths chosen per layer
        options, target, result = _allocated_options(
            original, options, budget, held, min_width_fraction, progress
        )
    result = result or CondenseChannelsPass(options, progress)(original)
    report = _reduction_report(original, result, data, target, selector)
    if verify:
        report["verify"] = _verification(original, result.model, input_shapes, data, held, all_class_scores)
    return CondenseResult(result.model, report, result.plans, external)


def _pass_options(
    model: onnx.ModelProto,
    threshold: float,
    layer_thresholds: dict[str, float] | None,
    selector: Selector,
    round_to: int,
    data: Calibration | None,
    layer_widths: dict[str, int] | None,
    target_params: float | None,
    min_width_fraction: float,
) -> tuple[CondenseOptions, dict | None]:
    """The pass's options, with the width of every layer that gets one, and the target's report
    entry (None without `target_params`). The one place condense builds its rule and options.
    With a rule that allocates widths globally (OBS), `target_params` is left to
    `_allocated_options`."""
    if selector.needs_width and not layer_widths and target_params is None:
        raise CondenseError(f"{selector.label} needs layer widths (--layer-width) or target_params")
    _check_widths(dict(layer_widths or {}), target_params)
    uniform = None if selector.needs_consumer_statistics else target_params
    widths, target = planned_widths(
        model, dict(layer_widths or {}), uniform, round_to, selector.name, min_width_fraction
    )
    options = CondenseOptions(threshold, layer_thresholds or {}, widths, selector, round_to, data)
    return options, target


def _selector(method: str | Selector, similarity: str | None, with_data: bool) -> Selector:
    """The rule: `method`, or the deprecated `similarity` when given."""
    if similarity is not None:
        warnings.warn("similarity= is deprecated; use method=", DeprecationWarning, stacklevel=3)
        method = similarity
    return choose(method, with_data)


def _budget(target_params, target_macs, max_error, with_data: bool, selector: Selector) -> Budget | None:
    """The size or error budget asked for (at most one), checked: target_macs and max_error are
    met by the global allocation, which needs data and structured OBS."""
    given = [v is not None for v in (target_params, target_macs, max_error)]
    if sum(given) > 1:
        raise CondenseError("give one of target_params, target_macs and max_error")
    for name, value in (("target_macs", target_macs), ("max_error", max_error)):
        if value is not None and not with_data:
            raise CondenseError(f"{name} needs calibration data (--data)")
        if value is not None and not selector.needs_consumer_statistics:
            raise CondenseError(
                f"{name} needs method 'obs' (--method; the default with --data), not '{selector.name}'"
            )
    if target_macs is not None and not 0.0 < target_macs <= 1.0:
        raise CondenseError(f"target_macs is a fraction of the MACs in (0, 1], got {target_macs!r}")
    if max_error is not None and not (isinstance(max_error, (int, float)) and max_error > 0):
        raise CondenseError(f"max_error must be a positive relative error, got {max_error!r}")
    return Budget(target_params, target_macs, max_error) if any(given) else None


def _allocated_options(
    model: onnx.ModelProto,
    options: CondenseOptions,
    budget: Budget,
    held,
    min_fraction: float,
    progress: Progress | None = None,
) -> tuple[CondenseOptions, dict, object]:
    """`options` with per-layer widths allocated globally to meet `budget` (`allocate.allocate`),
    the report entry, and the pass's result at those widths when the search computed it. Each
    step tried is a line of `progress` (`Progress.say`). Coupled channel groups are allocated with
    the layers, on their OBS curves over all their consumers; one without a curve is sized apart
    (`grouped_options`)."""
    graph, analysis = CondenseChannelsPass.analyze(model)
    fixed = set(options.layer_widths)
    floors = {
        unit.name: width_floor(unit_width(unit), min_fraction, options.round_to)
        for unit in analysis.layers + analysis.groups
        if not any(key in fixed for key in unit_keys(unit))
    }
    curves = removal_curves(model, options.calibration, options.selector, floors, progress)
    measured = {curve.name for curve in curves}
    unmeasured = [g for g in analysis.groups if g.name in floors and g.name not in measured]
    options = grouped_options(model, options, budget, min_fraction, (graph, analysis), unmeasured)
    say = progress.say if progress is not None else None
    widths, entry, result = allocate(model, budget, options, held, curves, say)
    if budget.error is None and not entry["steps"][-1]["accepted"]:
        last = entry["steps"][-1]  # the written model at the widths found: every layer at its floor
        raise CondenseError(
            f"{budget.what} {entry['requested']:g} cannot be reached without cutting a layer below "
            f"{min_fraction:g} of its width (--min-width-fraction): the smallest reachable is "
            f"{last['value']:.3f}"
        )
    return replace(options, layer_widths=dict(options.layer_widths) | widths), entry, result


def grouped_options(model, options: CondenseOptions, budget: Budget, min_fraction: float, analyzed, groups):
    """`options` with targets fixed for the coupled `groups` the allocation has no OBS curve for
    (`allocate.removal_curves`: a consumer too wide to gather): for a size budget, the width the
    data-free uniform search (`widths_for_params`) gives the group for the same fraction of the
    parameters (for target_macs too: a stand-in); for an error budget, its exact multiples only
    (threshold 1.0). Each is logged; the entry of `report["layers"]` says how it was merged."""
    if not groups:
        return options
    for group in groups:
        logger.warning("channel group %s: no OBS cost curve; sized by the uniform width search", group.name)
    if budget.error is not None:
        exact = {g.name: 1.0 for g in groups if not any(k in options.layer_thresholds for k in unit_keys(g))}
        return replace(options, layer_thresholds=exact | dict(options.layer_thresholds))
    _, analysis = analyzed
    target = budget.params if budget.params is not None else budget.macs
    fixed = _rounded_widths(dict(options.layer_widths), analysis, options.round_to)
    search = width_search(model, fixed, DEFAULT, options.round_to, min_fraction, analyzed)
    if fraction_at(search, 0.0) > target:  # the allocation says what is reachable
        r = 0.0
    else:
        r, _ = widths_for_params(
            model,
            target,
            fixed,
            DEFAULT,
            round_to=options.round_to,
            min_fraction=min_fraction,
            analyzed=analyzed,
        )
    widths = widths_at(search, r)
    return replace(
        options, layer_widths=dict(options.layer_widths) | {g.name: widths[g.name] for g in groups}
    )


def _reduction_report(
    original: onnx.ModelProto,
    result: CondenseChannelsResult,
    data: Calibration | None,
    target: dict | None,
    selector: Selector,
) -> dict:
    """The report of the pass's `result`: layers, params, file sizes, output checks, warnings (the
    pass's, then the calibration's) and the target's entry with the fraction achieved. Raises
    `InternalError` when the reduced model fails the output checks."""
    warnings = list(result.warnings) + (data.warnings if data is not None else [])
    # checked before the report is built: a failing model gets no report, and checks add warnings
    checks = check_output(result.model, original, warnings, result.written)
    report = build_report(original, result.model, result.plans, result.skipped)
    report["output_checks"] = checks
    report["warnings"] = warnings
    report["method"] = selector.name
    if isinstance(selector, StructuredOBS):
        report["obs_damping"] = selector.damping
    if target is not None and "by" in target:  # a global allocation (`allocate`)
        achieved = {"params_fraction": report["params_after"] / report["params_before"]}
        report["allocation"] = target | achieved
    elif target is not None:
        report["target_params"] = target | {"achieved": report["params_after"] / report["params_before"]}
    return report


def _verification(
    original: onnx.ModelProto,
    reduced: onnx.ModelProto,
    input_shapes: dict[str, list[int]] | None,
    data: Calibration | None,
    held: dict | None,
    all_class_scores: bool,
) -> dict:
    """The report's `verify` entry: both models compared on the held-out rows, or on random draws
    when there is no data."""
    numbers = compare_models(original, reduced, input_shapes, data=held, all_class_scores=all_class_scores)
    if held is not None:
        numbers |= {"inputs": "held-out data", "calibration_rows": data.samples}
    return numbers


def _split_for_verification(
    data: Calibration | None, model: onnx.ModelProto, verify: bool, holdout: float
) -> tuple[Calibration | None, dict | None]:
    """(what calibrates, what verifies): with data and verify, the last `holdout` rows verify and
    do not calibrate (verifying on calibration rows would flatter the refit). Without data,
    verification draws random inputs: an input they cannot serve is refused now, not after the
    reduction."""
    if not verify:
        return data, None
    if data is None:
        check_random_draws(model)
        return None, None
    calibrate, held = split_holdout(data.data, holdout, fixed_batch(model) or 1)
    return Calibration(calibrate, data.batch_size), held


def inspect(model: ModelLike, thresholds=INSPECT_THRESHOLDS) -> dict:
    """Every reducible layer and coupled channel group with the width `condense` would give it at
    each threshold, and every channel group (`condense_graph.groups`), with why it is left alone
    when it is.

    Args:
        model (str | os.PathLike | onnx.ModelProto): an .onnx path or a model (not modified).
        thresholds (tuple[float, ...], default (0.8, 0.9, 0.95, 0.99, 0.999)): the cosine
            thresholds to list widths at.

    Returns:
        dict: params, thresholds, layers (name, weight, op, activation, width, exact, widths by
        threshold), skipped (name, reason), groups and groups_summary; `condense-graph inspect
        --json` writes the same.

    Raises:
        CondenseError: a threshold outside [-1, 1] or an unreadable model."""
    for t in thresholds:
        _check_threshold(t, "threshold")
    original = load_model(model)
    graph, analysis = CondenseChannelsPass.analyze(original)
    widths = {}
    for t in thresholds:  # a fresh plan per threshold: layers depend on the ones before them
        plans, _ = CondenseChannelsPass(CondenseOptions(t)).plan(graph, analysis)
        for plan in plans:
            widths.setdefault(plan.name, {})[str(t)] = plan.cmap.width_after
    layers = [
        {
            "name": layer.name,
            "weight": layer.producer.weight.name,
            "op": layer.producer.node.op,
            "activation": layer.activation,
            "width": layer.producer.width,
            "exact": layer.homogeneous,
            "widths": widths.get(layer.name, {}),
        }
        for layer in analysis.layers
    ]
    layers += [
        {
            "name": group.name,
            "weight": group.members[0].producer.weight.name,
            "op": f"{group.kind} group",
            "activation": group.activation,
            "width": group.width,
            "exact": bool(group.homogeneous_path().all()),
            "widths": widths.get(group.name, {}),
        }
        for group in analysis.groups
    ]
    subgraph = subgraph_tensor_names(original)
    groups = find_groups(graph, analysis, subgraph)
    prepare(graph, groups, subgraph)  # which coupled groups can be merged, and why not
    return {
        "params": count_params(original),
        "thresholds": list(thresholds),
        "layers": layers,
        "skipped": [{"name": s.name, "reason": s.reason} for s in analysis.skipped],
        "groups": [group_entry(g) for g in groups],
        "groups_summary": summarize(groups),
    }


def planned_widths(
    model: onnx.ModelProto,
    layer_widths: dict[str, int],
    target: float | None,
    round_to: int,
    similarity: str,
    min_fraction: float,
) -> tuple[dict[str, int], dict | None]:
    """The width of every layer that gets one: the requested ones rounded up to `round_to`, and
    for `target` the widths of `widths_for_params`. Also the target's report entry."""
    if target is None and (round_to == 1 or not layer_widths):
        return layer_widths, None
    graph, analysis = CondenseChannelsPass.analyze(model)
    fixed = _rounded_widths(layer_widths, analysis, round_to)
    if target is None:
        return fixed, None
    fraction, free = widths_for_params(
        model,
        target,
        fixed,
        similarity,
        round_to=round_to,
        min_fraction=min_fraction,
        analyzed=(graph, analysis),
    )
    return free | fixed, _target_entry(target, fraction, free, analysis, min_fraction, round_to)


def _rounded_widths(layer_widths: dict[str, int], analysis: Analysis, round_to: int) -> dict[str, int]:
    """The requested widths rounded up to `round_to`, never above their layer's width (a layer is
    named by its producer node or its weight)."""
    sizes = unit_widths(analysis)
    return {name: round_width(width, sizes.get(name), round_to) for name, width in layer_widths.items()}


def _target_entry(
    target: float,
    fraction: float,
    free: dict[str, int],
    analysis: Analysis,
    min_fraction: float,
    round_to: int,
) -> dict:
    """The report's `target_params` entry (before the fraction achieved is known): the width
    fraction found and the searched layers left at their floor."""
    floors = {
        unit.name: width_floor(unit_width(unit), min_fraction, round_to)
        for unit in analysis.layers + analysis.groups
        if unit.name in free
    }
    return {
        "requested": target,
        "width_fraction": fraction,
        "min_width_fraction": min_fraction,
        "at_floor": sorted(name for name, width in free.items() if width == floors[name]),
    }


def round_width(width: int, layer_width: int | None, round_to: int) -> int:
    """`width` rounded up to a multiple of `round_to`, never above the layer's width."""
    rounded = -(-width // round_to) * round_to
    return rounded if layer_width is None else min(rounded, layer_width)


def width_floor(layer_width: int, min_fraction: float, round_to: int = 1) -> int:
    """The smallest width target_params gives a layer: min_fraction of it, at least 1 (rounded)."""
    return round_width(max(1, math.ceil(min_fraction * layer_width - 1e-9)), layer_width, round_to)


def widths_for_params(
    model: onnx.ModelProto,
    target: float,
    fixed: dict[str, int],
    similarity: str = "weights",
    steps: int = 14,
    round_to: int = 1,
    min_fraction: float = MIN_WIDTH_FRACTION,
    analyzed: tuple | None = None,
) -> tuple[float, dict[str, int]]:
    """Widths round(r * width) for every layer (rounded up to `round_to`, never below
    `width_floor`), with r found by bisection so that the reduced model keeps about `target` of the
    parameters (layers in `fixed` keep their requested width). Each step plans the reduction on one
    analysis of the model and counts parameters from the plan. A target that is not reached with
    every free layer at its floor is a CondenseError saying what is reachable."""
    search = width_search(model, fixed, similarity, round_to, min_fraction, analyzed)
    _check_reachable(search, target)
    low, high = 0.0, 1.0
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if fraction_at(search, mid) <= target else (low, mid)
    return low, widths_at(search, low)


@dataclass(frozen=True)
class WidthSearch:
    """What each step of the `target_params` bisection reads: one analysis of the model, the layers
    whose width follows the fraction r, and the parameter count to compare with."""

    model: onnx.ModelProto
    graph: gs.Graph  # the analyzed graph (Constant nodes have become initializers)
    analysis: Analysis  # the layers of `graph`
    free: list  # the layers not in `fixed`: their width is r times theirs
    fixed: dict[str, int]  # requested widths, kept at every step
    selector: str  # the rule's stand-in without data: the search runs without calibration data
    round_to: int
    min_fraction: float
    params: int  # parameters of `model`
    sizes: dict[str, int]  # element count of every constant of `graph`


def width_search(
    model: onnx.ModelProto,
    fixed: dict[str, int],
    similarity: str = "weights",
    round_to: int = 1,
    min_fraction: float = MIN_WIDTH_FRACTION,
    analyzed: tuple | None = None,
) -> WidthSearch:
    """The search over `model` (analyzed now unless `analyzed` gives (graph, analysis))."""
    graph, analysis = analyzed or CondenseChannelsPass.analyze(model)
    free = [  # layers and coupled groups
        unit for unit in analysis.layers + analysis.groups if not any(key in fixed for key in unit_keys(unit))
    ]
    # sizes from the analyzed graph, where Constant nodes have become initializers
    sizes = {name: int(t.values.size) for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    selector = get_selector(similarity).data_free().name
    return WidthSearch(
        model, graph, analysis, free, fixed, selector, round_to, min_fraction, count_params(model), sizes
    )


def widths_at(search: WidthSearch, r: float) -> dict[str, int]:
    """The width of every free layer at fraction r: round(r * width) rounded up to `round_to`,
    never below `width_floor`."""
    return {
        unit.name: max(
            width_floor(unit_width(unit), search.min_fraction, search.round_to),
            round_width(max(1, round(r * unit_width(unit))), unit_width(unit), search.round_to),
        )
        for unit in search.free
    }


def fraction_at(search: WidthSearch, r: float) -> float:
    """The fraction of the parameters the reduced model keeps at fraction r, counted from the
    plan (nothing is rewritten)."""
    widths = widths_at(search, r) | search.fixed
    options = CondenseOptions(1.0, layer_widths=widths, selector=search.selector)
    _, store = CondenseChannelsPass(options).plan(search.graph, search.analysis, search.model)
    delta = sum(values.size - search.sizes.get(name, 0) for name, values in store.changed.items())
    return (search.params + delta) / search.params


def _check_reachable(search: WidthSearch, target: float) -> None:
    """A CondenseError saying what is reachable when `target` is not, with every free layer at its
    floor."""
    smallest = fraction_at(search, 0.0)
    if smallest > target:
        raise CondenseError(
            f"target_params {target:g} cannot be reached without cutting a layer below "
            f"{search.min_fraction:g} of its width (--min-width-fraction): the smallest reachable "
            f"is {smallest:.3f} of the parameters"
        )


def _check_widths(widths: dict, target: float | None) -> None:
    for name, width in widths.items():
        if not isinstance(width, int) or width < 1:
            raise CondenseError(
                f"width of layer '{name}' (layer_widths) must be a positive integer, got {width!r}"
            )
    if target is not None and not 0.0 < target <= 1.0:
        raise CondenseError(f"target_params is a fraction of the parameters in (0, 1], got {target!r}")


def _calibration(source, model: onnx.ModelProto, selector: Selector) -> Calibration | None:
    if source is None:
        if selector.needs_calibration:
            raise CondenseError(f"{selector.label} needs calibration data (--data)")
        return None
    if isinstance(source, dict):
        from condense_graph.verify import check_fits, check_lengths, graph_inputs

        missing = {v.name for v in graph_inputs(model)} - set(source)
        if missing:
            raise CondenseError(f"calibration data has no array for input(s): {', '.join(sorted(missing))}")
        dtypes = {
            v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
            for v in graph_inputs(model)
        }
        data = {k: np.asarray(v).astype(dtypes[k]) for k, v in source.items() if k in dtypes}
        for value in graph_inputs(model):
            check_fits(value, data[value.name], "the calibration data")
        check_lengths("the calibration data", data, None)
        return Calibration(data)
    return load_calibration(str(source), model)


def _check_options(threshold, layer_thresholds, round_to, holdout, min_width_fraction) -> None:
    _check_threshold(threshold, "threshold")
    for name, value in (layer_thresholds or {}).items():
        _check_threshold(value, f"threshold of layer '{name}' (layer_thresholds)")
    if not isinstance(round_to, int) or round_to < 1:
        raise CondenseError(f"round_to must be a positive integer, got {round_to!r}")
    if not isinstance(holdout, (int, float)) or not 0.0 < holdout < 1.0:
        raise CondenseError(f"holdout is a fraction of the data rows in (0, 1), got {holdout!r}")
    if not isinstance(min_width_fraction, (int, float)) or not 0.0 <= min_width_fraction <= 1.0:
        raise CondenseError(f"min_width_fraction is a fraction in [0, 1], got {min_width_fraction!r}")


def _check_threshold(value: float, what: str) -> None:
    if not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
        raise CondenseError(f"{what} must be a cosine between -1 and 1, got {value!r}")
