"""The one exception type for user errors.

Anything the user can fix (a missing file, a bad option, a model we refuse to touch) raises
`CondenseError`; the CLI prints its message on one line and exits 2. Everything else is a bug
and keeps its traceback.
"""


class CondenseError(Exception):
    """A problem with the user's input, told in one line."""
