"""The Celery app and its tasks: `perito.classify_chunk` and `perito.finalize_job`.

The app is built here so that `celery` can find its tasks; `perito worker` points it at the
configured broker before the worker starts, and each worker process builds its runtime on first
use (after the fork).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import redis
import torch
from celery.signals import worker_process_init
from pydantic import BaseModel, Field

from perito_core import tracing
from perito_core.errors import NotFound, StorageUnavailable
from perito_core.jobs.queue import BULK_QUEUE, CLASSIFY_CHUNK, FINALIZE_JOB, make_celery
from perito_core.jobs.results import RETRY_FIRST_S, RETRY_MAX_S, finalize_job
from perito_core.logs import JOB_ID
from perito_worker import metrics
from perito_worker.processing import WorkerRuntime, classify_chunk
from perito_worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# Wired to the environment's settings (`PERITO_REDIS_URL`, `PERITO_BROKER_URL`), so that plain
# `celery -A perito_worker.tasks` works too; `perito worker` re-points it with its flags.
_environment = WorkerSettings()
app = make_celery(_environment.broker, setting=_environment.broker_setting)

_settings: WorkerSettings | None = None
_runtime: WorkerRuntime | None = None


def configure(settings: WorkerSettings) -> None:
    """Point the app at `settings` (called by `perito worker` before the worker starts)."""
    global _settings
    _settings = settings
    configured = make_celery(
        settings.broker,
        visibility_timeout_s=settings.visibility_timeout_s,
        setting=settings.broker_setting,
    )
    app.conf.update(configured.conf)
    # kombu's form of the URL (a Sentinel URL becomes its sentinel:// transport).
    app.conf.broker_url = configured.conf.broker_url


def runtime() -> WorkerRuntime:
    global _runtime
    if _runtime is None:
        _runtime = WorkerRuntime(_settings or WorkerSettings())
    return _runtime


@worker_process_init.connect
def _init_process(**_: Any) -> None:
    """In each worker process: lower CPU priority, size torch's thread pool."""
    _tune_process(_settings or WorkerSettings())


def _tune_process(settings: WorkerSettings) -> None:
    if settings.nice:
        os.nice(settings.nice)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)


class ChunkTask(BaseModel):
    """The arguments of `perito.classify_chunk`: items start..stop-1 of a job."""

    job_id: str = Field(min_length=1)
    chunk: int = Field(ge=0)
    start: int = Field(ge=0)
    stop: int = Field(gt=0)


def send_finalize(job_id: str) -> None:
    app.send_task(FINALIZE_JOB, kwargs={"job_id": job_id}, queue=BULK_QUEUE)


# Transient failures (storage or Redis unreachable) retry the finalize task with backoff: 5 s
# doubling to 60 s, without jitter, so that with the default PERITO_FINALIZE_TIMEOUT_S (300 s)
# the worker's own retries (315 s in all) reach the try that ends the job FAILED; the watchdog
# tries too, on the same schedule. A refusal no wait changes is never retried: `finalize_job`
# ends the job FAILED at once. A chunk is never retried by Celery: an attempt that ends early
# gives its lease back with the reason, and the watchdog sends the chunk again (so a broker
# that is down when the retry would be sent cannot lose it).
_TRANSIENT = (StorageUnavailable, redis.ConnectionError, redis.TimeoutError)


# Both tasks are acknowledged late and put back when their process dies: `make_celery` sets
# that for every task (`task_acks_late`, `task_reject_on_worker_lost`).
@app.task(name=CLASSIFY_CHUNK)
def classify_chunk_task(**kwargs: Any) -> None:
    task = ChunkTask(**kwargs)
    token = JOB_ID.set(task.job_id)
    try:
        with metrics.CHUNK_SECONDS.time(), tracing.span("perito.chunk", job=task.job_id):
            classify_chunk(runtime(), task.job_id, task.chunk, task.start, task.stop, send_finalize)
    finally:
        JOB_ID.reset(token)


@app.task(
    name=FINALIZE_JOB,
    autoretry_for=_TRANSIENT,
    retry_backoff=int(RETRY_FIRST_S),
    retry_backoff_max=int(RETRY_MAX_S),
    retry_jitter=False,
    max_retries=8,
)
def finalize_job_task(job_id: str) -> None:
    rt = runtime()
    try:
        job = finalize_job(
            rt.store,
            job_id,
            rt.settings.s3_options(),
            give_up_after_s=rt.settings.finalize_timeout_s,
        )
    except NotFound:
        if rt.store.exists(job_id):
            raise
        # Deleted while its last chunks ran: nothing is left to finish.
        log.info("job %s was deleted before its results files were written", job_id)
        return
    metrics.JOBS_FINISHED.labels(job.state.value).inc()
    log.info(
        "job %s %s: %d succeeded, %d failed, %d cancelled",
        job_id,
        job.state.value,
        job.succeeded,
        job.failed,
        job.cancelled,
    )
