"""Handles to follow a bulk job. They talk to a client through a small protocol
(`JobCalls`, `AsyncJobCalls`) that `Client` and `AsyncClient` satisfy with their public
methods, so this module imports neither."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

from perito._models import ItemState, Job, JobItemResult, JobState
from perito._progress import ProgressBar

__all__ = [
    "AsyncJobCalls",
    "AsyncJobHandle",
    "ItemState",
    "Job",
    "JobCalls",
    "JobHandle",
    "JobItemResult",
    "JobState",
    "JobTimeoutError",
]


class JobCalls(Protocol):
    """What a `JobHandle` needs from a client (`Client` has it)."""

    def get_job(self, job_id: str) -> Job: ...

    def cancel_job(self, job_id: str) -> Job: ...

    def watch_job(self, job_id: str) -> Iterator[Job]: ...

    def list_job_results(
        self, job_id: str, *, failed_only: bool = ..., page_size: int = ...
    ) -> Iterator[JobItemResult]: ...


class AsyncJobCalls(Protocol):
    """What an `AsyncJobHandle` needs from a client (`AsyncClient` has it)."""

    async def get_job(self, job_id: str) -> Job: ...

    async def cancel_job(self, job_id: str) -> Job: ...

    def watch_job(self, job_id: str) -> AsyncIterator[Job]: ...

    def list_job_results(
        self, job_id: str, *, failed_only: bool = ..., page_size: int = ...
    ) -> AsyncIterator[JobItemResult]: ...


class JobTimeoutError(TimeoutError):
    """`wait()` ran out of time; the job goes on."""


class JobHandle:
    """Follow and control one job: `status()`, `wait()`, `watch()`, `results()`, `cancel()`."""

    def __init__(self, client: JobCalls, job: Job) -> None:
        self._client = client
        self.id = job.id
        self.last = job

    def __repr__(self) -> str:
        job = self.last
        return f"JobHandle({self.id!r}, state={job.state.value}, {job.done}/{job.total})"

    def status(self) -> Job:
        self.last = self._client.get_job(self.id)
        return self.last

    def watch(self) -> Iterator[Job]:
        """Snapshots as the job progresses (at least one a second while it runs), ending with
        the terminal one. Reconnects if the stream breaks."""
        while True:
            for job in self._client.watch_job(self.id):
                self.last = job
                yield job
                if job.terminal:
                    return
            if self.status().terminal:
                yield self.last
                return

    def wait(self, timeout: float | None = None, *, progress: bool = False) -> Job:
        """Block until the job is done; returns its final snapshot.

        Args:
            timeout: seconds to wait at most (the job is not cancelled when they run out).
            progress: draw a progress bar on stderr.

        Raises:
            JobTimeoutError: `timeout` seconds passed first.
        """
        bar = ProgressBar() if progress else None
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in self.watch():
            if bar is not None:
                bar.update(job)
            if job.terminal:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise JobTimeoutError(
                    f"job {self.id} not done after {timeout}s: {job.done}/{job.total}"
                )
        return self.last

    def results(
        self, *, failed_only: bool = False, page_size: int = 1000
    ) -> Iterator[JobItemResult]:
        """Every item's result in input order (or only the failures), fetched page by page."""
        yield from self._client.list_job_results(
            self.id, failed_only=failed_only, page_size=page_size
        )

    def cancel(self) -> Job:
        """Cancel: items not yet classified are marked cancelled; returns the job as it stands."""
        self.last = self._client.cancel_job(self.id)
        return self.last


class AsyncJobHandle:
    """`JobHandle` for `AsyncClient`: the same methods, awaited (`watch` and `results` are
    async iterators)."""

    def __init__(self, client: AsyncJobCalls, job: Job) -> None:
        self._client = client
        self.id = job.id
        self.last = job

    def __repr__(self) -> str:
        job = self.last
        return f"AsyncJobHandle({self.id!r}, state={job.state.value}, {job.done}/{job.total})"

    async def status(self) -> Job:
        self.last = await self._client.get_job(self.id)
        return self.last

    async def watch(self) -> AsyncIterator[Job]:
        """Snapshots as the job progresses, ending with the terminal one."""
        while True:
            async for job in self._client.watch_job(self.id):
                self.last = job
                yield job
                if job.terminal:
                    return
            if (await self.status()).terminal:
                yield self.last
                return

    async def wait(self, timeout: float | None = None, *, progress: bool = False) -> Job:
        """Until the job is done; see `JobHandle.wait`."""
        bar = ProgressBar() if progress else None

        async def follow() -> Job:
            async for job in self.watch():
                if bar is not None:
                    bar.update(job)
                if job.terminal:
                    return job
            return self.last

        try:
            return await asyncio.wait_for(follow(), timeout)
        except TimeoutError:
            job = self.last
            raise JobTimeoutError(
                f"job {self.id} not done after {timeout}s: {job.done}/{job.total}"
            ) from None

    async def results(
        self, *, failed_only: bool = False, page_size: int = 1000
    ) -> AsyncIterator[JobItemResult]:
        """Every item's result in input order (or only the failures), page by page."""
        async for result in self._client.list_job_results(
            self.id, failed_only=failed_only, page_size=page_size
        ):
            yield result

    async def cancel(self) -> Job:
        self.last = await self._client.cancel_job(self.id)
        return self.last
