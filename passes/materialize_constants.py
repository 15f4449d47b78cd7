"""Turn constants computed in the graph into initializers.

Exporters write weights and scalars as `Constant` nodes, pass initializers through `Identity`
nodes (the TorchScript exporter does both), compute Pad/Reshape parameters with small constant
subgraphs (Constant -> ConstantOfShape -> Concat -> Cast...), and the dynamo exporter without its
optimizer casts every scalar with `CastLike(constant, x)` (Clip bounds, conv biases built as
`Expand(CastLike(0, x), shape)`). Later passes read such values as initializers, so this pass folds
every constant subexpression with onnx-graphsurgeon's `fold_constants` (which evaluates them with
ONNX Runtime) and drops the dead nodes. Lossless: the graph computes exactly the same thing.

Normalizations around the folder keep it honest:
- `Identity` of a constant is that constant: its users read the constant itself. Folding would
  give each Identity output its own copy, so a weight the graph shares would look untied (and be
  sliced in one place while its copy stays, growing the model) and the written file would hold
  the same bytes several times.
- `CastLike(constant, x)` with x's dtype known is `Cast(constant, to=dtype(x))`, which the folder
  evaluates; folding runs again so what depended on it (an Expand of the cast) folds too.
- `Constant(value_floats=...)` is float32, which onnx-graphsurgeon would fold into float64.
- A Conv bias the graph computed that folds into zeros is dropped (a Conv without bias).
- Scalars the folder computed that are byte-identical (dynamo casts one Constant once per use)
  become one tensor, so the written file does not store them several times.
- `If` nodes whose condition folds to a constant are not flattened: onnx-graphsurgeon 0.6.1 rebinds
  only the first output of the chosen branch and writes an invalid model for two or more.

Tensors above `size_threshold` bytes are left unfolded so a folded Expand or Tile cannot blow up
the file; quantized graphs are not folded at all.

`MaterializeConstantsPass()(model)` is the step as a pass (a new model, the input unchanged);
`materialize_constants(graph)` is the same rewrite on a graphsurgeon graph, which
`CondenseChannelsPass.analyze` runs before the analysis.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx

from condense_graph.graph import export_like, import_graph
from condense_graph.ops import QUANTIZED
from passes.base import PassBase, PassResult

SIZE_THRESHOLD = 16 << 20


class MaterializeConstantsPass(PassBase):
    """Constant subexpressions become initializers; `modified` when any node disappeared."""

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = import_graph(model)
        if not materialize_constants(graph):
            return PassResult(model, False)
        return PassResult(export_like(graph, model), True)


def materialize_constants(graph: gs.Graph) -> bool:
    """Rewrite `graph` in place; return whether any node disappeared.

    A quantized graph is left as it is: folding DequantizeLinear would silently dequantize it."""
    if any(node.op in QUANTIZED for node in graph.nodes):
        return False
    before = len(graph.nodes)
    for g in all_graphs(graph):
        float_constants_as_tensors(g)
        bypass_identities_of_constants(g)
    computed_biases = [n for g in all_graphs(graph) for n in g.nodes if _has_computed_bias(n)]
    stored = {
        name for g in all_graphs(graph) for name, t in g.tensors().items() if isinstance(t, gs.Constant)
    }
    fold(graph)
    if sum(castlike_to_cast(g) for g in all_graphs(graph)):
        fold(graph)
    drop_zero_biases(computed_biases)
    for g in all_graphs(graph):
        share_folded_scalars(g, stored)
    graph.cleanup()
    return len(graph.nodes) != before


def share_folded_scalars(graph: gs.Graph, stored: set[str]) -> int:
    """Scalars the folder made (one per `CastLike` of the same Constant, as dynamo writes them) that
    are byte-identical become one tensor. Only scalars: a shared per-channel constant or weight
    would look tied to the analysis and block a reduction. Returns how many uses were rewired."""
    canonical: dict[tuple, gs.Constant] = {}
    count = 0
    for node in graph.nodes:
        for i, tensor in enumerate(node.inputs):
            if not isinstance(tensor, gs.Constant) or tensor.name in stored or tensor.values.size != 1:
                continue
            values = np.asarray(tensor.values)
            key = (values.dtype.str, values.shape, values.tobytes())
            kept = canonical.setdefault(key, tensor)
            if kept is not tensor:
                node.inputs[i] = kept
                count += 1
    return count


def fold(graph: gs.Graph) -> None:
    graph.fold_constants(size_threshold=SIZE_THRESHOLD, error_ok=True, flatten_subgraphs=False).cleanup()


def all_graphs(graph: gs.Graph) -> list[gs.Graph]:
    """The graph and every If/Loop/Scan body inside it, at any depth."""
    return [graph] + list(graph.subgraphs(recursive=True))


def float_constants_as_tensors(graph: gs.Graph) -> int:
    """`Constant(value_float(s)=...)` holds float32 (ONNX spec), but onnx-graphsurgeon 0.6.1 folds
    it with `np.array`, into float64 (a Resize with float64 scales is invalid): hand it the
    float32 tensor instead. Returns how many were rewritten."""
    count = 0
    for node in graph.nodes:
        if node.op == "Constant" and len(node.attrs) == 1:
            ((name, values),) = node.attrs.items()
            if name in ("value_float", "value_floats"):
                node.attrs = {"value": gs.Constant(node.outputs[0].name, np.array(values, np.float32))}
                count += 1
    return count


def _is_constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) or (len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant")


def bypass_identities_of_constants(graph: gs.Graph) -> int:
    """Users of `Identity(c)`, c a constant, read c itself; the Identity is detached (cleanup
    removes it). An Identity that produces an output of `graph` stays. Returns how many went."""
    outputs = {id(t) for t in graph.outputs}
    count = 0
    for node in graph.nodes:  # graph order: an Identity of a bypassed Identity sees the constant
        if node.op != "Identity" or not node.inputs or not _is_constant(node.inputs[0]):
            continue
        out = node.outputs[0]
        if id(out) in outputs:
            continue
        for user in list(out.outputs):  # users inside subgraphs are listed here too
            for i, tensor in enumerate(user.inputs):
                if tensor is out:  # item assignment keeps graphsurgeon's producer/user links
                    user.inputs[i] = node.inputs[0]
        node.inputs.clear()  # detached now: the folder must not see it (it would fold a copy)
        node.outputs.clear()
        count += 1
    return count


def _has_computed_bias(node: gs.Node) -> bool:
    return node.op == "Conv" and len(node.inputs) == 3 and not isinstance(node.inputs[2], gs.Constant)


def drop_zero_biases(convs: list[gs.Node]) -> int:
    """A Conv bias the graph computed (the dynamo exporter writes `Expand(CastLike(0, x), [C])` for
    a bias-less conv) that folded into zeros is dropped: the same function, and C parameters the
    input model never stored. Returns how many went."""
    count = 0
    for node in convs:
        bias = node.inputs[2] if len(node.inputs) == 3 else None
        if isinstance(bias, gs.Constant) and not np.any(bias.values):
            node.inputs.pop()
            count += 1
    return count


def castlike_to_cast(graph: gs.Graph) -> int:
    """`CastLike(c, x)` with c constant and x's dtype known becomes `Cast(c, to=dtype(x))`
    (the same operator, with its target written out). Returns how many were rewritten."""
    count = 0
    for node in graph.nodes:
        if node.op != "CastLike" or len(node.inputs) != 2 or not isinstance(node.inputs[0], gs.Constant):
            continue
        target = node.inputs[1].dtype
        if target is None:
            continue
        attrs = {"to": dtype_to_onnx(target)}
        if "saturate" in node.attrs:  # CastLike-19 and Cast-19 share it
            attrs["saturate"] = node.attrs["saturate"]
        node.op, node.attrs = "Cast", attrs
        node.inputs.pop()
        count += 1
    return count
