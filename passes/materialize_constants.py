"""Turn constants spelled as nodes into initializers.

Exporters often write weights and scalars as `Constant` nodes, or pass initializers through
`Identity` nodes (the TorchScript exporter does both). Later passes read weights as initializers,
so this pass replaces the output of such a node by an initializer holding the same value and
drops the node. Lossless: the graph computes exactly the same thing.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


def materialize_constants(graph: gs.Graph) -> bool:
    """Rewrite `graph` in place; return whether anything changed."""
    protected = {t.name for t in graph.outputs}
    changed = False
    for node in list(graph.nodes):  # graph order, so Identity(Constant(...)) resolves in one sweep
        value = _constant_value(node)
        out = node.outputs[0] if node.outputs else None
        if value is None or out is None or out.name in protected:
            continue
        out.to_constant(value)
        node.outputs.clear()
        changed = True
    if changed:
        graph.cleanup()
    return changed


def _constant_value(node: gs.Node):
    if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
        return node.attrs["value"].values
    if node.op == "Identity" and node.inputs and isinstance(node.inputs[0], gs.Constant):
        return node.inputs[0].values
    return None
