"""Graph rewrite passes of condense-graph, one module each.

`condense_channels.CondenseChannelsPass` takes an `onnx.ModelProto` and returns a `PassResult` with
the new model and whether it changed; the input model is never modified. `materialize_constants`
is a normalization step on a graphsurgeon graph, run by the pass before analysis.
"""

from passes.base import PassResult

__all__ = ["PassResult"]
