"""Per-layer widths chosen globally, under a size target or an error budget (issue 12, item 4).

Structured OBS (`selectors.StructuredOBS`) predicts, for every width of a layer, the squared error
its removals add at the layer's consumer outputs, relative to the mean consumer's energy
(`RemovalOrder.relative_cost`: for T consumers, about the sum of their relative errors, so a
coupled group read by every block of a residual stream weighs T times a one-consumer layer at the
same relative error; over the summed energy instead, a ResNet-18-style net's streams were cut
to 2.5x the output error of holding them: benchmarks/RESULTS.md, "Coupled groups"). Those
curves are measured once per layer on the original network (`removal_curves`), so they are on one
scale: a *level* L gives every layer the smallest width whose predicted relative cost is at most L
(`widths_at`), which is the same as ranking every candidate removal of every layer by its cost and
taking a prefix of that ranking. Raising L only shrinks widths, so one number orders all
allocations from the original model (L = 0: exact merges only) to every layer at its floor.

- A size target (`--target-params`, `--target-macs`) is met by bisection over the levels: the
  largest model that keeps at most the target fraction (`search_size`).
- An error budget (`--max-error E`) is met by measuring: the model at a level is reduced with data
  (OBS and the refit) and compared with the original on held-out rows in ONNX Runtime (verify's
  max_rel_err). Levels are tried on a fixed geometric grid from the cheapest upward until one
  breaks E, then the levels between the last that held and the first that broke are bisected
  (`search_error`).
  For a looser budget the walk stops no earlier and every bisection step moves no lower, so a
  looser budget never gives a bigger model, whatever the measured errors do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from condense_graph.errors import CondenseError

logger = logging.getLogger(__name__)

GRID_POINTS = 10  # levels of the error search's first walk (geometric between the cheapest and dearest)


@dataclass
class Curve:
    """One layer's predicted relative cost at each width from `floor` to `width` (non-increasing
    in the width: OBS costs are cumulative)."""

    name: str
    width: int
    floor: int
    costs: dict[int, float]

    def __post_init__(self):
        # cumulative costs may dip by rounding; a level must map to one width, so make them monotone
        running = 0.0
        for w in range(self.width, self.floor - 1, -1):
            running = max(running, self.costs.get(w, running))
            self.costs[w] = running

    def width_at(self, level: float) -> int:
        """The smallest width whose cost is at most `level` (the floor at the very most)."""
        return min((w for w, c in self.costs.items() if c <= level), default=self.width)


def widths_at(curves: list[Curve], level: float, round_to: int = 1) -> dict[str, int]:
    """Every layer's width at `level`, rounded up to a multiple of `round_to` (never above its width)."""
    return {c.name: min(c.width, -(-c.width_at(level) // round_to) * round_to) for c in curves if c.width > 0}


def levels(curves: list[Curve]) -> np.ndarray:
    """Every distinct cost of every curve, ascending, 0 first: the levels where a width changes."""
    values = {0.0} | {c for curve in curves for c in curve.costs.values()}
    return np.array(sorted(values))


def predicted_error(curves: list[Curve], widths: dict[str, int]) -> float:
    """A rough prediction of the relative output error: the square root of the layers' summed
    relative costs (each a relative squared error at that layer's consumers)."""
    total = sum(c.costs.get(widths.get(c.name, c.width), 0.0) for c in curves)
    return math.sqrt(max(total, 0.0))


def step_line(budget: Budget, step: Step, number: int) -> str:
    """One line per step tried, for people watching a long search."""
    value = "measured error" if budget.error is not None else "keeps"
    verdict = "ok" if step.accepted else "over"
    widths = " ".join(f"{w}" for w in step.widths.values())
    return (
        f"{budget.what} step {number}: widths {widths}, predicted error {step.predicted:.3g}, "
        f"{value} {step.value:.4g} ({verdict})"
    )


@dataclass
class Step:
    """One allocation tried: its level, widths, what it keeps (or its measured error)."""

    level: float
    widths: dict[str, int]
    predicted: float
    value: float  # the kept fraction (size search) or the measured error (error search)
    accepted: bool

    def report(self) -> dict:
        return {
            "level": self.level,
            "widths": dict(self.widths),
            "predicted_error": self.predicted,
            "value": self.value,
            "accepted": self.accepted,
        }


@dataclass
class Allocation:
    """The widths chosen and every step that led there."""

    widths: dict[str, int]
    level: float
    steps: list[Step] = field(default_factory=list)

    def report(self, what: str) -> dict:
        return {
            "by": what,
            "level": self.level,
            "widths": dict(self.widths),
            "steps": [s.report() for s in self.steps],
        }


def trial(curves, level: float, value, limit: float, round_to: int, steps: list, announce=None) -> Step:
    """The allocation at `level` tried: its widths, `value(widths)` (a kept fraction or a measured
    error) against `limit` (NaN breaks it), recorded in `steps` and announced."""
    widths = widths_at(curves, level, round_to)
    measured = value(widths)
    step = Step(level, widths, predicted_error(curves, widths), measured, measured <= limit)
    steps.append(step)
    if announce:
        announce(step)
    return step


def search_size(
    curves: list[Curve],
    fraction: Callable[[dict[str, int]], float],
    target: float,
    round_to: int = 1,
    announce: Callable[[Step], None] | None = None,
) -> Allocation:
    """The allocation at the smallest level (the largest model) whose `fraction(widths)` (of
    parameters or MACs, non-increasing in the level) is at most `target`; every layer at its floor
    when none is. Bisection over `levels`."""
    grid = levels(curves)
    steps: list[Step] = []

    def keeps(index: int) -> bool:
        return trial(curves, float(grid[index]), fraction, target, round_to, steps, announce).accepted

    low, high = 0, len(grid) - 1  # invariant: the answer is in [low, high]
    if not keeps(high):
        return Allocation(widths_at(curves, float(grid[high]), round_to), float(grid[high]), steps)
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if keeps(mid) else (mid + 1, high)
    return Allocation(widths_at(curves, float(grid[low]), round_to), float(grid[low]), steps)


def error_grid(curves: list[Curve]) -> list[float]:
    """0 (exact merges only), then GRID_POINTS levels geometric between the smallest non-zero cost
    and the largest: a fixed grid, the same for every budget."""
    costs = levels(curves)
    positive = costs[costs > 0]
    if not len(positive):
        return [0.0]
    return [0.0] + list(np.geomspace(positive[0], positive[-1], GRID_POINTS))


def search_error(
    curves: list[Curve],
    error: Callable[[dict[str, int]], float],
    budget: float,
    round_to: int = 1,
    announce: Callable[[Step], None] | None = None,
) -> Allocation | None:
    """The largest level whose measured `error(widths)` is within `budget`: walk up `error_grid`
    until a level breaks it, then bisect over the `levels` between the last that held and the
    first that broke. None when even level 0 breaks it (the model stays as it is)."""
    steps: list[Step] = []
    measured: dict[tuple, float] = {}

    def once(widths: dict[str, int]) -> float:  # equal widths are one model: measure once
        key = tuple(sorted(widths.items()))
        if key not in measured:
            measured[key] = error(widths)
        return measured[key]

    def holds(level: float) -> bool:
        return trial(curves, level, once, budget, round_to, steps, announce).accepted

    grid = error_grid(curves)
    last = None
    for level in grid:
        if not holds(level):
            break
        last = level
    else:
        return Allocation(widths_at(curves, grid[-1], round_to), grid[-1], steps)
    if last is None:
        return None
    # bisect over the levels strictly between: each one changes some width (invariant: `last`
    # holds, `between[high]` or `level` broke)
    grid_levels = levels(curves)
    between = grid_levels[(grid_levels > last) & (grid_levels < level)]
    low, high = -1, len(between)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if holds(float(between[mid])) else (low, mid)
    last = float(between[low]) if low >= 0 else last
    return Allocation(widths_at(curves, last, round_to), last, steps)


def removal_curves(model, calibration, selector, floors: dict[str, int], progress=None) -> list[Curve]:
    """Each layer and coupled group in `floors` planned alone on the original `model` down to its
    floor with `selector` (structured OBS) and its calibration statistics: its predicted cost at
    every width. Units are measured independently (none sees another's reduction), so costs share
    one scale. A group's cost sums OBS over all its consumers (`group_plan.group_costs`); a group
    whose statistics OBS cannot use (a consumer too wide to gather) gets no curve: the caller sizes
    it another way."""
    from condense_graph.calibration import layer_statistics, reader_statistics
    from condense_graph.group_plan import plan_group
    from condense_graph.plan import WeightStore, plan_layer
    from condense_graph.selectors import Grouping
    from passes.condense_channels import CondenseChannelsPass

    graph, analysis = CondenseChannelsPass.analyze(model)
    versions = (graph.opset, graph.ir_version)
    tensors = graph.tensors()
    constants = {name: t for name, t in tensors.items() if hasattr(t, "values")}
    shapes = {name: list(t.shape) for name, t in tensors.items() if t.shape is not None}
    layers = [layer for layer in analysis.layers if layer.name in floors]
    groups = [group for group in analysis.groups if group.name in floors]
    if progress is not None:
        progress.total = max(len(layers) + len(groups), 1)
    curves = []
    for layer in layers:
        statistics = layer_statistics(model, layer, calibration)
        store = WeightStore(constants, shapes)
        grouping = Grouping(width=floors[layer.name])
        plan = plan_layer(layer, store, grouping, versions, selector, statistics)
        curves.append(Curve(layer.name, layer.producer.width, floors[layer.name], dict(plan.costs or {})))
        logger.info("layer %s: predicted cost %s at width %d", layer.name, plan.costs, floors[layer.name])
        if progress is not None:
            progress.advance()
    for group in groups:
        readers = [(r.consumer, r.width, r.block) for r in group.consumers]
        statistics = reader_statistics(model, readers, calibration)
        plan = plan_group(group, WeightStore(constants, shapes), Grouping(width=floors[group.name]), versions,
                          selector, statistics)  # fmt: skip
        if plan.costs is None or plan.method != selector.name:
            logger.info("group %s: no OBS curve (selected by %s)", group.name, plan.method)
        else:
            curves.append(Curve(group.name, group.width, floors[group.name], dict(plan.costs)))
        if progress is not None:
            progress.advance()
    if progress is not None:
        progress.close()
    return curves


@dataclass
class Budget:
    """What the global allocation must meet: a fraction of the parameters or of the MACs, or a
    relative output error on held-out rows (verify's max_rel_err). Exactly one is set."""

    params: float | None = None
    macs: float | None = None
    error: float | None = None

    @property
    def what(self) -> str:
        return (
            "target_params"
            if self.params is not None
            else "target_macs"
            if self.macs is not None
            else "max_error"
        )


def allocate(model, budget: Budget, base, held: dict | None, curves: list[Curve], say=None):
    """Per-unit widths for the layers and groups of `curves` (`removal_curves`) meeting `budget`,
    and the report entry.

    `base` is the pass's `CondenseOptions` (structured OBS with calibration data, the widths the
    user fixed); `held` are the held-out rows an error budget is measured on; `say` (a line
    printer) gets one line per step tried. Returns (widths, entry, result): `result` is the pass's
    result at those widths when the search ran it (an error budget), so the caller need not run it
    again. A CondenseError when no allocation meets an error budget."""
    reductions = Reductions(model, base)
    announce = Announcer(budget, say)
    if budget.error is not None:
        allocation = search_error(curves, reductions.error_on(held), budget.error, base.round_to, announce)
        if allocation is None:
            raise CondenseError(
                f"no reduction keeps the error within max_error {budget.error:g} (--max-error): "
                f"even exact merges alone measure {announce.steps[0].value:.3g}"
            )
        result = reductions(allocation.widths)
        return allocation.widths, allocation.report(budget.what) | {"requested": budget.error}, result
    measure = reductions.params_fraction if budget.params is not None else reductions.macs_fraction
    target = budget.params if budget.params is not None else budget.macs
    allocation = search_size(curves, measure(with_data=False), target, base.round_to, announce)
    widths = confirm_size(curves, allocation, measure(with_data=True), target, base.round_to, announce)
    entry = allocation.report(budget.what) | {"requested": target, "widths": widths}
    return widths, entry, reductions(widths)  # measured by confirm_size: the run is cached


def confirm_size(curves, allocation, fraction, target: float, round_to: int, announce):
    """The widths of `allocation`, measured on the model the chosen rule writes (the search counted
    a data-free stand-in at the same widths: the refit may add consumer biases); when that model
    keeps more than `target`, the next levels up until one fits (every layer at its floor at
    most). Returns the widths; the steps measured are added to `allocation.steps`."""
    grid = levels(curves)
    level = allocation.level
    while True:
        step = trial(curves, level, fraction, target, round_to, allocation.steps, announce)
        higher = grid[grid > level]
        if step.accepted or not len(higher):
            return step.widths
        level = float(higher[0])


class Reductions:
    """The pass on `model` at given widths, each run once (`base` options otherwise): with data
    (the model written), or without it by magnitude pruning, which lands on every width exactly
    (a fast stand-in for sizes while searching; `confirm_size` measures the written model)."""

    def __init__(self, model, base):
        self.model, self.base = model, base
        self.fixed = dict(base.layer_widths)
        self.runs: dict[tuple, object] = {}

    def __call__(self, widths: dict[str, int], with_data: bool = True):
        from dataclasses import replace

        from passes.condense_channels import CondenseChannelsPass

        key = (tuple(sorted(widths.items())), with_data)
        if key not in self.runs:
            options = replace(self.base, layer_widths=widths | self.fixed)
            if not with_data:
                options = replace(options, calibration=None, selector="magnitude")
            self.runs[key] = CondenseChannelsPass(options)(self.model)
        return self.runs[key]

    def error_on(self, held: dict) -> Callable[[dict[str, int]], float]:
        """verify's max_rel_err of the reduction at the widths, on the held-out rows."""
        from condense_graph.verify import compare_models

        return lambda widths: compare_models(self.model, self(widths).model, data=held)["max_rel_err"]

    def params_fraction(self, with_data: bool = False) -> Callable[[dict[str, int]], float]:
        """The fraction of the parameters the reduction at the widths keeps."""
        from condense_graph.report import count_params

        before = count_params(self.model)
        return lambda widths: count_params(self(widths, with_data).model) / before

    def macs_fraction(self, with_data: bool = False) -> Callable[[dict[str, int]], float]:
        """The fraction of the MACs it keeps, counted on one calibration row's shapes."""
        from condense_graph.bench import count_macs
        from condense_graph.verify import data_batches

        feeds = next(iter(data_batches(self.model, self.base.calibration.data, 1)))
        before = max(count_macs(self.model, feeds), 1)
        return lambda widths: count_macs(self(widths, with_data).model, feeds) / before


class Announcer:
    """Logs each step tried, and prints it with `say` when given; keeps them (`steps`)."""

    def __init__(self, budget: Budget, say=None):
        self.budget, self.say = budget, say
        self.steps: list[Step] = []

    def __call__(self, step: Step) -> None:
        self.steps.append(step)
        line = step_line(self.budget, step, len(self.steps))
        logger.info(line)
        if self.say is not None:
            self.say(line)
