"""Turn constants computed in the graph into initializers.

Exporters write weights and scalars as `Constant` nodes, pass initializers through `Identity`
nodes (the TorchScript exporter does both), and compute Pad/Reshape parameters with small
constant subgraphs (Constant -> ConstantOfShape -> Concat -> Cast...). Later passes read such
values as initializers, so this pass folds every constant subexpression with onnx-graphsurgeon's
`fold_constants` (which evaluates them with ONNX Runtime) and drops the dead nodes. Lossless: the
graph computes exactly the same thing. Tensors above `size_threshold` bytes are left unfolded so
a folded Expand or Tile cannot blow up the file; quantized graphs are not folded at all.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from condense_graph.ops import QUANTIZED

SIZE_THRESHOLD = 16 << 20


def materialize_constants(graph: gs.Graph) -> bool:
    """Rewrite `graph` in place; return whether any node disappeared.

    A quantized graph is left as it is: folding DequantizeLinear would silently dequantize it."""
    if any(node.op in QUANTIZED for node in graph.nodes):
        return False
    before = len(graph.nodes)
    graph.fold_constants(size_threshold=SIZE_THRESHOLD, error_ok=True).cleanup()
    return len(graph.nodes) != before
