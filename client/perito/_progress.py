"""A job progress bar on stderr: no dependency, redrawn in place on a terminal."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from perito._models import Job


class ProgressBar:
    """One line, redrawn in place on a terminal, every 10% elsewhere (logs stay short)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self.reported = -1
        self.first_done: int | None = None

    def update(self, job: Job) -> None:
        fraction = job.done / job.total if job.total else 1.0
        if self.first_done is None:
            self.first_done = job.done
        rate = self._rate(job, self.first_done)
        eta = f"{(job.total - job.done) / rate:.0f}s left" if rate > 0 and not job.terminal else ""
        filled = int(fraction * 30)
        text = (
            f"[{'#' * filled}{'.' * (30 - filled)}] {job.done}/{job.total} {fraction:6.1%}  "
            f"{job.failed} failed  {rate:5.1f} img/s  {eta}"
        )
        if self.tty:
            self.stream.write(f"\r{text:<100}" + ("\n" if job.terminal else ""))
            self.stream.flush()
        elif int(fraction * 10) > self.reported or job.terminal:
            self.reported = int(fraction * 10)
            self.stream.write(text + "\n")
            self.stream.flush()

    def _rate(self, job: Job, first_done: int) -> float:
        """Images per second: over the job's own run once it has ended (its start and end
        times), else over what this bar saw done since it started (a job half done before
        the bar was made does not count as done in no time)."""
        if job.terminal and job.started and job.finished:
            seconds = (job.finished - job.started).total_seconds()
            return job.done / seconds if seconds > 0 else 0.0
        elapsed = time.monotonic() - self.started
        return (job.done - first_done) / elapsed if elapsed > 0 else 0.0
