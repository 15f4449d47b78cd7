"""Moving between `onnx.ModelProto` and onnx-graphsurgeon graphs.

Passes edit a graphsurgeon `Graph`; these helpers import one with inferred shapes and export it
back into a copy of the original model, so the model's metadata, opset imports, producer and doc
strings survive a rewrite.
"""

from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from condense_graph import runtime
from condense_graph.protos import all_graphs

# graphsurgeon warns on stdout about bfloat16 and missing colour support; our CLI owns stdout
G_LOGGER.severity = G_LOGGER.ERROR

logger = logging.getLogger(__name__)


def import_graph(model: onnx.ModelProto, warnings: list | None = None) -> gs.Graph:
    """A graphsurgeon graph of `model` with shapes inferred where onnx can (ranks matter).
    A failed inference is logged and added to `warnings`: the graph is imported without shapes."""
    inferred, error = runtime.infer_shapes(model)
    if error is not None:
        runtime.degraded(
            logger,
            warnings,
            f"shape inference failed ({error}): the graph was analyzed without inferred shapes",
        )
    return gs.import_onnx(inferred)


def export_like(graph: gs.Graph, original: onnx.ModelProto, warnings: list | None = None) -> onnx.ModelProto:
    """`graph` as a model that keeps every model-level field of `original`.

    Shapes are inferred again (widths changed), but only the tensors `original` declared keep a
    `value_info`: one per intermediate tensor can outweigh what a small reduction saves, and the
    written model must never be larger than its input for nothing. Who needs shapes infers them.
    A failed inference (the model is still valid) is logged and added to `warnings`."""
    model = onnx.ModelProto()
    model.CopyFrom(original)
    model.graph.CopyFrom(gs.export_onnx(graph, do_type_check=False).graph)
    _restore_node_docs(model.graph, original.graph)
    model, error = runtime.infer_shapes(model)
    if error is not None:
        runtime.degraded(
            logger,
            warnings,
            f"shape inference failed on the rewritten graph ({error}): "
            "it keeps only the shapes the graph declared",
        )
    declared = {v.name for g in all_graphs(original.graph) for v in g.value_info}
    for g in all_graphs(model.graph):
        kept = [v for v in g.value_info if v.name in declared]
        del g.value_info[:]
        g.value_info.extend(kept)
    return model


def _restore_node_docs(graph: onnx.GraphProto, original: onnx.GraphProto) -> None:
    """graphsurgeon drops node doc strings and metadata; copy them back by node name."""
    by_name = {n.name: n for n in original.node if n.name}
    for node in graph.node:
        source = by_name.get(node.name)
        if source is not None:
            node.doc_string = source.doc_string
            if hasattr(node, "metadata_props"):
                del node.metadata_props[:]
                node.metadata_props.extend(source.metadata_props)
    graph.doc_string = original.doc_string


def subgraph_tensor_names(model: onnx.ModelProto) -> set[str]:
    """Names of every tensor read inside If/Loop/Scan bodies (outer-scope references included)."""
    names: set[str] = set()
    for node in model.graph.node:
        for attr in node.attribute:
            graphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for g in graphs:
                names.update(o.name for o in g.output)
                for sub in g.node:
                    names.update(_node_inputs_recursive(sub))
    return names


def _node_inputs_recursive(node: onnx.NodeProto) -> set[str]:
    names = set(node.input)
    for attr in node.attribute:
        subs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
        for g in subs:
            names |= {o.name for o in g.output}  # a body may return an outer tensor directly
            for inner in g.node:
                names |= _node_inputs_recursive(inner)
    return names
