"""A progress bar with an ETA on stderr, shown on a terminal only (logs and pipes stay clean)."""

from __future__ import annotations

import sys


class EvalProgress:
    def __init__(self, total: int, done: int = 0, enabled: bool | None = None):
        self.bar = None
        if enabled if enabled is not None else sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("eval"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.bar.start()
            self.task = self.bar.add_task("eval", total=total, completed=done)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
