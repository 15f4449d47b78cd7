"""Graph rewrite passes of condense-graph, one module each.

Each pass is an object whose call takes an `onnx.ModelProto` and returns a `PassResult` with the
new model and whether it changed; the input model is never modified.
"""

from passes.base import PassResult

__all__ = ["PassResult"]
