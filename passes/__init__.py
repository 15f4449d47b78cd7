"""Graph rewrite passes of condense-graph, one module each.

Every pass follows `base.PassBase`: called on an `onnx.ModelProto`, it returns a `PassResult` with
the new model and whether it changed; the input model is never modified.
`condense_channels.CondenseChannelsPass(CondenseOptions(...))` is the reduction (its result,
`CondenseChannelsResult`, adds the plans, skipped layers, warnings, written arrays and stage
timings); `materialize_constants.MaterializeConstantsPass` turns constant subexpressions into
initializers (the reduction runs the same step on its graph before analysis).
"""

from passes.base import PassBase, PassResult
from passes.condense_channels import CondenseChannelsPass, CondenseChannelsResult, CondenseOptions
from passes.materialize_constants import MaterializeConstantsPass

__all__ = [
    "CondenseChannelsPass",
    "CondenseChannelsResult",
    "CondenseOptions",
    "MaterializeConstantsPass",
    "PassBase",
    "PassResult",
]
