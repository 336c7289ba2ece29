"""Bulk jobs in the SDK: typed job snapshots and results, and a handle to follow a job."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from perito._models import Classification
from perito._progress import ProgressBar
from perito.v1 import jobs_pb2

if TYPE_CHECKING:
    from perito._async import AsyncClient
    from perito._client import Client


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIALLY_SUCCEEDED = "partially_succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


class ItemState(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


def _time(message: jobs_pb2.Job, name: str) -> datetime | None:
    return getattr(message, name).ToDatetime() if message.HasField(name) else None


@dataclass(frozen=True)
class Job:
    """A snapshot of a bulk job. `succeeded + failed + cancelled == total` once it is done."""

    id: str
    state: JobState
    model: str
    model_version: str
    total: int
    succeeded: int
    failed: int
    cancelled: int
    created: datetime | None
    started: datetime | None
    finished: datetime | None
    output_uri: str
    result_uris: list[str]
    error: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    @classmethod
    def _from_proto(cls, message: jobs_pb2.Job) -> Job:
        return cls(
            id=message.id,
            state=JobState(
                jobs_pb2.JobState.Name(message.state).removeprefix("JOB_STATE_").lower()
            ),
            model=message.model,
            model_version=message.model_version,
            total=message.total_items,
            succeeded=message.succeeded_items,
            failed=message.failed_items,
            cancelled=message.cancelled_items,
            created=_time(message, "create_time"),
            started=_time(message, "start_time"),
            finished=_time(message, "end_time"),
            output_uri=message.output_uri,
            result_uris=list(message.result_uris),
            error=message.error,
            labels=dict(message.labels),
        )


@dataclass(frozen=True)
class JobItemResult:
    """One image's outcome in a job; `classification` is set when it succeeded."""

    index: int
    image_id: str
    uri: str
    state: ItemState
    classification: Classification | None
    error: str

    @classmethod
    def _from_proto(cls, message: jobs_pb2.JobItemResult) -> JobItemResult:
        return cls(
            index=message.index,
            image_id=message.image_id,
            uri=message.uri,
            state=ItemState(
                jobs_pb2.ItemState.Name(message.state).removeprefix("ITEM_STATE_").lower()
            ),
            classification=(
                Classification._from_proto(message.classification)
                if message.HasField("classification")
                else None
            ),
            error=message.error,
        )


class JobTimeoutError(TimeoutError):
    """`wait()` ran out of time; the job goes on."""


class JobHandle:
    """Follow and control one job: `status()`, `wait()`, `watch()`, `results()`, `cancel()`."""

    def __init__(self, client: Client, job: Job) -> None:
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
            for job in self._client._watch_job(self.id):
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
        yield from self._client._job_results(self.id, failed_only=failed_only, page_size=page_size)

    def cancel(self) -> Job:
        """Cancel: items not yet classified are marked cancelled; returns the job as it stands."""
        self.last = self._client.cancel_job(self.id)
        return self.last


class AsyncJobHandle:
    """`JobHandle` for `AsyncClient`: the same methods, awaited (`watch` and `results` are
    async iterators)."""

    def __init__(self, client: AsyncClient, job: Job) -> None:
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
            async for job in self._client._watch_job(self.id):
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
        async for result in self._client._job_results(
            self.id, failed_only=failed_only, page_size=page_size
        ):
            yield result

    async def cancel(self) -> Job:
        self.last = await self._client.cancel_job(self.id)
        return self.last
