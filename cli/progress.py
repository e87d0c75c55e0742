"""What a long command shows while it works.

On a terminal, a Rich progress display: a spinner with the elapsed time and what is happening now
(the checks, provisioning node i of N, Flower's simulation engine starting, the census, then each
round's training and evaluation), a bar over the run's rounds, each finished round's line printed
above it. Piped or redirected (a log file, CI), the same information as plain lines: the
"starting" line, a line when the run moves to another step, one line per finished round.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any, TextIO

STARTUP_NOTE = "checking exports and keys, then starting Flower's simulation engine (its start-up takes 10-30 s)"


class Working:
    """A long command's progress display; use as a context manager, pass `callback` as the
    engine's progress callback (`server.app.Progress`).

    what: the command's one-line description; rounds: the rounds to count (None: a single step,
    shown as a spinner with the elapsed time); stream: where to write (stdout); terminal: force
    (True/False) or detect (None) whether the stream is a terminal; announce: print the plain
    "starting" line (off when the caller has said what starts)."""

    def __init__(self, what: str, rounds: int | None = None, *, stream: TextIO | None = None,
                 terminal: bool | None = None, announce: bool = True) -> None:
        self.what, self.rounds, self.announce = what, rounds, announce
        self.stream = stream or sys.stdout
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self._progress: Any = None
        self._task: Any = None
        self._printed = ""  # the step a plain log last got a line for

    def __enter__(self) -> "Working":
        if not self.terminal:
            if self.announce:
                print(f"{self.what}: {STARTUP_NOTE}...", file=self.stream, flush=True)
            return self
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        console = Console(file=self.stream, force_terminal=True)
        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if self.rounds:
            columns += [BarColumn(), MofNCompleteColumn(), TextColumn("rounds")]
        self._progress = Progress(*columns, TimeElapsedColumn(), console=console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task(f"{self.what}: starting the engine", total=self.rounds)
        return self

    def callback(self, event: str, data: dict[str, Any]) -> None:
        """Show one engine event: a step of the run (`server.training_run.stage`) becomes the
        display's description; a finished round advances the bar and prints its line."""
        from server.training_run import STAGE

        if event == STAGE:
            self._show_stage(data)
            return
        if event != "round":
            return
        from engines.simulation import round_line

        line = round_line(data)
        if self._progress is None:
            print(line, file=self.stream, flush=True)
            return
        self._progress.console.print(line, markup=False, highlight=False)
        self._progress.update(self._task, completed=int(data["round"]), description=self.what)

    def _show_stage(self, data: dict[str, Any]) -> None:
        text = str(data.get("text", data.get("stage", "")))
        if "done" in data and "total" in data:
            text += f" {int(data['done'])}/{int(data['total'])}"
        key = str(data.get("stage", ""))
        if self._progress is not None:
            self._progress.update(self._task, description=f"{self.what}: {text}")
        elif key not in ("checks", self._printed):  # the "starting" line said the checks; a line per step, not per node
            self._printed = key
            print(f"{self.what}: {text}", file=self.stream, flush=True)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._progress is not None:
            if kind is None:
                self._progress.update(self._task, description=f"{self.what}: done",
                                      completed=self.rounds if self.rounds else 1, total=self.rounds or 1)
            self._progress.stop()
