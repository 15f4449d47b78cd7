"""A minimal progress bar: on a terminal it redraws one stderr line; otherwise it says nothing.

Long steps (planning many layers, verifying over a data file, benchmarking) report progress
through `Progress`; `--quiet` or a non-terminal stderr turns it off.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.label, self.done = max(total, 1), label, 0
        self.started = time.perf_counter()

    def advance(self, steps: int = 1) -> None:
        self.done = min(self.done + steps, self.total)
        if self.enabled:
            filled = int(30 * self.done / self.total)
            elapsed = time.perf_counter() - self.started
            self.stream.write(
                f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                f"{self.done}/{self.total} {elapsed:5.1f}s"
            )
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * (len(self.label) + 60) + "\r")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def silent(total: int = 1, label: str = "") -> Progress:
    return Progress(total, label, enabled=False)
