"""The exception types: user errors and our own bugs.

Anything the user can fix (a missing file, a bad option, a model we refuse to touch) raises
`CondenseError`; the CLI prints its message on one line and exits 2. A result we produced that
fails our own output checks (`condense_graph.safety`) raises `InternalError`: it is a bug of
condense-graph, never the user's fault; the CLI prints one line and exits 3, writing nothing.
Any other exception is a bug too (exit 3, `--debug` for the traceback).
"""


class CondenseError(Exception):
    """A problem with the user's input, told in one line."""


class InternalError(Exception):
    """A model condense-graph produced is broken (a bug of ours), told in one line."""
