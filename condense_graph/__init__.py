"""condense-graph: shrink trained networks in ONNX by merging condensed neurons.

See `condense` and `inspect`; the CLI is `condense-graph`.
"""

from condense_graph.api import CondenseResult, condense, inspect
from condense_graph.errors import CondenseError

__all__ = ["CondenseError", "CondenseResult", "condense", "inspect"]
__version__ = "0.1.0"
