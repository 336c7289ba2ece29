"""The bulk-job RPCs: submit (resolve, pin, split, enqueue), read, watch, page, cancel,
delete; and the job watchdog that makes every accepted job end (`perito_core.jobs.watchdog`)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
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
from perito.v1.vocabulary import ItemState, JobState, Prediction
from perito_core.access.quotas import InProgress
from perito_core.access.tenancy import Access, Tenant, check_uri
from perito_core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PeritoError,
    PermissionDenied,
    QuotaExceeded,
    StorageUnavailable,
    echo,
)
from perito_core.jobs.parts import data_location
from perito_core.jobs.queue import make_celery, send_chunks
from perito_core.jobs.results import check_output_writable, finalize_job, item_provenance
from perito_core.jobs.sources import SourceReader, default_item_id
from perito_core.jobs.store import (
    DELETED_MARK,
    ItemInput,
    ItemResult,
    Job,
    JobStore,
)
from perito_core.jobs.watchdog import Watchdog
from perito_core.models.provenance import CardFigures, ServedVersion
from perito_core.models.selection import check_precision, requested_precision
from perito_core.models.summary import Classification
from perito_core.redis_connection import redis_client
from perito_core.storage import (
    check_uri_text,
    echo_uri,
    is_other_scheme,
    local_path_of,
    split_s3_uri,
)
from perito_server.answers import classification_message, quality_message
from perito_server.model_pool import ModelPool
from perito_server.paging import LIST_JOB_RESULTS, LIST_JOBS
from perito_server.settings import ServerSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# AIP-155 request ids: a UUID in practice; anything short and URL-safe is accepted.
REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# What a job id may be (the ids made here are 20 hex digits); anything else is refused on its
# text, never looked up: the store's keys for a job's parts (`<id>:open`) are not jobs.
JOB_ID = REQUEST_ID
NO_INPUT = "input: one of images, uris, prefix or manifest_uri is required"
# The longest image id a caller may give, in characters: a Classify image's, a job item's.
MAX_IMAGE_ID_CHARS = 256
# Job labels: at most 64; a key as Kubernetes names labels (1 to 63 letters, digits, '-', '_'
# or '.', starting and ending with a letter or digit); a value of at most 256 characters, none
# a control character (a claim number, "2026-12-07 inspection", a path). They live in the
# job's Redis record, read by every listing: bounded, one tenant cannot fill the Redis every
# tenant shares.
MAX_LABELS = 64
MAX_LABEL_VALUE_CHARS = 256
LABEL_KEY = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")

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
STATES_OF = {value: state for state, value in JOB_STATES.items()}
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
        output_uri=job.shown_output_uri,
        result_uris=job.shown_result_uris,
        error=job.error,
        labels=job.labels,
        tenant=job.tenant,
    )


def result_to_proto(
    result: ItemResult, job: Job, figures: CardFigures | None = None
) -> jobs_pb2.JobItemResult:
    """One item's recorded outcome; a succeeded one answers as `Classify` would, its
    provenance joined from the job's record (`item_provenance`) and, given the version's
    `figures`, the card's figures."""
    message = jobs_pb2.JobItemResult(
        index=result.index,
        image_id=result.id,
        uri=result.uri,
        state=ITEM_STATES[result.state],
        error=result.error,
    )
    if result.state is ItemState.SUCCEEDED:
        summary = Classification(
            [Prediction(label, index, p) for label, index, p in result.predictions],
            result.margin,
            result.normalized_entropy,
            result.uncertain,
        )
        provenance = item_provenance(job, result)
        message.classification.CopyFrom(
            classification_message(
                summary,
                image_id=result.id,
                form=result.form,
                first_frame_only=result.first_frame_only,
                provenance=classify_pb2.Provenance(**provenance) if provenance else None,
                quality=quality_message(result.quality),
                figures=figures,
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
        self.store = JobStore.connect(settings.redis_url, s3=settings.s3_options())
        self.job_data_root = job_data_root(settings)
        self._watching = InProgress("QUOTA_CONCURRENT_WATCHES", retry_after=5.0)
        roots = list(settings.local_roots)
        if "://" not in settings.results_uri:  # the operator's results folder may be written
            roots.append(Path(settings.results_uri).resolve())
        self.sources = SourceReader(settings.s3_options(), roots)
        self.celery: Any = make_celery(
            settings.broker,
            visibility_timeout_s=settings.visibility_timeout_s,
            setting=settings.broker_setting,
        )
        self.broker = redis_client(
            settings.broker,
            setting=settings.broker_setting,
            socket_connect_timeout=3,
            socket_timeout=30,
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

    @property
    def reserved_locations(self) -> list[str]:
        """Where no job may read or write by name: the model registry, the server's default
        results area (every job's own folder is made there by the server), and the jobs'
        data (every tenant's inputs and result parts)."""
        return [self.settings.registry, self.settings.results_uri, self.job_data_root]

    def check_location(
        self,
        tenant: Tenant,
        uri: str,
        access: Access,
        field: str,
        *,
        names_object: bool = False,
        folders: dict[Path, Path] | None = None,
    ) -> str:
        """`uri` made canonical, if `tenant` may `access` it. Nothing is created or read; a
        refusal names `field` and quotes `uri` as the caller gave it (never where a symbolic
        link leads, nor the server's local roots). With `names_object` (an image, a
        manifest), an S3 URI without a key is refused too. `folders`: the folders one
        submission resolved so far (`SourceReader.normalize`).

        The tenant's prefixes are checked first, on the path as given and then once more as
        made canonical (a link swapped in between cannot lead out): to a tenant with prefixes,
        another tenant's folder and a folder under no local root are the same refusal.

        Raises:
            InvalidArgument: a malformed location (`check_uri_text`: empty, a NUL byte, over
                4,096 bytes, not UTF-8, a relative local path, a `.` or `..` segment, an S3
                URI without a bucket), or one no worker could read
                (another scheme, a local path under no local root).
            PermissionDenied: outside the tenant's prefixes, or in a reserved location.
        """
        check_uri_text(uri, field, names_object=names_object)
        checked = not is_other_scheme(uri)
        if checked:
            check_uri(
                tenant, uri, access, field, forbidden=self.reserved_locations, text_checked=True
            )
        try:
            normalized = self.sources.normalize(uri, folders)
        except InvalidArgument as exc:
            refusal = PermissionDenied if uri[:5].lower() == "s3://" else InvalidArgument
            raise refusal(f"{field}: {exc.message}", field=field) from None
        if checked and normalized != uri:
            check_uri(
                tenant, normalized, access, field, forbidden=self.reserved_locations, given=uri
            )
        return normalized

    def _uri_item(
        self,
        tenant: Tenant,
        uri: str,
        field: str,
        item_id: str = "",
        folders: dict[Path, Path] | None = None,
    ) -> ItemInput:
        """An item read from `uri` (checked and made canonical now), its id defaulted to
        the file name the caller wrote, its results naming `uri` as the caller wrote it (not
        where a symbolic link leads).

        Raises:
            InvalidArgument: an id over `MAX_IMAGE_ID_CHARS` (field `{field}.id`), or as
                `check_location`.
        """
        check_item_id(item_id, field)
        checked = self.check_location(
            tenant, uri, "read", field, names_object=True, folders=folders
        )
        given = uri if uri != checked else ""
        return ItemInput(id=item_id or default_item_id(uri), uri=checked, given=given)

    def _listed_item(
        self, tenant: Tenant, uri: str, prefix: str, given: str, folders: dict[Path, Path]
    ) -> ItemInput:
        """An object `uri` found under the listed `prefix` (canonical; `given`: the caller's
        words for it), its id its path below the prefix (`a/x.jpg` and `b/x.jpg` stay apart;
        its file name where that path is over `MAX_IMAGE_ID_CHARS`), its results naming it
        under `given`. One the tenant may not read (a symlink out of the folder, out of the
        tenant's prefixes) is not the job's failure but that item's: it is recorded failed
        with the reason, and never read."""
        below = uri[len(prefix) :].lstrip("/") if uri.startswith(prefix) else ""
        item_id = below if 0 < len(below) <= MAX_IMAGE_ID_CHARS else default_item_id(uri)
        shown = f"{given.rstrip('/')}/{below}" if below else (given if uri == prefix else uri)
        try:
            return self._uri_item(tenant, shown, "prefix", item_id, folders=folders)
        except (InvalidArgument, PermissionDenied) as exc:
            error = f"{exc.reason}: {exc.message}"
            return ItemInput(item_id, uri, error, given=shown if shown != uri else "")

    def _items(
        self, request: jobs_pb2.SubmitJobRequest, tenant: Tenant
    ) -> tuple[Iterable[ItemInput], dict[int, bytes]]:
        """The job's items, lazily where they come from a listing or a manifest (read while
        the job is recorded, with the item cap counted as they come), and its inline images.
        Every URI is checked against the tenant's prefixes: the listing or manifest before
        it is read, each item as it comes."""
        kind = request.WhichOneof("input")
        inline: dict[int, bytes] = {}
        folders: dict[Path, Path] = {}  # resolved once for all the items
        if kind == "images":
            items = []
            for index, image in enumerate(request.images.images):
                if image.WhichOneof("source") is None:
                    raise InvalidArgument(
                        f"images[{index}]: neither content nor uri", field=f"images[{index}]"
                    )
                if image.WhichOneof("source") == "uri":
                    field = f"images[{index}].uri"
                    items.append(self._uri_item(tenant, image.uri, field, image.id))
                else:  # a bad (even empty) image is that item's failure, not the job's
                    check_item_id(image.id, f"images[{index}]")
                    inline[index] = image.content
                    items.append(ItemInput(id=image.id or str(index)))
            return items, inline
        if kind == "uris":  # checked now, all of them: the request holds them already
            return [
                self._uri_item(tenant, uri, f"uris[{index}]", folders=folders)
                for index, uri in enumerate(request.uris.uris)
            ], inline
        if kind == "prefix":
            prefix = self.check_location(tenant, request.prefix, "read", "prefix")
            listed = (
                self._listed_item(tenant, uri, prefix, request.prefix, folders)
                for uri in self.sources.iter_prefix(prefix)
            )
            message = f"prefix: no images under {echo_uri(request.prefix)}"
            return _non_empty(listed, message, "prefix"), inline
        if kind == "manifest_uri":
            manifest = self.check_location(
                tenant, request.manifest_uri, "read", "manifest_uri", names_object=True
            )
            rows = self.sources.iter_manifest(manifest, max_bytes=self.settings.max_manifest_bytes)
            listed = (
                self._uri_item(tenant, item.uri, f"manifest_uri (item {number})", item.id, folders)
                for number, item in enumerate(rows, start=1)
            )
            message = f"manifest_uri: {echo_uri(request.manifest_uri)} lists no images"
            return _non_empty(listed, message, "manifest_uri"), inline
        raise InvalidArgument(NO_INPUT, field="input")

    async def submit(self, request: jobs_pb2.SubmitJobRequest, tenant: Tenant) -> jobs_pb2.Job:
        """Record and enqueue a job owned by `tenant`; with a `request_id` the tenant used
        before, the job it made. The model, version, `top_k`, `confidence_threshold` and
        `chunk_size` are checked first by `InferenceService.submit_job`.

        Raises:
            InvalidArgument: a field is malformed, or the job is empty or over the item cap.
            PermissionDenied: a URI outside the tenant's prefixes or in a reserved location,
                or an `output_uri` where another job writes (the field is named).
            QuotaExceeded: the tenant runs its most concurrent jobs (with a retry hint), or
                the job has more items than its quota allows.
            FailedPrecondition: `output_uri` cannot be written.
            PrecisionUnavailable: the version has no form of the `precision` named.
            NotFound: the model or version does not exist.
            StorageUnavailable: Redis is unreachable.
        """
        asked = requested_precision(request.precision, self.settings.precision)  # refused early
        if asked.required:  # a precision the version has no form of: now, not by a worker
            version = await self.pool.resolve(request.model, request.version)
            manifest = await self._run(self.pool.registry.manifest, request.model, version)
            check_precision(manifest, asked)
        if request.request_id and not REQUEST_ID.fullmatch(request.request_id):
            raise InvalidArgument(
                "request_id must be 1 to 64 letters, digits, '-' or '_' (a UUID)",
                field="request_id",
            )
        check_labels(dict(request.labels), "labels")
        check_input_given(request)
        new_id = job_id = uuid.uuid4().hex[:20]
        if request.request_id:
            job_id = await self._run(
                self.store.claim_request, request.request_id, job_id, tenant.name
            )
            if job_id.startswith(DELETED_MARK):
                raise FailedPrecondition(
                    f"request_id {request.request_id!r} made job "
                    f"{job_id.removeprefix(DELETED_MARK)!r}, since deleted; a new job needs a "
                    "new request_id",
                    field="request_id",
                )
            if await self._run(self.store.exists, job_id):  # a retry: the job it made
                return job_to_proto(await self._owned(job_id, tenant))
        try:
            return await self._accept(request, tenant, job_id)
        except Exception:
            if request.request_id and job_id == new_id:  # the id is free again
                await self._run(self._forget, job_id, tenant, request_id=request.request_id)
            raise

    async def _accept(
        self, request: jobs_pb2.SubmitJobRequest, tenant: Tenant, job_id: str
    ) -> jobs_pb2.Job:
        """`submit` once the request id is claimed: the output checked, a quota slot held."""
        if request.output_uri:
            output_uri = self.check_location(tenant, request.output_uri, "write", "output_uri")
        else:
            output_uri = f"{self.settings.results_uri.rstrip('/')}/{job_id}"
            output_uri = self.sources.normalize(output_uri)
        limit = tenant.quotas.concurrent_jobs
        if limit is not None and not await self._run(
            self.store.reserve_slot, tenant.name, job_id, limit
        ):
            raise QuotaExceeded(
                f"tenant {tenant.name!r} already runs {limit} jobs, its quota; submit again "
                "when one ends",
                reason="QUOTA_CONCURRENT_JOBS",
                retry_after=max(5.0, self.settings.watchdog_interval_s),
            )
        try:
            return await self._create(request, tenant, job_id, output_uri)
        finally:
            if limit is not None:  # frees the slot only if no job was made
                await self._run(self.store.release_slot, tenant.name, job_id)

    async def _create(
        self, request: jobs_pb2.SubmitJobRequest, tenant: Tenant, job_id: str, output_uri: str
    ) -> jobs_pb2.Job:
        """Check the input, claim and test-write the output, record the job. Everything the
        request names is checked before anything is made; what a listing or a manifest
        brings is checked as it is read, and a job refused then leaves nothing behind: no
        output claim, no folder made by the write test."""
        version = await self.pool.resolve(request.model, request.version)  # pinned for the job
        # Its file digests, recorded once with the job for each item's provenance.
        manifest = await self._run(self.pool.registry.manifest, request.model, version)
        chunk_size = min(
            request.chunk_size or self.settings.job_chunk_size, self.settings.max_job_chunk_size
        )
        items, inline = await self._run(self._items, request, tenant)
        max_items = self.settings.max_job_items
        quota = tenant.quotas.items_per_job
        if quota is not None and quota < max_items:
            items = _within_quota(items, quota, tenant.name)
        claimed = ""
        made: list[Path] = []
        try:
            if request.output_uri:
                claimed = await self._run(self._claim_output, output_uri, job_id)
            made = await self._run(self._test_write, output_uri, request.output_uri)
            job, created = await self._run(
                self.store.create,
                model=request.model,
                model_version=version,
                items=items,
                inline=inline,
                output_uri=output_uri,
                top_k=request.top_k or self.settings.default_top_k,
                confidence_threshold=request.confidence_threshold,
                precision=request.precision,
                chunk_size=chunk_size,
                labels=dict(request.labels),
                job_id=job_id,
                max_items=max_items,
                request_id=request.request_id,
                tenant=tenant.name,
                served=ServedVersion.of(manifest),
                data_root=data_location(self.job_data_root, tenant.name, job_id),
                output_shown=self._output_shown(request.output_uri, output_uri, tenant),
            )
        except Exception:
            await self._run(self._forget, job_id, tenant, output=claimed, made=made)
            raise
        if created:
            await self._run(self._enqueue, job)
        return job_to_proto(job)

    @staticmethod
    def _output_shown(given: str, output_uri: str, tenant: Tenant) -> str:
        """What a job's owner is told of where its results go (`Job.output_shown`): the
        `output_uri` they gave, as they wrote it (never where a symbolic link leads); the
        server's results location (`output_uri`) only to an `admin` (the operator, and the
        one tenant of a server without a tenants file); "" to any other tenant, who reads the
        results with ListJobResults."""
        if given:
            return given
        return output_uri if tenant.has_role("admin") else ""

    def _claim_output(self, output_uri: str, job_id: str) -> str:
        """Make `output_uri` this job's; refuse it when it is, or is under, the output
        location of another job kept now (its results files would be overwritten). Returns
        the location claimed (for `_forget`).

        Raises:
            PermissionDenied: field `output_uri`.
        """
        ttl_s = int(self.settings.job_retention.total_seconds()) + 86_400
        locations = _ancestors(output_uri)
        if not self.store.claim_output(job_id, locations, ttl_s):
            raise PermissionDenied(
                "output_uri: another job writes its results there; choose a new folder",
                field="output_uri",
                reason="OUTPUT_IN_USE",
            )
        return locations[0]

    def _test_write(self, output_uri: str, given: str) -> list[Path]:
        """`check_output_writable` of `output_uri` (canonical), a refusal quoting `given` (the
        caller's text, "" for the default location), and the local folders it made, deepest
        first: none are left behind if the test fails, and `_forget` removes them if the job
        is refused.

        Raises:
            FailedPrecondition: field `output_uri`, as `check_output_writable`.
        """
        made = _missing_folders(output_uri)
        try:
            check_output_writable(output_uri, self.settings.s3_options(), given=given)
        except Exception:
            _remove_empty(made)
            raise
        return made

    def _forget(
        self,
        job_id: str,
        tenant: Tenant,
        *,
        request_id: str = "",
        output: str = "",
        made: Iterable[Path] = (),
    ) -> None:
        """Undo what a refused submission of `job_id` made: its request id and output claims
        in Redis, the empty folders its write test made. Nothing is undone if the job exists
        (it was accepted after all); a Redis that cannot be reached now is logged, its claims
        left to expire."""
        try:
            if self.store.exists(job_id):
                return
            self.store.release_claims(
                job_id, request_id=request_id, tenant=tenant.name, output_location=output
            )
        except StorageUnavailable as exc:
            log.warning("job %s refused; its claims stay until they expire: %s", job_id, exc)
            return
        _remove_empty(made)

    def _enqueue(self, job: Job) -> None:
        """Send every chunk of a new job. A broker that cannot take them now does not fail
        the job: it is recorded, and the watchdog sends its chunks when the broker is back."""
        try:
            send_chunks(
                self.celery,
                job.id,
                range(job.chunks),
                chunk_size=job.chunk_size,
                total=job.total,
                item_time_limit_s=self.settings.item_time_limit_s,
            )
        except Exception as exc:  # noqa: BLE001 - kombu raises many types for a broker that is down
            log.warning("job %s: chunks not enqueued (the watchdog will): %s", job.id, exc)

    async def _owned(self, job_id: str, tenant: Tenant) -> Job:
        """The job, if `tenant` owns it.

        Raises:
            InvalidArgument: field `job_id`: empty, or not a `JOB_ID` (1 to 64 letters,
                digits, `-` or `_`), decided on the text alone.
            NotFound: no such job, or another tenant's: the same answer, so that a job id
                says nothing about whether someone else's job exists.
        """
        if not job_id:
            raise InvalidArgument("job_id is required", field="job_id")
        if not JOB_ID.fullmatch(job_id):
            raise InvalidArgument(
                f"job_id: {echo_uri(job_id)} is not a job id (1 to 64 letters, digits, '-' or '_')",
                field="job_id",
            )
        job = await self._run(self.store.get, job_id)
        if job.tenant != tenant.name:
            raise NotFound(f"job {job_id!r} not found", field="job_id")
        return job

    async def get(self, job_id: str, tenant: Tenant) -> jobs_pb2.Job:
        """Raises: NotFound: no such job of `tenant`'s."""
        return job_to_proto(await self._owned(job_id, tenant))

    async def list_jobs(
        self, request: jobs_pb2.ListJobsRequest, tenant: Tenant
    ) -> jobs_pb2.ListJobsResponse:
        """`tenant`'s jobs, newest first, filtered, paged as `paging.LIST_JOBS` says.

        Raises:
            InvalidArgument: a negative page size, a bad page token or state.
        """
        page_size = LIST_JOBS.of(request.page_size)
        check_labels(dict(request.labels), "labels")
        try:
            states = frozenset(STATES_OF[state] for state in request.states)
        except KeyError:
            raise InvalidArgument("unknown job state", field="states") from None
        jobs, token = await self._run(
            self.store.list_jobs,
            tenant.name,
            page_size=page_size,
            page_token=request.page_token,
            states=states,
            labels=dict(request.labels),
        )
        return jobs_pb2.ListJobsResponse(
            jobs=[job_to_proto(job) for job in jobs], next_page_token=token
        )

    async def watch(self, job_id: str, tenant: Tenant) -> AsyncIterator[jobs_pb2.Job]:
        """The job now, then whenever it changes (at least every second), until terminal.

        Raises:
            NotFound: no such job of `tenant`'s.
            QuotaExceeded: `tenant` holds `max_watches_per_tenant` streams on this server
                already (reason QUOTA_CONCURRENT_WATCHES, with a retry hint).
        """
        last: jobs_pb2.Job | None = None
        last_sent = 0.0
        await self._owned(job_id, tenant)
        most = self.settings.max_watches_per_tenant
        with self._watching.hold(
            tenant.name,
            most,
            f"tenant {tenant.name!r} already watches {most} jobs on this server, the most at "
            "once; end one, or poll GetJob",
        ):
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
        self, request: jobs_pb2.ListJobResultsRequest, tenant: Tenant
    ) -> jobs_pb2.ListJobResultsResponse:
        """A page of `tenant`'s job's results, paged as `paging.LIST_JOB_RESULTS` says.

        Raises:
            InvalidArgument: a negative page size or a bad page token.
            NotFound: no such job of `tenant`'s.
        """
        page_size = LIST_JOB_RESULTS.of(request.page_size)
        # The tokens made here: an item's position, in ASCII digits (int() would also take
        # "-1", "1_0" and other scripts' digits).
        token = request.page_token
        if token and not (token.isascii() and token.isdigit() and len(token) <= 12):
            raise InvalidArgument("invalid page_token", field="page_token")
        start = int(token or 0)
        if request.filter not in FILTERS and request.filter != jobs_pb2.RESULT_FILTER_UNSPECIFIED:
            raise InvalidArgument(f"unknown filter {request.filter}", field="filter")
        job = await self._owned(request.job_id, tenant)
        wanted = FILTERS.get(request.filter)
        found, position = await self._run(
            self.store.page_results, job, start, page_size, state=wanted
        )
        token = str(position) if position < job.total else ""
        figures = await self._run(self._figures, job)
        return jobs_pb2.ListJobResultsResponse(
            results=[result_to_proto(r, job, figures) for r in found],
            next_page_token=token,
            model=job.model,
            model_version=job.model_version,
        )

    def _figures(self, job: Job) -> CardFigures | None:
        """The card's figures of the job's version; None when its manifest cannot be read
        (the answer goes without them)."""
        try:
            return CardFigures.of(self.pool.registry.manifest(job.model, job.model_version))
        except PeritoError as error:
            log.warning("job %s: no card figures: %s", job.id, error)
            return None

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

    async def cancel(self, job_id: str, tenant: Tenant) -> jobs_pb2.Job:
        """Every item without a result becomes cancelled now; running chunks stop at their
        next batch (their late results are not recorded over the cancellation).

        Raises:
            NotFound: no such job of `tenant`'s.
        """
        await self._owned(job_id, tenant)
        return job_to_proto(await self._run(self._cancel, job_id))

    async def delete(self, job_id: str, tenant: Tenant) -> None:
        """Delete a job's record and results now, cancelling it first if it has not ended;
        its output location may be given to a new job at once.

        Raises:
            NotFound: no such job of `tenant`'s.
        """
        owned = await self._owned(job_id, tenant)

        def delete() -> None:
            if not self.store.delete(job_id):
                job = self._cancel(job_id)
                if not job.state.terminal:  # its results files could not be written
                    self.store.finish(job_id, [], error="deleted before its results were written")
                self.store.delete(job_id)
            # Its output location is free again (a claim naming another job stays).
            if owned.output_uri:
                location = _ancestors(owned.output_uri)[0]  # as `_claim_output` claimed it
                self.store.release_claims(job_id, output_location=location)

        await self._run(delete)


def job_data_root(settings: ServerSettings) -> str:
    """Where jobs keep their data (`perito_core.jobs.parts`): `job_data_uri`, else the folder
    `.job-data` under `results_uri`; a local folder made absolute, as recorded in each job
    (workers may start elsewhere)."""
    uri = settings.job_data_uri or f"{settings.results_uri.rstrip('/')}/.job-data"
    if uri[:5].lower() == "s3://":
        return uri.rstrip("/")
    return str(local_path_of(uri).resolve())


def _ancestors(uri: str) -> list[str]:
    """`uri` (without a trailing "/") and every folder above it, down to the bucket (or the
    filesystem root)."""
    uri = uri.rstrip("/")
    if uri[:5].lower() == "s3://":
        bucket, key = split_s3_uri(uri)
        parts = [p for p in key.split("/") if p]
        return [f"s3://{bucket}/" + "/".join(parts[:n]) for n in range(len(parts), 0, -1)]
    path = Path(uri)
    return [str(path), *(str(parent) for parent in path.parents)]


def _missing_folders(uri: str) -> list[Path]:
    """The folders of the local location `uri` (canonical, absolute) that do not exist,
    deepest first; none for an S3 location (S3 has no folders to leave behind)."""
    if uri[:5].lower() == "s3://":
        return []
    missing = []
    path = Path(uri)
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty(folders: Iterable[Path]) -> None:
    """Remove each folder, deepest first, stopping at the first that is not empty (another
    submission writes there now) or cannot be removed."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _within_quota(items: Iterable[ItemInput], quota: int, tenant: str) -> Iterator[ItemInput]:
    """`items` as they come, refusing the job once it passes `tenant`'s items-per-job quota."""
    for count, item in enumerate(items, start=1):
        if count > quota:
            raise QuotaExceeded(
                f"more than {quota:,} images; tenant {tenant!r} may submit at most {quota:,} "
                "per job",
                field="input",
                reason="QUOTA_ITEMS_PER_JOB",
            )
        yield item


def check_input_given(request: jobs_pb2.SubmitJobRequest) -> None:
    """Refuse a job without input, or with an empty image or URI list, before anything is
    reserved for it (a quota slot, a request id).

    Raises:
        InvalidArgument: field `input`, `images` or `uris`.
    """
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument(NO_INPUT, field="input")
    if (kind == "images" and not request.images.images) or (
        kind == "uris" and not request.uris.uris
    ):
        raise InvalidArgument(f"{kind}: empty; a job needs at least one image", field=kind)


def too_long(field: str, length: int, limit: int) -> str:
    """A refusal's words for a text over its limit: `images[2].id: 300 characters; the limit
    is 256`."""
    return f"{field}: {length} characters; the limit is {limit}"


def check_item_id(item_id: str, field: str) -> None:
    """Refuse an image id over `MAX_IMAGE_ID_CHARS`, as Classify does: field `{field}.id`.

    Raises:
        InvalidArgument: naming the field and the length.
    """
    if len(item_id) > MAX_IMAGE_ID_CHARS:
        raise InvalidArgument(
            too_long(f"{field}.id", len(item_id), MAX_IMAGE_ID_CHARS), field=f"{field}.id"
        )


def check_labels(labels: dict[str, str], field: str) -> None:
    """A job's labels (or a listing's label filter): at most `MAX_LABELS`, each key
    `LABEL_KEY`, each value at most `MAX_LABEL_VALUE_CHARS` characters, no control character.

    Raises:
        InvalidArgument: naming `field` and the key (cut short) that is not one.
    """
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{field}: {len(labels)} labels; at most {MAX_LABELS}", field=field)
    rule = "1 to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            raise InvalidArgument(f"{field}: key {echo(key)!r} is not {rule}", field=field)
        if len(value) > MAX_LABEL_VALUE_CHARS or not value.isprintable():
            raise InvalidArgument(  # the key is one by now: safe to quote whole
                f"{field}[{key}]: the value must be at most {MAX_LABEL_VALUE_CHARS} "
                "characters, none a control character",
                field=f"{field}[{key}]",
            )


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
