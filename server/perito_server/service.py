"""The `perito.v1.Perito` servicer: request validation, then the model pool and batcher."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import struct_pb2, timestamp_pb2

from perito.v1 import classify_pb2, jobs_pb2, models_pb2, service_pb2_grpc
from perito_core import tracing
from perito_core.audit import AuditLog
from perito_core.errors import InvalidArgument, InvalidImage, PeritoError
from perito_core.imaging import DecodeInfo, ImageLimits, InputSpec, load_model_input_with_info
from perito_core.logs import REQUEST_ID
from perito_core.manifest import ModelManifest
from perito_core.quotas import RateLimiter
from perito_core.registry import validate_model_name
from perito_core.runtime import summarize
from perito_core.tenancy import Tenants
from perito_server.auth import current_tenant
from perito_server.batcher import ByteBudget
from perito_server.errors import echo, maps_errors, maps_stream_errors
from perito_server.jobs import JobService
from perito_server.metrics import ServerMetrics
from perito_server.model_pool import ModelPool
from perito_server.settings import ServerSettings

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")

# Longest caller-supplied names accepted, in characters; longer ones are refused before they
# are used or quoted back (registry names are at most 63: this bounds what reaches that check).
MAX_MODEL_NAME_CHARS = 128
MAX_VERSION_CHARS = 128
MAX_IMAGE_ID_CHARS = 256


def _image_label(index: int, image_id: str) -> str:
    """`images[3] (id 'claim-1.jpg')`, the id cut to `errors.ECHO_CHARS` characters."""
    return f"images[{index}] (id {echo(image_id)!r})" if image_id else f"images[{index}]"


def _too_long(field: str, length: int, limit: int) -> str:
    return f"{field}: {length} characters; the limit is {limit}"


class PeritoServicer(service_pb2_grpc.PeritoServicer):
    def __init__(
        self,
        settings: ServerSettings,
        pool: ModelPool,
        jobs: JobService,
        metrics: ServerMetrics | None = None,
        tenants: Tenants | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.jobs = jobs
        self.metrics = metrics
        self.tenants = tenants or Tenants()
        self.limiter = RateLimiter(jobs.store.redis)
        self.audit = AuditLog(jobs.store.redis, settings.job_retention.total_seconds())
        self.tenants.on_reload = self._audit_reload
        self.limits: ImageLimits = settings.image_limits()
        self._decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        # Encoded request bytes admitted to any model's batcher and not yet answered.
        self.queue_bytes = ByteBudget(settings.max_queue_bytes)

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    def reload_tenants(self) -> None:
        """Re-read the tenants file (SIGHUP); `_audit_reload` records it."""
        self.tenants.reload()

    def _audit_reload(self, loaded: bool) -> None:
        """Audit a re-read of the tenants file (changed on disk, or SIGHUP)."""
        self.audit.record(
            tenant="",
            method="tenants.reload",
            resource=str(self.tenants.path),
            outcome="OK" if loaded else "INVALID_ARGUMENT",
            detail=f"{len(self.tenants.names)} tenants",
        )

    async def _audited(
        self, method: str, resource: str | Callable[[], str], action: Callable[[], Awaitable[T]]
    ) -> T:
        """Run `action`, then write its audit record (success or the error's code);
        `resource` may be a function, asked once the action has ended."""
        outcome = "OK"
        try:
            return await action()
        except PeritoError as error:
            outcome = error.code.name
            raise
        except Exception:
            outcome = "INTERNAL"
            raise
        finally:
            record = functools.partial(
                self.audit.record,
                tenant=current_tenant().name,
                method=method,
                resource=resource() if callable(resource) else resource,
                outcome=outcome,
                request_id=REQUEST_ID.get() or "",
            )
            await asyncio.get_running_loop().run_in_executor(None, record)

    # Classify

    def _validate(self, request: classify_pb2.ClassifyRequest) -> None:
        """Refuse a malformed request before any work, naming the field at fault.

        Raises:
            InvalidArgument: a missing or over-long model name or version, no images or too
                many, an image id over `MAX_IMAGE_ID_CHARS`, a bad `top_k` or threshold, an
                image given by URI.
        """
        if not request.model:
            raise InvalidArgument("model is required", field="model")
        if len(request.model) > MAX_MODEL_NAME_CHARS:
            raise InvalidArgument(
                _too_long("model", len(request.model), MAX_MODEL_NAME_CHARS), field="model"
            )
        validate_model_name(request.model)
        if len(request.version) > MAX_VERSION_CHARS:
            raise InvalidArgument(
                _too_long("version", len(request.version), MAX_VERSION_CHARS), field="version"
            )
        count = len(request.images)
        if count == 0:
            raise InvalidArgument("at least one image is required", field="images")
        if count > self.settings.max_images_per_request:
            raise InvalidArgument(
                f"{count} images in one request; the limit is "
                f"{self.settings.max_images_per_request} (split the batch, or use SubmitJob)",
                field="images",
            )
        if request.top_k < 0:
            raise InvalidArgument("top_k must be 0 (default) or positive", field="top_k")
        if not 0.0 <= request.confidence_threshold <= 1.0:
            raise InvalidArgument(
                "confidence_threshold must be in [0, 1]", field="confidence_threshold"
            )
        long_ids = [
            (field, _too_long(field, len(image.id), MAX_IMAGE_ID_CHARS))
            for index, image in enumerate(request.images)
            if len(image.id) > MAX_IMAGE_ID_CHARS
            for field in (f"images[{index}].id",)
        ]
        if long_ids:
            more = f" (and {len(long_ids) - 1} more)" if len(long_ids) > 1 else ""
            raise InvalidArgument(long_ids[0][1] + more, field=long_ids[0][0], violations=long_ids)
        for index, image in enumerate(request.images):
            if image.WhichOneof("source") != "content":
                raise InvalidArgument(
                    f"{_image_label(index, image.id)}: Classify takes inline image content; "
                    "send URIs to SubmitJob",
                    field=f"images[{index}]",
                )

    async def _decode_all(
        self, request: classify_pb2.ClassifyRequest, spec: InputSpec
    ) -> list[tuple[np.ndarray, DecodeInfo]]:
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self._decode_pool, load_model_input_with_info, image.content, spec, self.limits
                )
                for image in request.images
            ),
            return_exceptions=True,
        )
        violations = []
        for index, (image, result) in enumerate(zip(request.images, decoded, strict=True)):
            if isinstance(result, InvalidImage):
                violations.append(
                    (f"images[{index}]", f"{_image_label(index, image.id)}: {result}")
                )
            elif isinstance(result, BaseException):
                raise result
        if violations:
            first = violations[0][1]
            more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
            raise InvalidImage(first + more, field=violations[0][0], violations=violations)
        return [result for result in decoded if isinstance(result, tuple)]

    @maps_errors
    async def Classify(
        self, request: classify_pb2.ClassifyRequest, context: Context
    ) -> classify_pb2.ClassifyResponse:
        """Classify the request's images inside the call deadline, results in order.

        Admission is by images (`max_queue_size`, per model) and by encoded request bytes
        (`max_queue_bytes`, server-wide), reserved before decoding.

        Raises (as statuses, through `maps_errors`):
            InvalidArgument: a malformed request (see `_validate`) or undecodable images,
                each named in the violations.
            NotFound: no such model, version or alias.
            QueueFull: no room for the request now (RESOURCE_EXHAUSTED with a retry hint),
                or it can never fit (reason REQUEST_TOO_LARGE).
            DeadlineExceeded: the deadline passed while its images waited.
            ShuttingDown: the server is draining.
        """
        self._validate(request)
        tenant = current_tenant()
        per_minute = tenant.quotas.images_per_minute
        if per_minute is not None:
            await asyncio.to_thread(self.limiter.take, tenant.name, len(request.images), per_minute)
        served = await self.pool.get(request.model, request.version)
        manifest = served.model.manifest
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        admit = served.batcher.admit(
            len(request.images), nbytes=request.ByteSize(), budget=self.queue_bytes
        )
        with admit as admission:
            with tracing.span("perito.decode", images=len(request.images)):
                decoded = await self._decode_all(request, manifest.input.spec())
            with tracing.span("perito.batch", model=served.name, version=served.version):
                probabilities = await admission.run([pixels for pixels, _ in decoded], deadline)
        top_k = request.top_k or self.settings.default_top_k
        threshold = request.confidence_threshold or manifest.confidence_threshold or 0.0
        response = classify_pb2.ClassifyResponse(
            model=served.name, model_version=served.version, confidence_threshold=threshold
        )
        results = zip(request.images, probabilities, decoded, strict=True)
        for index, (image, probs, (_, info)) in enumerate(results):
            summary = summarize(probs, manifest.labels, top_k, threshold)
            response.results.append(
                classify_pb2.Classification(
                    image_id=image.id or str(index),
                    predictions=[
                        classify_pb2.Prediction(
                            label=p.label, class_index=p.class_index, probability=p.probability
                        )
                        for p in summary.predictions
                    ],
                    margin=summary.margin,
                    normalized_entropy=summary.normalized_entropy,
                    uncertain=summary.uncertain,
                    first_frame_only=info.first_frame_only,
                    form=served.model.form,
                )
            )
        return response

    # Bulk jobs

    @maps_errors
    async def SubmitJob(self, request: jobs_pb2.SubmitJobRequest, context: Context) -> jobs_pb2.Job:
        tenant = current_tenant()
        resource = f"models/{request.model[:64]}"

        async def submit() -> jobs_pb2.Job:
            nonlocal resource
            job = await self.jobs.submit(request, tenant)
            resource = f"jobs/{job.id}"
            return job

        job = await self._audited("SubmitJob", lambda: resource, submit)
        if self.metrics is not None:
            self.metrics.jobs_submitted.labels(job.model).inc()
        return job

    @maps_errors
    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: Context) -> jobs_pb2.Job:
        return await self.jobs.get(request.job_id, current_tenant())

    @maps_errors
    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: Context
    ) -> jobs_pb2.ListJobsResponse:
        return await self.jobs.list_jobs(request, current_tenant())

    @maps_stream_errors
    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[jobs_pb2.Job]:
        async for job in self.jobs.watch(request.job_id, current_tenant()):
            yield job

    @maps_errors
    async def ListJobResults(
        self, request: jobs_pb2.ListJobResultsRequest, context: Context
    ) -> jobs_pb2.ListJobResultsResponse:
        return await self.jobs.list_results(request, current_tenant())

    @maps_errors
    async def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: Context) -> jobs_pb2.Job:
        tenant = current_tenant()
        return await self._audited(
            "CancelJob",
            f"jobs/{request.job_id[:64]}",
            lambda: self.jobs.cancel(request.job_id, tenant),
        )

    @maps_errors
    async def DeleteJob(
        self, request: jobs_pb2.DeleteJobRequest, context: Context
    ) -> jobs_pb2.DeleteJobResponse:
        tenant = current_tenant()
        await self._audited(
            "DeleteJob",
            f"jobs/{request.job_id[:64]}",
            lambda: self.jobs.delete(request.job_id, tenant),
        )
        return jobs_pb2.DeleteJobResponse()

    # Models

    @maps_errors
    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative", field="page_size")
        page_size = request.page_size or 100
        tenant = current_tenant()
        names = [
            name
            for name in await asyncio.to_thread(self.pool.registry.list_models)
            if tenant.may_use_model(name)
        ]
        after = [n for n in names if n > request.page_token] if request.page_token else names
        page = after[:page_size]
        models = [await self._describe(name, with_cards=False) for name in page]
        token = page[-1] if len(after) > page_size else ""
        return models_pb2.ListModelsResponse(models=models, next_page_token=token)

    @maps_errors
    async def GetModel(
        self, request: models_pb2.GetModelRequest, context: Context
    ) -> models_pb2.Model:
        validate_model_name(request.model)
        return await self._describe(request.model, with_cards=True)

    async def _describe(self, name: str, *, with_cards: bool) -> models_pb2.Model:
        registry = self.pool.registry

        def read() -> tuple[list[ModelManifest], dict[str, str]]:
            versions = registry.list_versions(name)
            if not versions:
                registry.resolve(name)  # raises NotFound with the standard message
            return [registry.manifest(name, v) for v in versions], registry.aliases(name)

        manifests, aliases = await asyncio.to_thread(read)
        loaded = {version for model, version in self.pool.loaded if model == name}
        model = models_pb2.Model(name=name, latest_version=manifests[-1].version, aliases=aliases)
        for manifest in manifests:
            created = timestamp_pb2.Timestamp()
            created.FromDatetime(manifest.created_at)
            version = models_pb2.ModelVersion(
                model=name,
                version=manifest.version,
                aliases=sorted(a for a, v in aliases.items() if v == manifest.version),
                labels=manifest.labels,
                input_height=manifest.input.height,
                input_width=manifest.input.width,
                sha256=manifest.artifact.sha256,
                create_time=created,
                description=manifest.description,
                loaded=manifest.version in loaded,
            )
            if with_cards:
                card = struct_pb2.Struct()
                card.update(manifest.card())
                version.card.CopyFrom(card)
            model.versions.append(version)
        return model
