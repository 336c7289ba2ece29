"""The job watchdog: every accepted job ends, whatever was lost on the way.

A sweep, run every few seconds by the server (one replica at a time, under a Redis lock):

1. **Retention.** Jobs that ended more than `retention_s` ago are deleted with everything the
   store holds for them (their results files stay where they were written); then the objects
   under the data prefixes queued for purging (deleted jobs' inputs and parts, abandoned
   submissions' inputs) are deleted, at most `purge_per_sweep` a sweep, so a large job's
   thousands of objects take a few sweeps rather than one long one.
2. **Finishing.** A job whose items have all been recorded for `finalize_grace_s` but which is
   not terminal (the worker that recorded the last item died before finalising, the finalize
   message was lost, or it waits behind a long queue) is finalised here. A refusal no wait
   changes (a results file that is a symbolic link, permission denied, a missing bucket) ends
   it FAILED at once; a write that may succeed later is tried again, 5 s doubling to 60 s
   apart, the last try due when `finalize_timeout_s` has passed since the first failed one,
   which ends the job FAILED with the reason if it fails too (`results.finalize_job`).
3. **Indexes.** A job's transitions move its own keys in one Redis Cluster slot, atomically,
   and the global indexes (job lists, the tenants' active jobs, the finished jobs per state)
   after, by separate commands (`perito_core.jobs.store`). A job in the active list that has
   ended, or whose record does not say its indexes were written (the process that recorded or
   ended it died in between), is indexed again (`JobStore.sync_indexes`); an id there with no
   record an hour on (a submission that died just before recording it) is dropped. Jobs
   recorded under an earlier version's keys are moved to this one's (`adopt_legacy_jobs`).
   A job whose cancel was asked for but whose open chunks were not closed (the server died
   in between) has them closed, their items cancelled.
4. **Lost chunks.** A chunk with unrecorded items, no live lease (no worker is running it)
   and no message waiting in the broker's queue, seen so on two sweeps in a row, is sent
   again. That covers a submission that died between recording the job and enqueueing it, a
   message the broker dropped (a Redis restart, a task acknowledged as failed), a worker
   killed while the broker's own redelivery is an hour away, and a chunk whose attempt ended
   early with an error. Two sweeps, not one, because a message is briefly in neither place
   while a worker takes it. A resend that duplicates a live message costs one skipped
   delivery: results are recorded once, and a chunk runs under one lease at a time.

The watchdog also makes chunk recovery independent of workers being up: with KEDA scaling
workers to zero, the resent message lands in the queue KEDA watches.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import redis

from perito.v1.vocabulary import ItemState
from perito_core.errors import PeritoError
from perito_core.jobs.queue import queued_chunks, send_chunks
from perito_core.jobs.results import RETRY_FIRST_S, RETRY_MAX_S, finalize_job
from perito_core.jobs.store import Job, JobStore, is_legacy_member
from perito_core.storage import S3Options

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    """What one sweep did (for logs, metrics and tests)."""

    ran: bool = False
    deleted: int = 0
    purged: int = 0  # objects of job data prefixes deleted
    finalized: int = 0
    repaired: int = 0  # jobs whose global indexes were written again, or dropped from them
    resent: int = 0
    suspects: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(eq=False)
class Watchdog:
    """Sweeps the job store; see the module docstring.

    Args:
        store: the job store.
        celery: the Celery app chunks are sent with.
        broker: a Redis client on the Celery broker (to see which chunks are queued).
        s3: options for writing results files when finalising.
        retention_s: how long a finished job is kept.
        item_time_limit_s: per-image time budget, for resent chunks' time limits.
        interval_s: the time between sweeps; the lock is held for twice that.
        finalize_grace_s: how long a complete job is left to the worker's finalize task.
        finalize_timeout_s: how long, from the first failed write, its results files are
            tried again when the failure may pass (the job then ends FAILED).
        purge_per_sweep: objects of job data prefixes deleted at most per sweep.
    """

    store: JobStore
    celery: Any
    broker: redis.Redis
    s3: S3Options
    _: KW_ONLY
    retention_s: float
    item_time_limit_s: float
    interval_s: float
    finalize_grace_s: float = 15.0
    finalize_timeout_s: float = 300.0
    purge_per_sweep: int = 500
    on_resend: Callable[[int], None] | None = None
    _token: str = field(default_factory=lambda: uuid.uuid4().hex, init=False, repr=False)
    _suspects: set[tuple[str, int]] = field(default_factory=set, init=False, repr=False)

    def _lock(self) -> bool:
        """Hold the sweep lock (taken, or renewed if ours) for two intervals."""
        return self.store.hold_sweep_lock(self._token, max(1000, int(self.interval_s * 2000)))

    def sweep(self) -> SweepReport:
        """One pass over the store. Never raises: failures are logged and reported."""
        report = SweepReport()
        try:
            if not self._lock():
                return report
            report.ran = True
            self.store.adopt_legacy_jobs()
            self._expire(report)
            self._purge(report)
            candidates = self._scan_active(report)
            self._resend_lost(candidates, report)
        except (PeritoError, redis.RedisError) as exc:
            message = exc.message if isinstance(exc, PeritoError) else str(exc)
            report.errors.append(message)
            log.warning("watchdog sweep failed: %s", message)
        return report

    def _expire(self, report: SweepReport) -> None:
        for job_id in self.store.expired_jobs(self.retention_s):
            try:
                if self.store.delete(job_id):
                    report.deleted += 1
            except PeritoError as exc:  # already gone: another replica deleted it
                log.debug("retention: %s: %s", job_id, exc.message)

    def _purge(self, report: SweepReport) -> None:
        try:
            report.purged, _ = self.store.purge_job_data(self.purge_per_sweep)
        except (PeritoError, OSError) as exc:  # storage down: the queue keeps the rest
            report.errors.append(f"purging job data: {exc}")
            log.warning("watchdog: job data not purged: %s", exc)

    def _scan_active(self, report: SweepReport) -> dict[str, list[int]]:
        candidates: dict[str, list[int]] = {}
        now = time.time()
        for job_id in self.store.active_jobs():
            if is_legacy_member(job_id):  # an earlier version's job: moved at a later sweep
                continue
            try:
                job = self.store.get(job_id)
            except PeritoError:  # deleted between the two reads, or not recorded yet
                report.repaired += self.store.forget_unrecorded(job_id)
                continue
            if job.state.terminal or not job.indexed:  # its indexes' follow-up was cut short
                self.store.sync_indexes(job)
                report.repaired += 1
                if job.state.terminal:
                    continue
            if job.cancel_requested and job.done < job.total:
                # The server that asked for the cancel died before closing the open chunks
                # (`JobStore.mark_unrecorded`): closed here, their items cancelled.
                report.repaired += bool(self.store.mark_unrecorded(job_id, ItemState.CANCELLED, ""))
                job = self.store.get(job_id)
            if job.done >= job.total:
                if self._finalize_due(job, now):
                    self._finalize(job_id, report)
                continue
            unleased = self.store.unleased_chunks(job_id)
            if unleased:
                candidates[job_id] = unleased
        return candidates

    def _finalize_due(self, job: Job, now: float) -> bool:
        if now - (job.completed_at or now) < self.finalize_grace_s:
            return False  # the worker that recorded the last item is finalising it
        if job.finalize_attempts:  # backing off, but never past the bound
            backoff = min(RETRY_MAX_S, RETRY_FIRST_S * 2.0 ** (job.finalize_attempts - 1))
            due = job.finalize_last_failure + backoff
            return now >= min(due, job.finalize_first_failure + self.finalize_timeout_s)
        return True

    def _finalize(self, job_id: str, report: SweepReport) -> None:
        try:
            job = finalize_job(self.store, job_id, self.s3, give_up_after_s=self.finalize_timeout_s)
        except Exception as exc:  # noqa: BLE001 - counted by finalize_job; retried later
            report.errors.append(f"finalising {job_id}: {exc}")
            return
        report.finalized += 1
        log.info("watchdog: job %s ended %s", job_id, job.state.value)

    def _resend_lost(self, candidates: dict[str, list[int]], report: SweepReport) -> None:
        if not candidates:
            self._suspects = set()
            return
        queued = queued_chunks(self.broker)
        now_suspect = {
            (job_id, chunk)
            for job_id, chunks in candidates.items()
            for chunk in chunks
            if (job_id, chunk) not in queued
        }
        lost = now_suspect & self._suspects
        self._suspects = now_suspect - lost
        report.suspects = len(self._suspects)
        by_job: dict[str, list[int]] = defaultdict(list)
        for job_id, chunk in sorted(lost):
            by_job[job_id].append(chunk)
        for job_id, chunks in by_job.items():
            try:
                job = self.store.get(job_id)
                sent = send_chunks(
                    self.celery,
                    job_id,
                    chunks,
                    chunk_size=job.chunk_size,
                    total=job.total,
                    item_time_limit_s=self.item_time_limit_s,
                )
            except Exception as exc:  # noqa: BLE001 - kombu raises many types; next sweep retries
                report.errors.append(f"resending {job_id}: {exc}")
                continue
            self.store.note_resent(job_id, sent)
            report.resent += sent
            if self.on_resend is not None:
                self.on_resend(sent)
            log.warning(
                "watchdog: job %s: resent %d chunk(s) nobody was running or had queued: %s",
                job_id,
                sent,
                ", ".join(map(str, chunks[:20])) + (" ..." if len(chunks) > 20 else ""),
            )
