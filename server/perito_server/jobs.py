"""The bulk-job RPCs: submit (resolve, pin, split, enqueue), read, watch, page, cancel,
delete; and the job watchdog that makes every accepted job end (`perito_core.watchdog`)."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import redis
from google.protobuf import timestamp_pb2

from perito.v1 import classify_pb2, jobs_pb2
from perito_core.errors import InvalidArgument
from perito_core.jobs import ItemInput, ItemResult, ItemState, Job, JobState, JobStore
from perito_core.queue import make_celery, send_chunks
from perito_core.registry import validate_model_name
from perito_core.results import check_output_writable, finalize_job
from perito_core.sources import SourceReader, default_item_id
from perito_core.watchdog import Watchdog
from perito_server.model_pool import ModelPool
from perito_server.settings import ServerSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# AIP-155 request ids: a UUID in practice; anything short and URL-safe is accepted.
REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

JOB_STATES = {
    JobState.QUEUED: jobs_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: jobs_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: jobs_pb2.JOB_STATE_SUCCEEDED,
    JobState.PARTIALLY_SUCCEEDED: jobs_pb2.JOB_STATE_PARTIALLY_SUCCEEDED,
    JobState.FAILED: jobs_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: jobs_pb2.JOB_STATE_CANCELLED,
}
ITEM_STATES = {
    ItemState.PENDING: jobs_pb2.ITEM_STATE_PENDING,
    ItemState.SUCCEEDED: jobs_pb2.ITEM_STATE_SUCCEEDED,
    ItemState.FAILED: jobs_pb2.ITEM_STATE_FAILED,
    ItemState.CANCELLED: jobs_pb2.ITEM_STATE_CANCELLED,
}
FILTERS = {
    jobs_pb2.RESULT_FILTER_FAILED: ItemState.FAILED,
    jobs_pb2.RESULT_FILTER_SUCCEEDED: ItemState.SUCCEEDED,
}


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp | None:
    if not seconds:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def job_to_proto(job: Job) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        id=job.id,
        state=JOB_STATES[job.state],
        model=job.model,
        model_version=job.model_version,
        total_items=job.total,
        succeeded_items=job.succeeded,
        failed_items=job.failed,
        cancelled_items=job.cancelled,
        create_time=_timestamp(job.created_at),
        start_time=_timestamp(job.started_at),
        end_time=_timestamp(job.finished_at),
        output_uri=job.output_uri,
        result_uris=job.result_uris,
        error=job.error,
        labels=job.labels,
    )


def result_to_proto(result: ItemResult) -> jobs_pb2.JobItemResult:
    message = jobs_pb2.JobItemResult(
        index=result.index,
        image_id=result.id,
        uri=result.uri,
        state=ITEM_STATES[result.state],
        error=result.error,
    )
    if result.state is ItemState.SUCCEEDED:
        message.classification.CopyFrom(
            classify_pb2.Classification(
                image_id=result.id,
                predictions=[
                    classify_pb2.Prediction(label=label, class_index=index, probability=p)
                    for label, index, p in result.predictions
                ],
                margin=result.margin,
                normalized_entropy=result.normalized_entropy,
                uncertain=result.uncertain,
                first_frame_only=result.first_frame_only,
            )
        )
    return message


class JobService:
    """Jobs live in Redis; chunks go to the Celery bulk queue, never to this process.

    Listing, reading manifests and recording a job run on their own threads
    (`submit_threads`), so a large submission never holds up GetJob, alias refreshes or the
    watchdog, which runs on a thread of its own every `watchdog_interval_s`.
    """

    def __init__(self, settings: ServerSettings, pool: ModelPool) -> None:
        self.settings = settings
        self.pool = pool
        self.store = JobStore.connect(settings.redis_url)
        roots = list(settings.local_roots)
        if "://" not in settings.results_uri:  # the operator's results folder may be written
            roots.append(Path(settings.results_uri).resolve())
        self.sources = SourceReader(settings.s3_options(), roots)
        self.celery: Any = make_celery(
            settings.broker, visibility_timeout_s=settings.visibility_timeout_s
        )
        self.broker = redis.Redis.from_url(
            settings.broker, socket_connect_timeout=3, socket_timeout=30
        )
        self.watchdog = Watchdog(
            self.store,
            self.celery,
            self.broker,
            settings.s3_options(),
            retention_s=settings.job_retention.total_seconds(),
            item_time_limit_s=settings.item_time_limit_s,
            interval_s=settings.watchdog_interval_s,
            finalize_grace_s=max(10.0, 3 * settings.watchdog_interval_s),
            finalize_timeout_s=settings.finalize_timeout_s,
        )
        self._executor = ThreadPoolExecutor(settings.submit_threads, thread_name_prefix="jobs")
        self._watchdog_thread = ThreadPoolExecutor(1, thread_name_prefix="watchdog")
        self._watchdog_task: asyncio.Task[None] | None = None
        check_no_eviction(self.store.redis, "job store", settings.allow_evicting_redis)
        if settings.broker != settings.redis_url:
            check_no_eviction(self.broker, "broker", settings.allow_evicting_redis)

    def start(self) -> None:
        """Start the watchdog on the running event loop."""
        self._watchdog_task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
            await asyncio.gather(self._watchdog_task, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._watchdog_thread.shutdown(wait=False, cancel_futures=True)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await loop.run_in_executor(self._watchdog_thread, self.watchdog.sweep)
            await asyncio.sleep(self.settings.watchdog_interval_s)

    async def _run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def _uri_item(self, uri: str, item_id: str = "") -> ItemInput:
        """An item read from `uri` (checked and made canonical now), its id defaulted."""
        uri = self.sources.normalize(uri)
        return ItemInput(id=item_id or default_item_id(uri), uri=uri)

    def _items(
        self, request: jobs_pb2.SubmitJobRequest
    ) -> tuple[Iterable[ItemInput], dict[int, bytes]]:
        """The job's items, lazily where they come from a listing or a manifest (read while
        the job is recorded, with the item cap counted as they come), and its inline images."""
        kind = request.WhichOneof("input")
        inline: dict[int, bytes] = {}
        if kind == "images":
            items = []
            for index, image in enumerate(request.images.images):
                if image.WhichOneof("source") == "uri":
                    items.append(self._uri_item(image.uri, image.id))
                else:  # a bad (even empty) image is that item's failure, not the job's
                    inline[index] = image.content
                    items.append(ItemInput(id=image.id or str(index)))
            return items, inline
        if kind == "uris":
            return (self._uri_item(uri) for uri in request.uris.uris), inline
        if kind == "prefix":
            listed = (
                ItemInput(id=default_item_id(u), uri=u)
                for u in self.sources.iter_prefix(request.prefix)
            )
            return _non_empty(listed, f"no images under {request.prefix!r}", "prefix"), inline
        if kind == "manifest_uri":
            rows = self.sources.iter_manifest(
                request.manifest_uri, max_bytes=self.settings.max_manifest_bytes
            )
            listed = (self._uri_item(item.uri, item.id) for item in rows)
            message = f"manifest {request.manifest_uri!r} lists no images"
            return _non_empty(listed, message, "manifest_uri"), inline
        raise InvalidArgument(
            "one of images, uris, prefix or manifest_uri is required", field="input"
        )

    async def submit(self, request: jobs_pb2.SubmitJobRequest) -> jobs_pb2.Job:
        """Record and enqueue a job; with a `request_id` seen before, the job it made.

        Raises:
            InvalidArgument: a field is malformed, or the job is empty or over the item cap.
            FailedPrecondition: `output_uri` cannot be written.
            NotFound: the model or version does not exist.
            StorageUnavailable: Redis is unreachable.
        """
        validate_model_name(request.model)
        if request.top_k < 0 or request.chunk_size < 0:
            raise InvalidArgument("top_k and chunk_size must not be negative")
        if not 0.0 <= request.confidence_threshold <= 1.0:
            raise InvalidArgument(
                "confidence_threshold must be in [0, 1]", field="confidence_threshold"
            )
        if request.request_id and not REQUEST_ID.fullmatch(request.request_id):
            raise InvalidArgument(
                "request_id must be 1 to 64 letters, digits, '-' or '_' (a UUID)",
                field="request_id",
            )
        job_id = uuid.uuid4().hex[:20]
        if request.request_id:
            job_id = await self._run(self.store.claim_request, request.request_id, job_id)
            if await self._run(self.store.exists, job_id):  # a retry: the job it made
                return job_to_proto(await self._run(self.store.get, job_id))
        version = await self.pool.resolve(request.model, request.version)  # pinned for the job
        output_uri = request.output_uri or f"{self.settings.results_uri.rstrip('/')}/{job_id}"
        output_uri = self.sources.normalize(output_uri)
        await self._run(check_output_writable, output_uri, self.settings.s3_options())
        chunk_size = min(
            request.chunk_size or self.settings.job_chunk_size, self.settings.max_job_chunk_size
        )
        items, inline = await self._run(self._items, request)
        job, created = await self._run(
            self.store.create,
            model=request.model,
            model_version=version,
            items=items,
            inline=inline,
            output_uri=output_uri,
            top_k=request.top_k or self.settings.default_top_k,
            confidence_threshold=request.confidence_threshold,
            chunk_size=chunk_size,
            labels=dict(request.labels),
            job_id=job_id,
            max_items=self.settings.max_job_items,
            request_id=request.request_id,
        )
        if created:
            await self._run(self._enqueue, job)
        return job_to_proto(job)

    def _enqueue(self, job: Job) -> None:
        """Send every chunk of a new job. A broker that cannot take them now does not fail
        the job: it is recorded, and the watchdog sends its chunks when the broker is back."""
        try:
            send_chunks(
                self.celery,
                job.id,
                range(-(-job.total // job.chunk_size)),
                chunk_size=job.chunk_size,
                total=job.total,
                item_time_limit_s=self.settings.item_time_limit_s,
            )
        except Exception as exc:  # noqa: BLE001 - kombu raises many types for a broker that is down
            log.warning("job %s: chunks not enqueued (the watchdog will): %s", job.id, exc)

    async def get(self, job_id: str) -> jobs_pb2.Job:
        return job_to_proto(await self._run(self.store.get, job_id))

    async def watch(self, job_id: str) -> AsyncIterator[jobs_pb2.Job]:
        """The job now, then whenever it changes (at least every second), until terminal."""
        last: jobs_pb2.Job | None = None
        last_sent = 0.0
        while True:
            job = await self._run(self.store.get, job_id)
            message = job_to_proto(job)
            now = time.monotonic()
            if message != last or now - last_sent >= 1.0:
                yield message
                last, last_sent = message, now
            if job.state.terminal:
                return
            await asyncio.sleep(0.25)

    async def list_results(
        self, request: jobs_pb2.ListJobResultsRequest
    ) -> jobs_pb2.ListJobResultsResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative", field="page_size")
        page_size = min(request.page_size or 1000, 10_000)
        try:
            start = int(request.page_token or 0)
        except ValueError:
            raise InvalidArgument("invalid page_token", field="page_token") from None
        job = await self._run(self.store.get, request.job_id)
        wanted = FILTERS.get(request.filter)
        found: list[ItemResult] = []
        position = start
        while position < job.total and len(found) < page_size:
            window = page_size if wanted is None else max(page_size, 1000)
            batch = await self._run(self.store.results, job.id, position, window)
            if not batch:
                break
            for result in batch:
                position = result.index + 1
                if wanted is None or result.state is wanted:
                    found.append(result)
                    if len(found) == page_size:
                        break
        token = str(position) if position < job.total else ""
        return jobs_pb2.ListJobResultsResponse(
            results=[result_to_proto(r) for r in found], next_page_token=token
        )

    def _cancel(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job.state.terminal:
            return job
        self.store.request_cancel(job_id)
        self.store.mark_unrecorded(job_id, ItemState.CANCELLED, "")
        try:
            return finalize_job(
                self.store,
                job_id,
                self.settings.s3_options(),
                give_up_after_s=self.settings.finalize_timeout_s,
            )
        except Exception as exc:  # noqa: BLE001 - every item is accounted for; the watchdog
            # finishes the job once its results files can be written
            log.warning("job %s: cancelled, results files not written yet: %s", job_id, exc)
            return self.store.get(job_id)

    async def cancel(self, job_id: str) -> jobs_pb2.Job:
        """Every item without a result becomes cancelled now; running chunks stop at their
        next batch (their late results are not recorded over the cancellation)."""
        return job_to_proto(await self._run(self._cancel, job_id))

    async def delete(self, job_id: str) -> None:
        """Delete a job's record and results now, cancelling it first if it has not ended.

        Raises:
            NotFound: no such job.
        """

        def delete() -> None:
            if not self.store.delete(job_id):
                job = self._cancel(job_id)
                if not job.state.terminal:  # its results files could not be written
                    self.store.finish(job_id, [], error="deleted before its results were written")
                self.store.delete(job_id)

        await self._run(delete)


def _non_empty(items: Iterable[ItemInput], message: str, field: str) -> Iterator[ItemInput]:
    """`items` as they come; InvalidArgument(`message`, `field`) if there are none."""
    empty = True
    for item in items:
        empty = False
        yield item
    if empty:
        raise InvalidArgument(message, field=field)


def check_no_eviction(client: redis.Redis, role: str, allowed: bool) -> None:
    """Refuse a Redis whose `maxmemory-policy` evicts keys: under memory pressure it would
    silently drop jobs, item results and queued chunks. Unreadable policies (a managed Redis
    that forbids CONFIG, or one that is down now) are logged and let through.

    Raises:
        RuntimeError: the policy evicts and `allowed` is false.
    """
    try:
        policy = _config_value(client.config_get("maxmemory-policy"), "maxmemory-policy")
    except redis.RedisError as exc:
        log.warning(
            "%s: could not read Redis maxmemory-policy (%s); it must be noeviction", role, exc
        )
        return
    if policy in ("", "noeviction"):
        return
    message = (
        f"the {role} Redis has maxmemory-policy {policy!r}: it may evict jobs, results and "
        "queued chunks under memory pressure. Set it to noeviction (or start with "
        "PERITO_ALLOW_EVICTING_REDIS=true to accept that risk)"
    )
    if not allowed:
        raise RuntimeError(message)
    log.warning("%s", message)


def _config_value(config: Any, name: str) -> str:
    value = config.get(name) or config.get(name.encode()) or ""
    return value.decode() if isinstance(value, bytes) else str(value)
