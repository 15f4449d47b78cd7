"""The PyTorch side of condense-graph (the `torch` extra), under the names issue 14 gives it.

- `reduce_module`: export a module, condense the graph, rebuild the module smaller
  (`condense_graph.torch_module`).
- `auto_reduce`: the paper's automatic reduction loop, reduce, retrain, repeat, with its
  schedules (`Criteria`, `LoopConfig`, eq. 21-25) and targets (`Thresholds`, `Widths`,
  `ErrorBudget`) (`condense_graph.auto_reduce`).
"""

from condense_graph.auto_reduce import (
    AutoReduceResult,
    Cosine,
    Criteria,
    ErrorBudget,
    LoopConfig,
    Target,
    Thresholds,
    TorchReducer,
    Widths,
    auto_reduce,
    threshold_cut,
)
from condense_graph.torch_module import ReducedModule, export_module, reduce_module

__all__ = [
    "AutoReduceResult",
    "Cosine",
    "Criteria",
    "ErrorBudget",
    "LoopConfig",
    "ReducedModule",
    "Target",
    "Thresholds",
    "TorchReducer",
    "Widths",
    "auto_reduce",
    "export_module",
    "reduce_module",
    "threshold_cut",
]
