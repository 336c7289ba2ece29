"""The bulk-job RPCs: submit (resolve, pin, split, enqueue), read, watch, page, cancel."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from google.protobuf import timestamp_pb2

from perito.v1 import classify_pb2, jobs_pb2
from perito_core.errors import InvalidArgument, StorageUnavailable
from perito_core.jobs import ItemInput, ItemResult, ItemState, Job, JobState, JobStore
from perito_core.queue import BULK_QUEUE, CLASSIFY_CHUNK, make_celery
from perito_core.registry import validate_model_name
from perito_core.results import finalize_job
from perito_core.sources import SourceReader, default_item_id
from perito_server.model_pool import ModelPool
from perito_server.settings import ServerSettings

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
            )
        )
    return message


class JobService:
    """Jobs live in Redis; chunks go to the Celery bulk queue, never to this process."""

    def __init__(self, settings: ServerSettings, pool: ModelPool) -> None:
        self.settings = settings
        self.pool = pool
        self.store = JobStore.connect(settings.redis_url)
        roots = list(settings.local_roots)
        if "://" not in settings.results_uri:  # the operator's results folder may be written
            roots.append(Path(settings.results_uri).resolve())
        self.sources = SourceReader(settings.s3_options(), roots)
        self.celery: Any = make_celery(
            settings.redis_url, visibility_timeout_s=settings.visibility_timeout_s
        )

    def _uri_item(self, uri: str, item_id: str = "") -> ItemInput:
        """An item read from `uri` (checked and made canonical now), its id defaulted."""
        uri = self.sources.normalize(uri)
        return ItemInput(id=item_id or default_item_id(uri), uri=uri)

    def _items(
        self, request: jobs_pb2.SubmitJobRequest
    ) -> tuple[list[ItemInput], dict[int, bytes]]:
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
            return [self._uri_item(uri) for uri in request.uris.uris], inline
        if kind == "prefix":
            uris = self.sources.list_images(request.prefix)
            if not uris:
                raise InvalidArgument(f"no images under {request.prefix!r}", field="prefix")
            return [ItemInput(id=default_item_id(u), uri=u) for u in uris], inline
        if kind == "manifest_uri":
            listed = self.sources.read_manifest(request.manifest_uri)
            return [self._uri_item(item.uri, item.id) for item in listed], inline
        raise InvalidArgument(
            "one of images, uris, prefix or manifest_uri is required", field="input"
        )

    async def submit(self, request: jobs_pb2.SubmitJobRequest) -> jobs_pb2.Job:
        validate_model_name(request.model)
        if request.top_k < 0 or request.chunk_size < 0:
            raise InvalidArgument("top_k and chunk_size must not be negative")
        if not 0.0 <= request.confidence_threshold <= 1.0:
            raise InvalidArgument(
                "confidence_threshold must be in [0, 1]", field="confidence_threshold"
            )
        version = await self.pool.resolve(request.model, request.version)  # pinned for the job
        items, inline = await asyncio.to_thread(self._items, request)
        if len(items) > self.settings.max_job_items:
            raise InvalidArgument(
                f"{len(items):,} images; the limit per job is {self.settings.max_job_items:,}"
            )
        job_id = uuid.uuid4().hex[:20]
        output_uri = request.output_uri or f"{self.settings.results_uri.rstrip('/')}/{job_id}"
        output_uri = self.sources.normalize(output_uri)
        chunk_size = request.chunk_size or self.settings.job_chunk_size
        job = await asyncio.to_thread(
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
        )
        await asyncio.to_thread(self._enqueue, job, chunk_size)
        return job_to_proto(job)

    def _enqueue(self, job: Job, chunk_size: int) -> None:
        try:
            with self.celery.producer_or_acquire() as producer:
                for chunk, start in enumerate(range(0, job.total, chunk_size)):
                    self.celery.send_task(
                        CLASSIFY_CHUNK,
                        kwargs={
                            "job_id": job.id,
                            "chunk": chunk,
                            "start": start,
                            "stop": min(start + chunk_size, job.total),
                        },
                        queue=BULK_QUEUE,
                        producer=producer,
                    )
        except Exception as exc:  # noqa: BLE001 - kombu raises many types for a broker that is down
            message = f"the job queue (broker) is unreachable: {exc}"
            self.store.set_job_error(job.id, message)
            self.store.mark_unrecorded(job.id, ItemState.FAILED, message)
            finalize_job(self.store, job.id, self.settings.s3_options())
            raise StorageUnavailable(message) from None

    async def get(self, job_id: str) -> jobs_pb2.Job:
        return job_to_proto(await asyncio.to_thread(self.store.get, job_id))

    async def watch(self, job_id: str) -> AsyncIterator[jobs_pb2.Job]:
        """The job now, then whenever it changes (at least every second), until terminal."""
        last: jobs_pb2.Job | None = None
        last_sent = 0.0
        while True:
            job = await asyncio.to_thread(self.store.get, job_id)
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
        job = await asyncio.to_thread(self.store.get, request.job_id)
        wanted = FILTERS.get(request.filter)
        found: list[ItemResult] = []
        position = start
        while position < job.total and len(found) < page_size:
            window = page_size if wanted is None else max(page_size, 1000)
            batch = await asyncio.to_thread(self.store.results, job.id, position, window)
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

    async def cancel(self, job_id: str) -> jobs_pb2.Job:
        """Every item without a result becomes cancelled now; running chunks stop at their
        next batch (their late results are not recorded over the cancellation)."""

        def cancel() -> Job:
            job = self.store.get(job_id)
            if job.state.terminal:
                return job
            self.store.request_cancel(job_id)
            self.store.mark_unrecorded(job_id, ItemState.CANCELLED, "")
            return finalize_job(self.store, job_id, self.settings.s3_options())

        return job_to_proto(await asyncio.to_thread(cancel))
