"""Progress of long steps (planning many layers, a width search, verifying over a data file,
benchmarking), on stderr.

On a terminal, one line redrawn in place (a bar). Off a terminal (a CI log, a pipeline), plain
lines: one per step when there are few, at most about `LINES` per task otherwise, so a log shows
that work goes on without drowning in it. `--quiet` turns both off (`enabled=False`).
"""

from __future__ import annotations

import sys
import time

LINES = 10  # off a terminal: about this many lines per task at most


class Progress:
    def __init__(self, total: int, label: str, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = True if enabled is None else enabled
        self.bar = enabled is None and _is_terminal(self.stream)  # else plain lines
        self.total, self.label, self.done = max(total, 1), label, 0
        self.started = time.perf_counter()
        self._printed = -1  # the last line's tenth (lines mode)

    def advance(self, steps: int = 1) -> None:
        self.done = min(self.done + steps, self.total)
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        if self.bar:
            filled = int(30 * self.done / self.total)
            self.stream.write(
                f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                f"{self.done}/{self.total} {elapsed:5.1f}s"
            )
            self.stream.flush()
            return
        mark = self.done * LINES // self.total
        if mark != self._printed or self.done == self.total:
            self._printed = mark
            self.say(f"{self.label}: {self.done}/{self.total} ({elapsed:.1f} s)")

    def say(self, line: str) -> None:
        """A whole line (a search step), above the bar on a terminal."""
        if self.enabled:
            self.stream.write(("\r" if self.bar else "") + line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.bar:
            self.stream.write("\r" + " " * (len(self.label) + 60) + "\r")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def silent(total: int = 1, label: str = "") -> Progress:
    return Progress(total, label, enabled=False)
