"""Progress of long steps (planning many layers, a width search, verifying over a data file,
benchmarking), on stderr.

On a terminal, a bar (`rich.progress`) redrawn in place and cleared when the step ends. Off a
terminal (a CI log, a pipeline), plain lines: one per step when there are few, at most about
`LINES` per task otherwise, so a log shows that work goes on without drowning in it; with `-v`
(`every`) one line per step, on a terminal too. `--quiet`
turns both off (`enabled=False`). `say` prints a whole line (a search step) above the bar, or as
a plain line off a terminal.

One `Progress` can follow several tasks in turn: setting `total` starts a new one (count and
clock from zero), `close` ends it.
"""

from __future__ import annotations

import atexit
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

LINES = 10  # off a terminal: about this many lines per task at most


class Progress:
    def __init__(self, total: int, label: str, enabled: bool | None = None, stream=None, every: bool = False):
        """`every` (the CLI's `-v`): plain lines, one per step, on a terminal too."""
        self.stream = stream or sys.stderr
        self.enabled = True if enabled is None else enabled
        self.every = every
        self.bar = enabled is None and not every and _is_terminal(self.stream)  # else plain lines
        self.label = label
        self._rich: RichProgress | None = None  # the bar while a task is drawn (terminal)
        self._task = None
        self.total = total

    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, total: int) -> None:
        """A new task of `total` steps: the count and the clock start again."""
        self._total, self.done = max(int(total), 1), 0
        self.started = time.perf_counter()
        self._printed = -1  # the last line's tenth (lines mode)
        if self._rich is not None:
            self._rich.reset(self._task, total=self._total)

    def advance(self, steps: int = 1) -> None:
        self.done = min(self.done + steps, self.total)
        if not self.enabled:
            return
        if self.bar:
            self._start().update(self._task, completed=self.done, total=self.total)
            return
        mark = self.done if self.every else self.done * LINES // self.total
        if mark != self._printed or self.done == self.total:
            self._printed = mark
            elapsed = time.perf_counter() - self.started
            self.say(f"{self.label}: {self.done}/{self.total} ({elapsed:.1f} s)")

    def say(self, line: str) -> None:
        """A whole line (a search step), above the bar on a terminal."""
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.console.print(line, markup=False, highlight=False, emoji=False)
            return
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the task: the bar is cleared (a terminal keeps the lines `say` printed)."""
        if self._rich is not None:
            self._rich.stop()
            self._rich, self._task = None, None
            atexit.unregister(self.close)

    def _start(self) -> RichProgress:
        if self._rich is None:
            console = Console(file=self.stream, force_terminal=True)
            self._rich = RichProgress(
                TextColumn("{task.description}", markup=False),
                BarColumn(bar_width=30),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,  # the bar goes when the task ends, as the lines of `say` stay
                redirect_stdout=False,  # tables on stdout stay on stdout
                redirect_stderr=False,
            )
            self._task = self._rich.add_task(self.label, total=self.total, completed=self.done)
            self._rich.start()
            atexit.register(self.close)  # an error that ends the run mid-task: the cursor comes back
        return self._rich

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
