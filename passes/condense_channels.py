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

import onnx
import onnx_graphsurgeon as gs

from condense_graph.analysis import Analysis, analyze
from condense_graph.calibration import Calibration, channel_gram, refit_statistics
from condense_graph.compensate import compensate
from condense_graph.errors import CondenseError
from condense_graph.graph import export_like, import_graph, subgraph_tensor_names
from condense_graph.plan import LayerPlan, WeightStore, plan_layer
from condense_graph.progress import Progress, silent
from condense_graph.selectors import Grouping, get_selector
from passes.base import PassResult
from passes.materialize_constants import materialize_constants


class CondenseChannelsPass:
    """`CondenseChannelsPass(thresholds)(model)` -> PassResult with `details["plans"]`."""

    def __init__(
        self,
        threshold: float = 0.95,
        layer_thresholds: dict[str, float] | None = None,
        progress: Progress | None = None,
        round_to: int = 1,
        calibration: Calibration | None = None,
        layer_widths: dict[str, int] | None = None,
        similarity: str = "weights",
    ):
        self.threshold = threshold
        self.similarity = similarity
        self.selector = get_selector(similarity)  # the selection rule (`condense_graph.selectors`)
        self.layer_widths = dict(layer_widths or {})
        self.calibration = calibration
        self.round_to = round_to
        self.layer_thresholds = dict(layer_thresholds or {})
        self.progress = progress or silent()

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        warnings: list[str] = []  # degraded paths (a failed shape inference), for the report
        graph, analysis = self.analyze(model, warnings)
        plans, store = self.plan(graph, analysis, model)
        modified = any(p.cmap.width_after < p.cmap.width_before for p in plans)
        if modified:
            rewrite(graph, plans, store)
            model = export_like(graph, model, warnings)
        return PassResult(
            model,
            modified,
            {
                "plans": plans,
                "skipped": analysis.skipped,
                "warnings": warnings,
                "written": set(store.changed),
            },
        )

    @staticmethod
    def analyze(model: onnx.ModelProto, warnings: list | None = None) -> tuple[gs.Graph, Analysis]:
        graph = import_graph(model, warnings)
        if materialize_constants(graph):  # folded Pad/Reshape parameters give shapes: infer again
            graph = import_graph(export_like(graph, model, warnings), warnings)
        return graph, analyze(graph, subgraph_tensor_names(model))

    def plan(
        self, graph: gs.Graph, analysis: Analysis, model: onnx.ModelProto | None = None
    ) -> tuple[list[LayerPlan], WeightStore]:
        """Plan every layer in graph order; with calibration data each layer is judged and refit on
        the activations of the network reduced so far (`model` is the pass's input)."""
        self.check_layer_names(analysis)
        tensors = graph.tensors()
        constants = {name: t for name, t in tensors.items() if isinstance(t, gs.Constant)}
        # shapes as analyzed: calibration rewrites forget them, block-error probes need them
        shapes = {name: list(t.shape) for name, t in tensors.items() if t.shape is not None}
        store = WeightStore(constants, shapes)
        self.progress.total = max(len(analysis.layers), 1)
        plans = []
        for layer in analysis.layers:
            if self.calibration is None:
                versions = (graph.opset, graph.ir_version)
                plans.append(plan_layer(layer, store, self.grouping_for(layer), versions, self.selector))
            else:
                plans.append(self.plan_with_data(graph, layer, plans, store, model))
            self.progress.advance()
        self.progress.close()
        return plans, store

    def plan_with_data(self, graph, layer, plans, store, model) -> LayerPlan:
        """Group (by weights, or by activations on the network reduced so far: the selector says
        whether it needs them), merge, then refit the consumers so that, fed by the reduced network,
        they reproduce the original network's consumer outputs."""
        versions = (graph.opset, graph.ir_version)
        selector = self.selector.for_layer(layer.depthwise is not None)
        gram = None
        if selector.needs_calibration:
            gram = channel_gram(materialize(graph, plans, store, model), layer, self.calibration)
        plan = plan_layer(layer, store, self.grouping_for(layer), versions, selector, gram)
        if plan.cmap.width_after < plan.cmap.width_before:
            reduced = materialize(graph, plans + [plan], store, model)
            normals = refit_statistics(reduced, model, layer, plan.cmap.width_after, self.calibration)
            plan.refit = compensate(layer, store, normals)
            # report what the written block does: the refit consumer. (A depthwise block's budget
            # was judged on the paper's merge, the refit's starting point and fallback.)
            plan.probe = plan.probe.after_refit(store)
        return plan

    def check_layer_names(self, analysis: Analysis) -> None:
        """Every per-layer threshold or width must name a reducible layer (node or weight name)."""
        known = {key for layer in analysis.layers for key in (layer.name, layer.producer.weight.name)}
        skipped = {s.name: s.reason for s in analysis.skipped}
        for name in list(self.layer_thresholds) + list(self.layer_widths):
            if name in skipped and name not in known:
                raise CondenseError(f"layer '{name}' cannot be reduced: {skipped[name]}")
            if name not in known:
                names = ", ".join(layer.name for layer in analysis.layers) or "none"
                raise CondenseError(f"no reducible layer named '{name}' (layers: {names})")

    def grouping_for(self, layer) -> Grouping:
        keys = (layer.name, layer.producer.weight.name)
        threshold = next(
            (self.layer_thresholds[k] for k in keys if k in self.layer_thresholds), self.threshold
        )
        width = next((self.layer_widths[k] for k in keys if k in self.layer_widths), None)
        if self.selector.needs_width and width is None:
            raise CondenseError(
                f"{self.selector.label} needs a width for layer '{layer.name}' "
                "(--layer-width or --target-params)"
            )
        return Grouping(threshold, self.round_to, width)


def materialize(
    graph: gs.Graph, plans: list[LayerPlan], store: WeightStore, model: onnx.ModelProto
) -> onnx.ModelProto:
    """The model as planned so far (calibration runs on it)."""
    rewrite(graph, plans, store)
    return export_like(graph, model)


def rewrite(graph: gs.Graph, plans: list[LayerPlan], store: WeightStore) -> None:
    """Write the planned arrays into the graph and forget the shapes that changed. Idempotent:
    calibration rewrites after every layer."""
    tensors = graph.tensors()
    for name, values in store.changed.items():
        if name in store.created and name not in tensors:
            node = store.created[name]
            dtype = store.original_dtype(node.inputs[1].name)
            add_bias(graph, node, gs.Constant(name, values.astype(dtype)))
        elif name in store.created:
            tensors[name].values = values.astype(tensors[name].values.dtype)
        else:  # back to the model's own dtype (float16, bfloat16...)
            tensors[name].values = values.astype(store.original_dtype(name))
    for plan in plans:
        if plan.layer.depthwise is not None:  # one filter per channel: group follows the width
            plan.layer.depthwise.attrs["group"] = plan.cmap.width_after
        plan.layer.start.shape = None  # may be an inserted bias Add's output by now
        for node in [plan.layer.producer.node] + plan.layer.pre + plan.layer.middle + plan.layer.post:
            for out in node.outputs:
                out.shape = None  # shape inference fills in the new widths
    graph.cleanup().toposort()


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
