"""condense-graph: shrink trained networks in ONNX by merging condensed neurons.

See `condense` and `inspect` (`StructuredOBS` is the data-aware rule `method=` takes as an
object, to set its damping); `condense` returns a `CondenseResult`, whose `save(path)` writes the
model atomically; `count_params` counts a model's parameters (initializers and Constant nodes,
subgraphs included). Each documents its arguments, types and defaults (`help(condense)`).
ONNX Runtime sessions run on `condense_graph.runtime.PROVIDERS` (CPU; `runtime.set_providers`).
The CLI is `condense-graph` (or `python -m condense_graph`).

The API is loaded on first use (PEP 562), so the package's modules import without it: the passes
(`passes/`) read them and the API runs the passes.
"""

from condense_graph.errors import CondenseError
from condense_graph.report import count_params
from condense_graph.selectors import Selector, StructuredOBS

__all__ = [
    "CondenseError",
    "CondenseResult",
    "Selector",
    "StructuredOBS",
    "condense",
    "count_params",
    "inspect",
]
__version__ = "0.1.0"

_API = ("CondenseResult", "condense", "inspect")


def __getattr__(name: str):
    if name in _API:
        from condense_graph import api

        return getattr(api, name)
    raise AttributeError(f"module 'condense_graph' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
