"""Progress of a long generation: problems done, tokens per second, time left.

On a terminal it is a live bar (rich); elsewhere (CI, a log file, `nohup`) it is a log line after
each finished piece, at most every `log_every_s` seconds, so a run that generates for an hour is
never silent. `logging.progress_bar` chooses: auto (a bar on a terminal), always, never (log lines).
"""

from __future__ import annotations

import logging
import time
from typing import Literal

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class GenerationProgress:
    """Counts problems and generated tokens; shows them as a bar or as periodic log lines."""

    def __init__(
        self, mode: Literal["auto", "always", "never"] = "auto", description: str = "generating",
        *, log_every_s: float = 30.0,
    ) -> None:
        from rich.console import Console

        self.description = description
        self.log_every_s = log_every_s
        console = Console(stderr=True)
        self.bar_enabled = mode == "always" or (mode == "auto" and console.is_terminal)
        self._console = console
        self._progress = None
        self._task = None
        self.total = self.done = self.tokens = 0
        self._started_done = 0
        self._began = self._last_log = 0.0

    def __enter__(self) -> GenerationProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def start(self, total: int, done: int = 0) -> None:
        """`done` problems were finished earlier (a resumed run): they count, but not towards speed."""
        self.total, self.done, self._started_done = total, done, done
        self._began = self._last_log = time.monotonic()
        if self.bar_enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("problems"),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=self._console,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=total, completed=done, rate="")

    @property
    def tokens_per_s(self) -> float:
        elapsed = time.monotonic() - self._began
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        finished_here = self.done - self._started_done
        if finished_here <= 0:
            return None
        elapsed = time.monotonic() - self._began
        return elapsed / finished_here * (self.total - self.done)

    def advance(self, problems: int, tokens: int) -> None:
        self.done += problems
        self.tokens += tokens
        if self._progress is not None:
            self._progress.update(self._task, advance=problems, rate=f"{self.tokens_per_s:.0f} tok/s")
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s or self.done >= self.total:
            self._last_log = now
            eta = self.eta_s()
            log.info(
                "%s: %d/%d problems, %.0f tok/s, %s left", self.description, self.done, self.total,
                self.tokens_per_s, "?" if eta is None else format_duration(eta),
            )
