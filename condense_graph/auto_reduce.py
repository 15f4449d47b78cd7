"""The paper's automatic reduction loop (sections 2.4.2 and 3.2.2): reduce, retrain, repeat.

`auto_reduce(module, train_step, evaluate, criteria, reducer=...)` trains `module` until its
metric meets the *main* criterion, then runs a *main reduction*: every reducible layer in graph
order, one at a time,

1. a save point (a copy of the module and its optimizer's state);
2. the layer reduced by the ONNX pass (`Reducer.reduce`: the one implementation of the merges)
   at the layer's current target, every other layer held;
3. retraining with a fresh optimizer at the learning rate of eq. (21), for at most the step
   limit, evaluating every `eval_every` steps, until the *layer* criterion is met;
4. met: the reduction is kept, both criteria are relaxed (eq. 22) and the next layer follows;
   a reduction that removed almost nothing (params after/before above `small_reduction`) lowers
   that layer's threshold (eq. 25);
5. not met: back to the save point, the step limit raised for good (`steps_increase`), the
   layer's threshold raised (eq. 24), and the layer reduced again. A metric below the
   *deviation* criterion `deviation_steps` steps after a reduction rolls back at once (the paper's
   "significant deviation" rule; it raises the threshold, not the step limit).

The last layer of a main reduction has its own step limit and criterion (`last_layer_steps`,
`Criteria.last_layer`). Main reductions repeat until one removes almost nothing, `max_main`
are done, the parameter ratio reaches `target_params`, or the step budget is spent. A last
threshold for one layer (`final_threshold`, the paper's 0.4 on the classifier) and a final
training phase with early stopping (`final_steps`, `patience`; the best state by the metric is
kept) close the loop. Every constant is a parameter (`LoopConfig`, `Criteria`) with the paper's
value as its default; the paper's accuracies (0.88/0.85, 0.84/0.81, 0.8, 0.5) suit classifiers
only, so a loss metric (`higher_is_better=False`) needs its own values (`Criteria.for_loss`).

Targets (`Thresholds`, `Widths`, `ErrorBudget`) say what a layer is reduced to and how a target
moves after a failure or a too-small reduction; the paper's is `Thresholds` (eq. 23-25).
Thresholds do not transfer between training runs (issue 14: the paper's 0.9/0.8/0.999 cut a
retrained net's first layer to 57 neurons), which is why every target is steered by the
measured criterion, not fixed.

Every event (evaluate, reduce, accept, rollback, main start/end, stop) is a dict in
`AutoReduceResult.log`, written as JSON to `log_path` as the loop goes (atomically), and
`condense_graph.plots.plot_loop` draws the metric and the parameter ratio against the step with
each reduction marked (the paper's Figure 6).
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from condense_graph.errors import CondenseError

# ---------------------------------------------------------------------------------------------
# Schedules: eq. (21)-(25)


@dataclass(frozen=True)
class Cosine:
    """`end + 0.5 (start - end) (1 + cos(pi t / period))`: `start` at t = 0, `end` at t = period.

    Eq. (21) (the learning rate: start lr_max, end lr_min, period T_lr, periodic: `hold=False`)
    and eq. (22) (the criteria: start Acc_max, end Acc_min, period T_Acc, held at `end` from
    t = period on: `hold=True`); t counts the reductions kept so far."""

    start: float
    end: float
    period: float
    hold: bool = True

    def __call__(self, t: int) -> float:
        if self.hold and t >= self.period:
            return self.end
        return self.end + 0.5 * (self.start - self.end) * (1.0 + math.cos(math.pi * t / self.period))


def threshold_cut(fails: int, base: float = 2.0, slope: float = 0.1) -> float:
    """Eq. (23)-(25): the condensation threshold `1 / (1 + exp(-base - slope * fails))`; eq. (23)
    at fails = 0 (0.8808), raised by each failure (eq. 24), lowered by each too-small reduction
    (eq. 25: fails - 1, so it may go below eq. 23's)."""
    return 1.0 / (1.0 + math.exp(-base - slope * fails))


@dataclass(frozen=True)
class Criteria:
    """The quality levels a metric must reach (section 3.2.2; the paper's values, accuracies).

    main: eq. (22) for the main reduction's criterion. layer: eq. (22) for the layer-by-layer
    criterion. last_layer: the last layer's criterion (fixed). deviation: below it
    `deviation_steps` after a reduction, the reduction is undone at once. final: the level
    the loop's result is judged by (default: where the main criterion ends, eq. 22's end value).
    higher_is_better: False for a loss (then each level is a largest accepted loss)."""

    main: Cosine = Cosine(0.88, 0.85, 100)
    layer: Cosine = Cosine(0.84, 0.81, 100)
    last_layer: float = 0.80
    deviation: float = 0.5
    final: float | None = None
    higher_is_better: bool = True

    @classmethod
    def for_loss(
        cls,
        baseline: float,
        main: tuple[float, float] = (1.0, 1.05),
        layer: tuple[float, float] = (1.1, 1.2),
        last_layer: float = 1.3,
        deviation: float = 10.0,
        final: float | None = 1.05,
        period: float = 100,
    ) -> Criteria:
        """Levels for a loss, as multiples of `baseline` (the trained network's loss): the main
        criterion relaxes from 1.0x to 1.05x, the layer criterion from 1.1x to 1.2x (eq. 22), the
        last layer 1.3x, a deviation above 10x, the final result within 1.05x."""
        return cls(
            main=Cosine(baseline * main[0], baseline * main[1], period),
            layer=Cosine(baseline * layer[0], baseline * layer[1], period),
            last_layer=baseline * last_layer,
            deviation=baseline * deviation,
            final=None if final is None else baseline * final,
            higher_is_better=False,
        )

    def met(self, metric: float, level: float) -> bool:
        """Whether `metric` reaches `level`; a NaN metric never does."""
        if not math.isfinite(metric):
            return False
        return metric >= level if self.higher_is_better else metric <= level

    def best(self, a: float, b: float) -> bool:
        """Whether `a` is strictly better than `b` (a NaN is never better)."""
        if not math.isfinite(a):
            return False
        if not math.isfinite(b):
            return True
        return a > b if self.higher_is_better else a < b


@dataclass(frozen=True)
class LoopConfig:
    """Every constant of the loop, the paper's value (section 3.2.2) as its default.

    lr: eq. (21), the initial learning rate after each reduction. layer_steps: the step limit
    after a layer's reduction (20), raised by steps_increase (10) after each failure, for good.
    last_layer_steps: the last layer's limit (200). deviation_steps: when the deviation criterion
    is checked (10). small_reduction: params after/before above it is a too-small reduction
    (0.999, eq. 25). min_layer_steps: training steps before a reduction may be accepted (1; the
    paper's "Acc 1 epoch"). eval_every: steps between evaluations while retraining. main_steps:
    the most steps spent reaching the main criterion before a main reduction. max_main: the most
    main reductions. idle_mains: the loop stops after this many main reductions in a row that
    removed almost nothing (a too-small reduction lowers the layer's threshold, eq. 25, so the
    next one may remove more). max_attempts: reductions of one layer tried in one main reduction before it
    is left as it is. target_params: stop once params/original is at or below it. max_steps:
    the step budget of the whole loop. final_threshold / final_layer: one last reduction (the
    paper's 0.4 on the classifier, the last layer by default). final_steps / patience: the final
    training phase, stopped early after `patience` evaluations without improvement."""

    lr: Cosine = Cosine(0.01, 0.0001, 200, hold=False)
    layer_steps: int = 20
    steps_increase: int = 10
    last_layer_steps: int = 200
    deviation_steps: int = 10
    small_reduction: float = 0.999
    min_layer_steps: int = 1
    eval_every: int = 1
    main_steps: int = 1000
    max_main: int = 6
    idle_mains: int = 2
    max_attempts: int = 10
    target_params: float | None = None
    max_steps: int | None = None
    final_threshold: float | None = None
    final_layer: str | None = None
    final_steps: int = 0
    patience: int = 10


# ---------------------------------------------------------------------------------------------
# Targets: what a layer is reduced to, and how that moves


class Target:
    """A layer's reduction target (pluggable): `options` are `condense` options reducing `layer`
    (every other layer held), `failed` and `too_small` move the target (eq. 24 and 25 for
    thresholds), `value` is what the log shows."""

    name = "target"

    def options(self, layer: str, widths: dict[str, int]) -> dict:
        raise NotImplementedError

    def value(self, layer: str, widths: dict[str, int]):
        raise NotImplementedError

    def failed(self, layer: str) -> None:
        pass

    def too_small(self, layer: str) -> None:
        pass


class Thresholds(Target):
    """The paper's targets: each layer's threshold from eq. (23), raised by each failure (eq. 24),
    lowered by each too-small reduction (eq. 25). Other layers get threshold 1.0 (exact merges
    only, which change nothing the network computes)."""

    name = "threshold"

    def __init__(self, base: float = 2.0, slope: float = 0.1, fixed: dict[str, float] | None = None):
        self.base, self.slope = base, slope
        self.fails: dict[str, int] = {}
        self.fixed = dict(fixed or {})  # a layer's threshold that does not move (final_threshold)

    def value(self, layer, widths):
        if layer in self.fixed:
            return self.fixed[layer]
        return threshold_cut(self.fails.get(layer, 0), self.base, self.slope)

    def options(self, layer, widths):
        return {"threshold": 1.0, "layer_thresholds": {layer: self.value(layer, widths)}}

    def failed(self, layer):
        self.fails[layer] = self.fails.get(layer, 0) + 1

    def too_small(self, layer):
        self.fails[layer] = self.fails.get(layer, 0) - 1


class Widths(Target):
    """A width per layer (an int) or one fraction of every layer's width (a float in (0, 1)).
    A failure moves the layer's request halfway back to its current width (so the loop still
    always completes: at the current width nothing changes); too-small reductions change nothing
    (the width is the user's)."""

    name = "width"

    def __init__(self, widths: dict[str, int] | float):
        if isinstance(widths, float) and not 0.0 < widths < 1.0:
            raise CondenseError(f"a width fraction is in (0, 1), got {widths!r}")
        self.widths = widths
        self.fails: dict[str, int] = {}

    def value(self, layer, widths):
        current = widths[layer]
        if isinstance(self.widths, float):
            goal = max(1, round(current * self.widths))
        else:
            goal = min(current, int(self.widths.get(layer, current)))
        for _ in range(self.fails.get(layer, 0)):
            goal = math.ceil((goal + current) / 2)
        return goal

    def options(self, layer, widths):
        return {"threshold": 1.0, "layer_widths": {layer: self.value(layer, widths)}}

    def failed(self, layer):
        self.fails[layer] = self.fails.get(layer, 0) + 1


class ErrorBudget(Target):
    """The data-aware rule with an error budget: the layer is cut as far as structured OBS keeps
    the held-out max_rel_err of the network's outputs within `max_error` (`condense`'s
    max_error, every other layer held at its width), on `calibration` (arrays named after the
    exported graph's inputs). A failure halves the layer's budget; a too-small reduction doubles
    it, up to `max_error`'s `ceiling` multiple."""

    name = "max_error"

    def __init__(self, max_error: float, calibration: dict, ceiling: float = 4.0):
        if not max_error > 0:
            raise CondenseError(f"max_error must be positive, got {max_error!r}")
        self.max_error, self.calibration, self.ceiling = max_error, calibration, ceiling
        self.scale: dict[str, float] = {}

    def value(self, layer, widths):
        return self.max_error * self.scale.get(layer, 1.0)

    def options(self, layer, widths):
        held = {name: width for name, width in widths.items() if name != layer}
        return {
            "threshold": 1.0,
            "max_error": self.value(layer, widths),
            "calibration": self.calibration,
            "layer_widths": held,
        }

    def failed(self, layer):
        self.scale[layer] = self.scale.get(layer, 1.0) / 2

    def too_small(self, layer):
        self.scale[layer] = min(self.ceiling, self.scale.get(layer, 1.0) * 2)


# ---------------------------------------------------------------------------------------------
# Reducers: how a module is reduced (PyTorch round trip, or an ONNX graph rebuilt in torch)


class TorchReducer:
    """Reduces an `nn.Module` through `condense_graph.torch.reduce_module` (export, the ONNX
    pass, the module rebuilt with the reduced widths). Layers are named by their weight (the
    parameter name, e.g. "features.3.weight"), which stays the same across reductions."""

    def __init__(self, example_inputs, exporter: str = "torchscript"):
        self.example_inputs = example_inputs
        self.exporter = exporter

    def layers(self, module) -> dict[str, int]:
        from condense_graph.api import inspect
        from condense_graph.torch_module import export_module

        info = inspect(export_module(module, self.example_inputs, self.exporter), thresholds=())
        return {layer["weight"]: layer["width"] for layer in info["layers"]}

    def reduce(self, module, options: dict):
        from condense_graph.torch_module import reduce_module

        reduced = reduce_module(module, self.example_inputs, exporter=self.exporter, **options)
        return reduced.module, reduced.report

    def export(self, module):
        from condense_graph.torch_module import export_module

        return export_module(module, self.example_inputs, self.exporter)


class OnnxReducer:
    """Reduces an `OnnxModule` (`condense_graph.onnx_module`: an ONNX graph rebuilt in torch, for
    users without the training code): its current values written into its graph (`to_onnx`),
    `condense` on that, the reduced graph rebuilt (`from_onnx`). Layers are named by their
    weight initializer, which the pass keeps."""

    def layers(self, module) -> dict[str, int]:
        from condense_graph.api import inspect

        info = inspect(self.export(module), thresholds=())
        return {layer["weight"]: layer["width"] for layer in info["layers"]}

    def reduce(self, module, options: dict):
        from condense_graph.api import condense
        from condense_graph.onnx_module import from_onnx

        result = condense(self.export(module), **options)
        return from_onnx(result.model), result.report

    def export(self, module):
        from condense_graph.onnx_module import to_onnx

        return to_onnx(module)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class AutoReduceResult:
    """What `auto_reduce` returns: the module where the loop ended (after the final phase: its
    best state by the metric) or, when that misses the final level, the smallest state seen
    that met it (a "fallback" event in the log); its metric, parameter counts, whether the final
    level is met, the event log, and why the loop stopped."""

    module: object
    metric: float
    params: int
    original_params: int
    final_met: bool
    stop_reason: str
    steps: int
    log: list[dict] = field(default_factory=list)

    @property
    def params_ratio(self) -> float:
        return self.params / self.original_params


def default_optimizer(parameters, lr: float):
    import torch

    return torch.optim.Adam(parameters, lr=lr)


class _Loop:
    """The state of one `auto_reduce` run (module, optimizer, step, counts, log)."""

    def __init__(
        self, module, train_step, evaluate, criteria, config, target, reducer, optimizer, log_path, say
    ):
        self.module, self.train_step, self.evaluate_fn = module, train_step, evaluate
        self.criteria, self.config, self.target, self.reducer = criteria, config, target, reducer
        self.make_optimizer = optimizer
        self.log_path = None if log_path is None else Path(log_path)
        self.say = say
        self.step = 0
        self.kept = 0  # the reductions kept so far
        self.layer_steps = config.layer_steps
        self.original_params = count_parameters(module)
        self.log: list[dict] = []
        self.optimizer = self.make_optimizer(module.parameters(), config.lr(0))
        # the level the result is judged by: Criteria.final, or where the main criterion ends
        self.final_level = (
            criteria.final if criteria.final is not None else criteria.main(criteria.main.period)
        )
        self.smallest = None  # (params, metric, step, save point) of the smallest state meeting it

    # -- bookkeeping
    @property
    def t(self) -> int:
        """t_reduction of eq. (21)-(22): 0 for the first reduction and the one after it, then one
        more per reduction kept; with it eq. (22) gives the levels section 3.2.3 quotes (0.87837
        after the 16 reductions of the first main reduction, 0.87343 after 32)."""
        return max(0, self.kept - 1)

    @property
    def params(self) -> int:
        return count_parameters(self.module)

    def event(self, kind: str, **fields) -> dict:
        entry = {"event": kind, "step": self.step, "params": self.params} | fields
        entry["params_ratio"] = entry["params"] / self.original_params
        self.log.append(entry)
        if kind != "evaluate":
            self.say(_line(entry))
            self.write_log()
        return entry

    def write_log(self) -> None:
        if self.log_path is None:
            return
        write_json_atomic(self.log_path, {"original_params": self.original_params, "events": self.log})

    def out_of_steps(self) -> bool:
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    # -- training and evaluation
    def metric(self, phase: str, **fields) -> float:
        import torch

        self.module.eval()
        with torch.no_grad():
            value = float(self.evaluate_fn(self.module))
        self.event("evaluate", phase=phase, metric=value, **fields)
        self.remember(value)
        return value

    def remember(self, metric: float) -> None:
        """Keep the smallest state seen that meets the final level: the loop's result when the
        state it ends in misses that level."""
        if not self.criteria.met(metric, self.final_level):
            return
        best = self.smallest
        if (
            best is None
            or self.params < best[0]
            or (self.params == best[0] and self.criteria.best(metric, best[1]))
        ):
            self.smallest = (self.params, metric, self.step, self.save())

    def train(self, steps: int) -> None:
        self.module.train()
        for _ in range(steps):
            if self.out_of_steps():
                return
            loss = self.train_step(self.module, self.optimizer)
            self.step += 1
            if loss is not None and not math.isfinite(float(loss)):
                return  # a diverged step: evaluation will fail the criterion

    def train_until(self, level: float, limit: int, phase: str, minimum: int = 0, deviation: bool = False):
        """Train up to `limit` steps until the metric meets `level`; returns (met, metric, why)."""
        done, metric = 0, self.metric(phase, trained=0)
        if minimum == 0 and self.criteria.met(metric, level):
            return True, metric, "met"
        while done < limit and not self.out_of_steps():
            chunk = min(self.config.eval_every, limit - done)
            if deviation and done < self.config.deviation_steps:
                chunk = min(chunk, self.config.deviation_steps - done)
            self.train(chunk)
            done += chunk
            metric = self.metric(phase, trained=done)
            if deviation and done == self.config.deviation_steps:
                if not self.criteria.met(metric, self.criteria.deviation):
                    return False, metric, "deviation"
            if done >= minimum and self.criteria.met(metric, level):
                return True, metric, "met"
        return self.criteria.met(metric, level) and done >= minimum, metric, "limit"

    # -- save points
    def save(self):
        """A save point: the module and its optimizer copied together (one deepcopy, so the
        copied optimizer holds the copied parameters)."""
        return copy.deepcopy((self.module, self.optimizer))

    def restore(self, point) -> None:
        self.module, self.optimizer = copy.deepcopy(point)

    # -- reductions
    def reduce(self, layer: str, widths: dict[str, int]) -> tuple[bool, dict]:
        """Reduce `layer` at its target; False when nothing changed."""
        device = _device(self.module)
        before = self.params
        options = self.target.options(layer, widths)
        module, report = self.reducer.reduce(self.module.cpu(), options)
        self.module = module.to(device)
        changed = {
            entry["name"]: [entry["width_before"], entry["width_after"]]
            for entry in report.get("layers", [])
            if entry.get("width_after") != entry.get("width_before")
        }
        self.optimizer = self.make_optimizer(self.module.parameters(), self.config.lr(self.t))
        ratio = self.params / before
        entry = self.event(
            "reduce",
            layer=layer,
            target=self.target.name,
            value=self.target.value(layer, widths),
            params_before=before,
            ratio=ratio,
            changed=changed,
        )
        return bool(changed), entry

    def reduce_layer(self, layer: str, last: bool) -> bool:
        """One layer of a main reduction, with its save point, retraining and rollbacks (eq.
        24-25). Returns whether a reduction was kept."""
        for attempt in range(self.config.max_attempts):
            if self.out_of_steps():
                return False
            point = self.save()
            widths = self.reducer.layers(self.module)
            if layer not in widths:
                self.event("skip", layer=layer, reason="no longer reducible")
                return False
            changed, entry = self.reduce(layer, widths)
            if not changed:  # nothing merged: a too-small reduction that meets any criterion (eq. 25)
                self.target.too_small(layer)
                self.event("unchanged", layer=layer, attempt=attempt)
                return False
            level = self.criteria.last_layer if last else self.criteria.layer(self.t)
            limit = self.config.last_layer_steps if last else self.layer_steps
            met, metric, why = self.train_until(
                level, limit, "layer", minimum=self.config.min_layer_steps, deviation=True
            )
            if met:
                self.kept += 1
                self.event("accept", layer=layer, metric=metric, level=level, attempt=attempt)
                if entry["ratio"] > self.config.small_reduction:
                    self.target.too_small(layer)
                return True
            self.restore(point)
            self.target.failed(layer)
            if why != "deviation" and not last:
                self.layer_steps += self.config.steps_increase
            self.event("rollback", layer=layer, reason=why, metric=metric, level=level, attempt=attempt)
        self.event("give_up", layer=layer, attempts=self.config.max_attempts)
        return False

    def main_reduction(self, number: int) -> float:
        """Every layer in graph order; returns params after / before."""
        before = self.params
        layers = list(self.reducer.layers(self.module))
        self.event("main_start", number=number, layers=len(layers))
        for i, layer in enumerate(layers):
            self.reduce_layer(layer, last=i == len(layers) - 1)
            if self.out_of_steps():
                break
        ratio = self.params / before
        self.event("main_end", number=number, ratio=ratio)
        return ratio

    def run(self) -> str:
        config = self.config
        idle = 0  # main reductions in a row that removed almost nothing
        for number in range(1, config.max_main + 1):
            level = self.criteria.main(self.t)
            met, _, _ = self.train_until(level, config.main_steps, "main")
            if not met:
                return "the main criterion was not met within main_steps"
            ratio = self.main_reduction(number)
            if self.out_of_steps():
                return "max_steps reached"
            if (
                config.target_params is not None
                and self.params / self.original_params <= config.target_params
            ):
                return "target_params reached"
            idle = idle + 1 if ratio > config.small_reduction else 0
            if idle >= config.idle_mains:
                return f"{idle} main reductions in a row removed almost nothing"
        return "max_main main reductions done"

    def final(self) -> None:
        config = self.config
        if config.final_threshold is not None and not self.out_of_steps():
            layers = list(self.reducer.layers(self.module))
            layer = config.final_layer or (layers[-1] if layers else None)
            if layer is not None:
                self.target = Thresholds(fixed={layer: config.final_threshold})
                self.reduce_layer(layer, last=True)
        if config.final_steps > 0:
            self.final_phase()

    def final_phase(self) -> None:
        """Train up to final_steps, evaluate every eval_every, keep the best state (early stop)."""
        best = self.metric("final", trained=0)
        best_state, waited, done = self.save(), 0, 0
        while done < self.config.final_steps and waited < self.config.patience and not self.out_of_steps():
            chunk = min(self.config.eval_every, self.config.final_steps - done)
            self.train(chunk)
            done += chunk
            metric = self.metric("final", trained=done)
            if self.criteria.best(metric, best):
                best, best_state, waited = metric, self.save(), 0
            else:
                waited += 1
        self.restore(best_state)
        self.event("final", metric=best, trained=done)


def auto_reduce(
    module,
    train_step: Callable,
    evaluate: Callable,
    criteria: Criteria | None = None,
    *,
    reducer=None,
    example_inputs=None,
    target: Target | None = None,
    config: LoopConfig | None = None,
    optimizer: Callable = default_optimizer,
    log_path: str | os.PathLike | None = None,
    quiet: bool = False,
) -> AutoReduceResult:
    """The automatic condensation reduction of section 2.4.2 (see the module docstring).

    Args:
        module (torch.nn.Module): the network; it is not modified (the loop works on copies).
        train_step (callable): `train_step(module, optimizer) -> loss`: one optimization step
            (batch, forward, backward, `optimizer.step()`); the loop calls `module.train()`.
        evaluate (callable): `evaluate(module) -> float`, the metric the criteria judge (held-out
            accuracy, or a loss with `higher_is_better=False`); run under `torch.no_grad()` in
            eval mode.
        criteria (Criteria | None): the quality levels (default: the paper's accuracies).
        reducer: how the module is reduced (default `TorchReducer(example_inputs)`).
        example_inputs (torch.Tensor | tuple): the inputs for export (with the default reducer).
        target (Target | None): `Thresholds()` (default, the paper's), `Widths`, `ErrorBudget`.
        config (LoopConfig | None): every other constant (the paper's by default).
        optimizer (callable): `optimizer(parameters, lr)`; a new one after each reduction, at the
            learning rate of eq. (21) (default Adam).
        log_path (str | os.PathLike | None): the JSON log, rewritten after every event.
        quiet (bool): no progress lines on stderr.

    Returns:
        AutoReduceResult.

    Raises:
        CondenseError: no reducer and no example inputs; a module the reducer cannot rebuild."""
    criteria = criteria or Criteria()
    config = config or LoopConfig()
    if reducer is None:
        if example_inputs is None:
            raise CondenseError("auto_reduce needs example_inputs (for export) or a reducer")
        reducer = TorchReducer(example_inputs)
    say = (lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    loop = _Loop(
        copy.deepcopy(module),
        train_step,
        evaluate,
        criteria,
        config,
        target or Thresholds(),
        reducer,
        optimizer,
        log_path,
        say,
    )
    reason = loop.run()
    loop.event("stop", reason=reason)
    loop.final()
    metric = loop.metric("result")
    level = loop.final_level
    met = criteria.met(metric, level)
    if not met and loop.smallest is not None:  # the smallest state that met the final level instead
        params, metric, step, point = loop.smallest
        loop.restore(point)
        met = True
        loop.event("fallback", metric=metric, level=level, from_step=step)
    loop.event("done", metric=metric, level=level, final_met=met)
    return AutoReduceResult(
        module=loop.module,
        metric=metric,
        params=loop.params,
        original_params=loop.original_params,
        final_met=met,
        stop_reason=reason,
        steps=loop.step,
        log=loop.log,
    )


def _device(module):
    for p in module.parameters():
        return p.device
    return "cpu"


def _line(entry: dict) -> str:
    """One progress line per event (evaluations excepted)."""
    kind = entry["event"]
    head = f"[step {entry['step']}] {kind}"
    parts = [f"params {entry['params']:,} ({entry['params_ratio']:.3f})"]
    for key in ("layer", "value", "metric", "level", "reason", "number"):
        if key in entry:
            value = entry[key]
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return f"{head}: " + ", ".join(parts)


def write_json_atomic(path: Path, data) -> None:
    """Write JSON next to `path` and rename it into place (no half-written log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=float)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
