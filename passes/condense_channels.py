"""Condense the channels of dense and convolutional layers (paper sections 2.2, 2.3, A.1-A.3).

For every layer that `condense_graph.analysis` finds (a Gemm/MatMul/Conv producer, per-channel ops,
Gemm/MatMul/Conv consumers), group the neurons (cosine of weight vectors, of calibration
activations, a target width, or the magnitude-pruning baseline), keep each group's main neuron and
fold the others into the consumer weights (eq. 10-12, 36-38). Depthwise-separable blocks are merged
by the least-squares rule of A.3. Neurons with zero incoming weights fold their constant output into
the consumer bias; neurons with zero outgoing weights are dropped. With calibration data each
reduced layer's consumers are then refit by least squares (`condense_graph.compensate`).

Layers are reduced one after the other in graph order; each layer is judged on the weights (and,
with data, the activations) left by the previous reductions. Layers the analysis rejects are left
untouched and reported.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from condense_graph.analysis import Analysis, Skipped, analyze
from condense_graph.calibration import (
    Calibration,
    consumer_features,
    layer_statistics,
    reader_refit_statistics,
    reader_statistics,
    refit_statistics,
)
from condense_graph.compensate import compensate, refit_entry
from condense_graph.coupled import prepare
from condense_graph.errors import CondenseError
from condense_graph.graph import export_like, import_graph, subgraph_tensor_names
from condense_graph.group_plan import GroupPlan, kept_in, kept_positions, plan_group
from condense_graph.groups import find_groups
from condense_graph.plan import LayerPlan, WeightStore, plan_layer
from condense_graph.progress import Progress, silent
from condense_graph.selectors import DEFAULT, Grouping, Selector, get_selector
from passes.base import PassBase, PassResult
from passes.materialize_constants import materialize_constants

STAGES = ("analyze", "plan", "rewrite")  # the keys of `CondenseChannelsResult.timings`


@dataclass(frozen=True)
class CondenseOptions:
    """What the reduction computes, in one frozen value (assigning a field raises).

    `layer_thresholds` / `layer_widths` map a layer (producer node name or weight name) to its own
    threshold / width; `selector` is a registered rule name (`condense_graph.selectors`) or a
    `Selector`, and is held as the `Selector`; `round_to` rounds new widths up to a multiple of it;
    `calibration` turns on the data-aware merge (refit, activation similarity)."""

    threshold: float = 0.95
    layer_thresholds: Mapping[str, float] = field(default_factory=dict)
    layer_widths: Mapping[str, int] = field(default_factory=dict)
    selector: Selector | str = DEFAULT
    round_to: int = 1
    calibration: Calibration | None = None

    def __post_init__(self):
        rule = get_selector(self.selector) if isinstance(self.selector, str) else self.selector
        object.__setattr__(self, "selector", rule)
        for name in ("layer_thresholds", "layer_widths"):  # read-only copies
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name) or {})))


@dataclass
class CondenseChannelsResult(PassResult):
    """What `CondenseChannelsPass` returns: the model, whether it changed, the per-layer plans, the
    layers the analysis skipped, the degraded paths taken (warnings), the initializer names the
    pass wrote (`written`) and the seconds each stage took (`timings`, keys `STAGES`)."""

    plans: list[LayerPlan] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    written: set[str] = field(default_factory=set)
    timings: dict[str, float] = field(default_factory=dict)


class CondenseChannelsPass(PassBase):
    """`CondenseChannelsPass(CondenseOptions(...))(model)` -> `CondenseChannelsResult`.

    The stages are public: `analyze` (reads the model), `plan` (writes only the weight store it
    returns; the graph is left as analyzed, so one analysis can be planned many times), `rewrite`
    (writes the graph). Calling the pass runs the three and times them."""

    def __init__(self, options: CondenseOptions | None = None, progress: Progress | None = None):
        self.options = options or CondenseOptions()
        self.progress = progress or silent()
        self.fallbacks: list[str] = []  # degraded paths taken while planning (for the report)

    @property
    def selector(self) -> Selector:
        return self.options.selector

    def call(self, model: onnx.ModelProto) -> CondenseChannelsResult:
        warnings: list[str] = []  # degraded paths (a failed shape inference), for the report
        clock = [time.perf_counter()]

        def lap() -> None:
            clock.append(time.perf_counter())

        graph, analysis = self.analyze(model, warnings)
        if analysis.groups and self.selector.needs_calibration and self.options.calibration is None:
            warnings.append(
                f"{len(analysis.groups)} coupled channel group(s) are selected by the paper's weight rule, "
                f"not by {self.selector.label}, without calibration data"
            )
        lap()
        plans, store = self.plan(graph, analysis, model)
        warnings += self.fallbacks
        plans = [plan.measure() for plan in plans]  # the block errors of the plans kept
        lap()
        modified = any(p.cmap.width_after < p.cmap.width_before for p in plans)
        if modified:
            rewrite(graph, plans, store)
            model = export_like(graph, model, warnings)
        lap()
        timings = {stage: clock[i + 1] - clock[i] for i, stage in enumerate(STAGES)}
        return CondenseChannelsResult(
            model, modified, plans, analysis.skipped, warnings, set(store.changed), timings
        )

    @staticmethod
    def analyze(model: onnx.ModelProto, warnings: list | None = None) -> tuple[gs.Graph, Analysis]:
        """The imported graph (constants materialized) and its layers; `model` is only read."""
        graph = import_graph(model, warnings)
        if materialize_constants(graph):  # folded Pad/Reshape parameters give shapes: infer again
            graph = import_graph(export_like(graph, model, warnings), warnings)
        unshare_cut_constants(graph)
        subgraph = subgraph_tensor_names(model)
        analysis = analyze(graph, subgraph)
        return graph, with_groups(graph, analysis, subgraph)

    def plan(
        self, graph: gs.Graph, analysis: Analysis, model: onnx.ModelProto | None = None
    ) -> tuple[list[LayerPlan], WeightStore]:
        """Plan every layer in graph order; with calibration data each layer is judged and refit on
        the activations of the network reduced so far (`model` is the pass's input). Writes only
        the returned weight store: `graph` stays as analyzed (calibration runs on copies)."""
        self.check_layer_names(analysis)
        self.fallbacks = []
        tensors = graph.tensors()
        constants = {name: t for name, t in tensors.items() if isinstance(t, gs.Constant)}
        # shapes as analyzed: block-error probes need them
        shapes = {name: list(t.shape) for name, t in tensors.items() if t.shape is not None}
        store = WeightStore(constants, shapes)
        self.progress.total = max(len(analysis.layers) + len(analysis.groups), 1)
        plans = []
        versions = (graph.opset, graph.ir_version)
        for layer in analysis.layers:
            if self.options.calibration is None:
                plans.append(plan_layer(layer, store, self.grouping_for(layer), versions, self.selector))
            else:
                plans.append(self.plan_with_data(graph, layer, plans, store, model))
            self.progress.advance()
        for group in analysis.groups:  # coupled groups (`condense_graph.group_plan`)
            statistics = None
            if self.options.calibration is not None and self.selector.needs_calibration:
                statistics = group_statistics(graph, group, plans, store, model, self.options.calibration)
            plan = plan_group(group, store, self.grouping_for(group), versions, self.selector, statistics)
            if statistics is not None and plan.method != self.selector.name:
                self.fallbacks.append(
                    f"channel group '{group.name}' is selected by the paper's weight rule, not by "
                    f"{self.selector.label}: a consumer reads too many features to gather its statistics"
                )
            if self.options.calibration is not None and plan.cmap.width_after < plan.cmap.width_before:
                plan.refit = refit_group(graph, plan, plans, store, model, self.options.calibration)
            plans.append(plan)
            self.progress.advance()
        self.progress.close()
        return plans, store

    def plan_with_data(self, graph, layer, plans, store, model) -> LayerPlan:
        """Group (by weights, or by activations on the network reduced so far: the selector says
        whether it needs them), merge, then refit the consumers so that, fed by the reduced network,
        they reproduce the original network's consumer outputs."""
        versions = (graph.opset, graph.ir_version)
        calibration = self.options.calibration
        selector = self.selector.for_layer(layer.depthwise is not None)
        statistics = None
        if selector.needs_calibration:  # on the network reduced so far
            reduced = materialize(graph, plans, store, model)
            consumers = selector.needs_consumer_statistics
            statistics = layer_statistics(
                reduced, layer, calibration, consumers, model if consumers else None
            )
        plan = plan_layer(layer, store, self.grouping_for(layer), versions, selector, statistics)
        if plan.cmap.width_after < plan.cmap.width_before:
            normals = gathered_normals(layer, plan, statistics)
            if normals is None:  # capture the reduced network's consumer inputs
                reduced = materialize(graph, plans + [plan], store, model)
                normals = refit_statistics(reduced, model, layer, plan.cmap.width_after, calibration)
            plan.refit = compensate(layer, store, normals)
            # report what the written block does: the refit consumer. (A depthwise block's budget
            # was judged on the paper's merge, the refit's starting point and fallback.)
            plan.probe, plan.block_error = plan.probe.after_refit(store), None
        return plan

    def check_layer_names(self, analysis: Analysis) -> None:
        """Every per-layer threshold or width must name a reducible layer (node or weight name), and
        no requested width may exceed the layer's."""
        sizes = unit_widths(analysis)
        skipped = {s.name: s.reason for s in analysis.skipped}
        for name in list(self.options.layer_thresholds) + list(self.options.layer_widths):
            if name in skipped and name not in sizes:
                raise CondenseError(f"layer '{name}' cannot be reduced: {skipped[name]}")
            if name not in sizes:
                names = [layer.name for layer in analysis.layers] + [g.name for g in analysis.groups]
                raise CondenseError(
                    f"no reducible layer named '{name}' (layers and groups: {', '.join(names) or 'none'})"
                )
        for name, width in self.options.layer_widths.items():
            if width > sizes[name]:
                raise CondenseError(
                    f"width {width} for layer '{name}' (--layer-width) is above its width {sizes[name]}"
                )

    def grouping_for(self, layer) -> Grouping:
        options = self.options
        keys = unit_keys(layer)
        threshold = next(
            (options.layer_thresholds[k] for k in keys if k in options.layer_thresholds), options.threshold
        )
        width = next((options.layer_widths[k] for k in keys if k in options.layer_widths), None)
        if self.selector.needs_width and width is None:
            raise CondenseError(
                f"{self.selector.label} needs a width for layer '{layer.name}' "
                "(--layer-width or --target-params)"
            )
        return Grouping(threshold, options.round_to, width)


def group_statistics(graph, group, plans: list, store: WeightStore, model, calibration) -> list:
    """Each consumer's `calibration.ReaderStatistics` on the network reduced so far."""
    reduced = materialize(graph, plans, store, model)
    readers = [(r.consumer, r.width, r.block) for r in group.consumers]
    return reader_statistics(reduced, readers, calibration)


def refit_group(graph, plan: GroupPlan, plans: list, store: WeightStore, model, calibration) -> list[dict]:
    """Refit every consumer of a merged group (`compensate.refit_consumer`) so that, fed by the
    network reduced so far, it reproduces the original network's consumer outputs. Consumers are
    refit in waves (`consumer_waves`): one downstream of another (a ResNet's head reads the stream
    after every block's conv1) is refit on the network with that one already refit, so it fits the
    inputs it gets in the written model; refit together, it would compensate an error that the
    upstream refit then removes (measured: 36x the least-squares optimum at a ResNet's head)."""
    entries = {}
    for wave in consumer_waves(plan.group.consumers):
        reduced = materialize(graph, plans + [plan], store, model)
        readers, refittable = [], []
        for reader in wave:
            consumer = reader.consumer
            keep = output_rows_kept(consumer.node, plans)  # False: its rows have no original target
            rows = store[consumer.weight.name].shape[0 if consumer.node.op == "Conv" else 1 - consumer.axis]
            width = len(kept_positions(plan.cmap, reader.pieces))
            readers.append((consumer, width, reader.block, None if keep is False else keep))
            refittable.append(keep is None or (keep is not False and rows == len(keep)))
        normals = reader_refit_statistics(reduced, model, readers, calibration)
        for reader, (consumer, *_), normal, ok in zip(wave, readers, normals, refittable, strict=True):
            entries[id(reader)] = refit_entry(consumer, normal if ok else None, store)
    return [entries[id(reader)] for reader in plan.group.consumers]


def consumer_waves(readers: list) -> list[list]:
    """`readers` in waves: each wave holds the readers that no reader left for a later wave feeds
    (none is downstream of another left), in their order."""
    below = {id(r): downstream(r.consumer.node) for r in readers}
    left, waves = list(readers), []
    while left:
        wave = [r for r in left if not any(id(r.consumer.node) in below[id(o)] for o in left if o is not r)]
        waves.append(wave or left[:1])  # a cycle cannot occur in a DAG; never loop
        taken = {id(r) for r in waves[-1]}
        left = [r for r in left if id(r) not in taken]
    return waves


def downstream(node: gs.Node) -> set[int]:
    """The ids of every node that reads, directly or through others, an output of `node` (ids:
    gs nodes compare by value)."""
    seen, stack = set(), [node]
    while stack:
        for tensor in stack.pop().outputs:
            for reader in tensor.outputs:
                if id(reader) not in seen:
                    seen.add(id(reader))
                    stack.append(reader)
    return seen


def output_rows_kept(node: gs.Node, plans: list):
    """Which of `node`'s original output rows the plans so far kept: None (all), their indices, or
    False when a merge rewrote them (a depthwise block's least-squares rows: no original target)."""
    for plan in plans:
        if isinstance(plan, LayerPlan) and plan.layer.producer.node is node:
            if plan.layer.depthwise is not None and plan.cmap.width_after < plan.cmap.width_before:
                return False
            return plan.cmap.keep if plan.cmap.width_after < plan.cmap.width_before else None
        if isinstance(plan, GroupPlan):
            for member in plan.group.members + plan.group.gates:
                if member.producer.node is node:
                    return kept_in(plan.cmap, member.offset, member.width)
    return None


CUTS = ("Split", "SplitToSequence", "Slice")


def unshare_cut_constants(graph: gs.Graph) -> None:
    """Give each Split/SplitToSequence/Slice its own copy of a size or bound constant it shares
    with other nodes (the dynamo exporter has every split of one size, in every C2f block of one
    width, read one constant): a group's merge rewrites the sizes of its own cuts only."""
    names = set(graph.tensors())
    for node in graph.nodes:
        if node.op not in CUTS:
            continue
        for index, tensor in enumerate(node.inputs):
            if index == 0 or not isinstance(tensor, gs.Constant) or len(tensor.outputs) < 2:
                continue
            name, suffix = f"{tensor.name}.{node.name or node.outputs[0].name}", 0
            while name in names:
                name, suffix = f"{tensor.name}.{node.name or node.outputs[0].name}.{suffix}", suffix + 1
            names.add(name)
            node.inputs[index] = gs.Constant(name, np.array(tensor.values))


def with_groups(graph: gs.Graph, analysis: Analysis, subgraph: set[str]) -> Analysis:
    """`analysis` with the coupled groups that can be merged (`condense_graph.coupled`); their
    members are no longer skipped, the groups that cannot be merged are skipped with the reason."""
    ready, unready = prepare(graph, find_groups(graph, analysis, subgraph), subgraph)
    taken = {key for group in ready for key in group.keys}
    taken |= {g.producer.node.name or g.producer.node.outputs[0].name for group in ready for g in group.gates}
    skipped = [s for s in analysis.skipped if s.name not in taken]
    return Analysis(analysis.layers, skipped + [s for s in unready if s.name not in taken], ready)


def unit_keys(unit) -> list[str]:
    """The names that select a layer (its node and weight) or a coupled group (its members')."""
    if hasattr(unit, "producer"):
        return [unit.name, unit.producer.weight.name]
    return [unit.name] + unit.keys


def unit_width(unit) -> int:
    return unit.producer.width if hasattr(unit, "producer") else unit.width


def unit_widths(analysis: Analysis) -> dict[str, int]:
    """The width of every reducible layer and coupled group, by every name that selects it."""
    return {key: unit_width(u) for u in analysis.layers + analysis.groups for key in unit_keys(u)}


def gathered_normals(layer, plan: LayerPlan, statistics) -> list | None:
    """The refit's equations from the statistics the selection gathered, restricted to the kept
    channels (`LayerStatistics.refit_normals`), or None when they must be captured again: none
    were gathered, the merge rewrote the rows of kept channels (a depthwise block, A.3), or a
    consumer too wide to gather at full width is refit at the reduced one."""
    if statistics is None or statistics.normals is None or layer.depthwise is not None:
        return None
    normals = statistics.refit_normals(plan.cmap.keep)
    width = plan.cmap.width_after
    for consumer, normal in zip(layer.consumers, normals, strict=True):
        if normal is None and consumer_features(consumer, width, layer.block) is not None:
            return None
    return normals


def materialize(
    graph: gs.Graph, plans: list[LayerPlan], store: WeightStore, model: onnx.ModelProto
) -> onnx.ModelProto:
    """The model as planned so far (calibration runs on it), rewritten on a copy of `graph`."""
    copy = graph.copy()
    twins = {id(node): twin for node, twin in zip(graph.nodes, copy.nodes, strict=True)}
    rewrite(copy, plans, store, lambda node: twins[id(node)])
    return export_like(copy, model)


def rewrite(graph: gs.Graph, plans: list[LayerPlan], store: WeightStore, node_of=None) -> None:
    """Write the planned arrays into the graph and forget the shapes that changed: the one step
    that writes the graph. `node_of` maps a node of the analyzed graph to its copy in `graph`
    (when `graph` is a copy of it)."""
    node_of = node_of or (lambda node: node)
    tensors = graph.tensors()
    for name, values in store.changed.items():
        if name in store.created and name not in tensors:
            node = node_of(store.created[name])
            dtype = store.original_dtype(node.inputs[1].name)
            add_bias(graph, node, gs.Constant(name, values.astype(dtype)))
        elif name in store.created:
            tensors[name].values = values.astype(tensors[name].values.dtype)
        else:  # back to the model's own dtype (float16, bfloat16...)
            tensors[name].values = values.astype(store.original_dtype(name))
    tensors = graph.tensors()
    for plan in plans:
        if isinstance(plan, GroupPlan):
            forget_group_shapes(plan, tensors, node_of)
            continue
        layer = plan.layer
        if layer.depthwise is not None:  # one filter per channel: group follows the width
            node_of(layer.depthwise).attrs["group"] = plan.cmap.width_after
        tensors[layer.start.name].shape = None  # may be an inserted bias Add's output by now
        for node in [layer.producer.node] + layer.pre + layer.middle + layer.post:
            for out in node_of(node).outputs:
                out.shape = None  # shape inference fills in the new widths
    graph.cleanup().toposort()


def forget_group_shapes(plan: GroupPlan, tensors: dict, node_of) -> None:
    """Set the attributes a group's merge changes (depthwise `group`, Split `split`) and forget the
    shapes of its tensors: shape inference fills in the new widths."""
    for node, name, value in plan.attributes:
        node_of(node).attrs[name] = value
    names = set(plan.group.tensors)
    names |= {t.name for cut in plan.group.cuts for t in cut.node.outputs}  # a sequence of parts
    for name in names:
        if name in tensors and not isinstance(tensors[name], gs.Constant):
            tensors[name].shape = sequence_part_shape(plan, tensors[name])


def sequence_part_shape(plan: GroupPlan, tensor: gs.Tensor) -> list | None:
    """The new shape of a SequenceAt part, else None (inferred again). Shape inference gives every
    element of a sequence one symbolic size, and ONNX Runtime then reuses one buffer for parts of
    different widths (it fails at run time): their widths are written out."""
    if tensor.shape is None or not tensor.inputs or tensor.inputs[0].op != "SequenceAt":
        return None
    axis = 1 if plan.group.members[0].producer.node.op == "Conv" else len(tensor.shape) - 1
    shape = list(tensor.shape)
    shape[axis] = len(kept_positions(plan.cmap, plan.group.tensors[tensor.name]))
    return shape


def add_bias(graph: gs.Graph, node: gs.Node, bias: gs.Constant) -> None:
    """Give a bias-less consumer the bias that folded constant channels need."""
    if node.op in ("Gemm", "Conv"):
        if len(node.inputs) > 2:
            node.inputs[2] = bias  # an empty optional input
        else:
            node.inputs.append(bias)
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0
        return
    out = node.outputs[0]
    raw = gs.Variable(f"{out.name}.nobias", dtype=out.dtype)
    node.outputs = [raw]
    graph.nodes.append(gs.Node("Add", name=f"{node.name}.bias_add", inputs=[raw, bias], outputs=[out]))
