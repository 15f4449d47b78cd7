"""Walks over ONNX protos: every graph (If/Loop/Scan bodies at any depth) and every tensor.

The one place that knows where ONNX keeps graphs and tensors, so parameter counts, external-data
checks, value_info, finiteness checks and subgraph reads all see the same tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` first, then every If/Loop/Scan body in it, at any depth."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for body in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from all_graphs(body)


def all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes (Constant nodes...) of `graph` and of every body in it."""
    for g in all_graphs(graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
