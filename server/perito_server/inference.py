"""The inference service: what every protocol door calls (KServe calls it the data plane).

`InferenceService` holds the logic of classification (`classify`, and `infer`, the one path
every door's images take: quota, model version, admission, decode, dynamic batcher), of the
Open Inference Protocol (`oip_infer`, `model_manifest`, `model_ready`), of the model listing
and of the bulk-job calls, given its collaborators explicitly. The doors
(`perito_server.doors`: perito.v1 gRPC, OIP gRPC, OIP REST, the JSON API) are siblings over
it: each only translates its protocol's request into these calls and the answers and errors
back (`perito_server.errors`, one table for every door), so a fix or a speed-up here lands once
for all of them. Nothing here knows a wire protocol beyond the messages of the API contract
(`perito.v1`) and the protocol-neutral OIP tensors (`perito_server.oip_protocol`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
from google.protobuf import struct_pb2, timestamp_pb2

from perito.v1 import classify_pb2, jobs_pb2, models_pb2
from perito_core import tracing
from perito_core.access.audit import AuditLog, AuditRecord
from perito_core.access.quotas import RateLimiter
from perito_core.access.tenancy import Tenant, Tenants
from perito_core.errors import InvalidArgument, InvalidImage, NotFound, PeritoError
from perito_core.imaging import DecodeInfo, ImageLimits, InputSpec, load_model_input_with_info
from perito_core.logs import REQUEST_ID
from perito_core.models.manifest import ModelCard, ModelManifest
from perito_core.models.provenance import (
    CardFigures,
    ServedVersion,
    provenance_record,
    sha256_hex,
)
from perito_core.models.registry import validate_model_name
from perito_core.models.summary import (
    FAULT_MESSAGES,
    output_faults,
    summarize,
)
from perito_core.quality import (
    FLAG_ONLY,
    POOR_QUALITY,
    THRESHOLD_FIELDS,
    Quality,
    QualityGate,
    effective_thresholds,
    explain_issues,
    find_issues,
    parse_thresholds,
)
from perito_core.scheduling import InteractiveActivity
from perito_server.answers import classification_message, quality_message
from perito_server.batcher import ByteBudget
from perito_server.drift import DriftMonitor
from perito_server.errors import echo
from perito_server.explanations import OCCLUSION, explain
from perito_server.jobs import MAX_IMAGE_ID_CHARS, JobService, too_long
from perito_server.metrics import ServerMetrics
from perito_server.model_pool import ModelPool, ServedModel, alias_rollouts, check_routing_key
from perito_server.oip_protocol import (
    IMAGES_INPUT,
    PIXELS_INPUT,
    PROBABILITIES_OUTPUT,
    ROUTING_KEY_PARAMETER,
    InferResult,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    image_count,
    model_metadata,
    quality_gate,
    quality_parameter,
)
from perito_server.paging import LIST_MODELS
from perito_server.predictions import Outcome, PredictionRecorder
from perito_server.settings import ServerSettings
from perito_server.shadow import ShadowTraffic
from perito_server.turns import TakingTurns

log = logging.getLogger(__name__)

T = TypeVar("T")
# An image's index -> (the field naming it, a label for messages): see `InferenceService.infer`.
Describe = Callable[[int], tuple[str, str]]

# Longest caller-supplied names accepted, in characters; longer ones are refused before they
# are used or quoted back (registry names are at most 63: this bounds what reaches that check).
MAX_MODEL_NAME_CHARS = 128
MAX_VERSION_CHARS = 128


@dataclass(frozen=True)
class Inference:
    """What `InferenceService.infer` answers: each image's probabilities, in order.

    Attributes:
        model: the model's name.
        version: the version that answered (an alias resolved).
        form: the served form that answered (`torchscript-fp32`, ...).
        manifest: that version's manifest (labels, input size, threshold).
        probabilities: one float32 array [C] per image, C = len(manifest.labels).
        infos: what decoding each image found; None for images sent as pixels.
        input_sha256: each image's sha256 (hex) as received: of its encoded bytes, or for
            pixels of its uint8 [H, W, 3] array's bytes (row-major).
        pixels: each image as the model took it, uint8 [H, W, 3].
        served: the loaded version that answered (its batcher runs explanations).
        quality: each image's photo-quality measures and issues (`perito_core.quality`);
            None for images sent as pixels (already resized: not measured).
    """

    model: str
    version: str
    form: str
    manifest: ModelManifest
    probabilities: list[np.ndarray]
    infos: list[DecodeInfo | None]
    input_sha256: list[str]
    pixels: list[np.ndarray]
    served: ServedModel
    quality: list[Quality | None]


def _image_label(index: int, image_id: str) -> str:
    """`images[3] (id 'claim-1.jpg')`, the id cut to `errors.ECHO_CHARS` characters."""
    return f"images[{index}] (id {echo(image_id)!r})" if image_id else f"images[{index}]"


def _decode_one(
    content: bytes, spec: InputSpec, limits: ImageLimits
) -> tuple[np.ndarray, DecodeInfo, str]:
    """One image as the model takes it (`load_model_input_with_info`), what decoding found,
    and the sha256 (hex) of its bytes as received (provenance's `input_sha256`), both on the
    decode thread that holds it: a large photo is never hashed on the event loop.

    Raises:
        InvalidImage: as `load_model_input_with_info`.
    """
    pixels, info = load_model_input_with_info(content, spec, limits)
    return pixels, info, sha256_hex(content)


def _pixel_digests(images: np.ndarray) -> list[str]:
    """The sha256 (hex) of each uint8 [H, W, 3] image of `images` [N, H, W, 3], row-major."""
    return [sha256_hex(np.ascontiguousarray(image).data) for image in images]


class InferenceService:
    """Classification, the Open Inference Protocol, models and bulk jobs, for every door.

    Each method takes the tenant the call acts as (the door's auth edge has checked its token,
    role and, where the path names one, its model) and raises `PeritoError`s, which each door
    turns into its protocol's error with `perito_server.errors`.

    Args:
        settings: the server's settings (limits, defaults).
        pool: the loaded model versions and their dynamic batchers.
        jobs: the bulk-job calls over the job store.
        limiter: the tenants' images-per-minute quotas.
        audit: where state-changing calls are recorded.
        tenants: the tenants (a re-read of their file is audited).
        metrics: the server's metrics, or None.
    """

    def __init__(
        self,
        settings: ServerSettings,
        pool: ModelPool,
        jobs: JobService,
        limiter: RateLimiter,
        audit: AuditLog,
        tenants: Tenants,
        metrics: ServerMetrics | None = None,
        *,
        predictions: PredictionRecorder | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.jobs = jobs
        self.limiter = limiter
        self.audit = audit
        self.metrics = metrics
        self.predictions = predictions
        self.tenants = tenants
        self.tenants.on_reload = self._audit_reload
        self.limits: ImageLimits = settings.image_limits()
        # Every door's images, decoded in turns by tenant: one tenant's large images do not
        # hold the others' behind them (`turns`).
        self._decode_pool = TakingTurns(settings.decode_threads, "decode")
        # Encoded request bytes admitted to any model's batcher and not yet answered.
        self.queue_bytes = ByteBudget(settings.max_queue_bytes)
        # False once the server drains (OIP readiness).
        self.ready = True
        # (model, version) -> its file digests and card figures, read once per version.
        self._versions: dict[tuple[str, str], tuple[ServedVersion, CardFigures]] = {}
        # Shadow traffic (perito_server.shadow), when the app sets it.
        self.shadow: ShadowTraffic | None = None
        # Drift detection's live windows (perito_server.drift), when the app sets one.
        self.drift: DriftMonitor | None = None
        # Where this host's bulk workers see a caller's images in hand, when the app sets it.
        self.activity: InteractiveActivity | None = None

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    def reload_tenants(self) -> None:
        """Re-read the tenants file (SIGHUP); `_audit_reload` records it."""
        self.tenants.reload()

    def _audit_reload(self, loaded: bool) -> None:
        """Audit a re-read of the tenants file (changed on disk, or SIGHUP)."""
        self.audit.record(
            AuditRecord.now(
                tenant="",
                method="tenants.reload",
                resource=str(self.tenants.path),
                outcome="OK" if loaded else "INVALID_ARGUMENT",
                detail=f"{len(self.tenants.names)} tenants",
            )
        )

    async def _audited(
        self,
        tenant: Tenant,
        method: str,
        resource: str | Callable[[], str],
        action: Callable[[], Awaitable[T]],
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
            entry = AuditRecord.now(
                tenant=tenant.name,
                method=method,
                resource=resource() if callable(resource) else resource,
                outcome=outcome,
                request_id=REQUEST_ID.get() or "",
            )
            await asyncio.get_running_loop().run_in_executor(None, self.audit.record, entry)

    # Classify

    @staticmethod
    def check_model(model: str, version: str) -> None:
        """Refuse a missing, malformed or over-long model name or version, before any work.

        Raises:
            InvalidArgument: naming `model` or `version`.
        """
        if not model:
            raise InvalidArgument("model is required", field="model")
        if len(model) > MAX_MODEL_NAME_CHARS:
            raise InvalidArgument(
                too_long("model", len(model), MAX_MODEL_NAME_CHARS), field="model"
            )
        validate_model_name(model)
        if len(version) > MAX_VERSION_CHARS:
            raise InvalidArgument(
                too_long("version", len(version), MAX_VERSION_CHARS), field="version"
            )

    @staticmethod
    def check_answer_options(top_k: int, confidence_threshold: float) -> None:
        """Refuse a negative `top_k` or a threshold outside [0, 1] (Classify and SubmitJob).

        Raises:
            InvalidArgument: naming `top_k` or `confidence_threshold`.
        """
        if top_k < 0:
            raise InvalidArgument("top_k must be 0 (default) or positive", field="top_k")
        if not 0.0 <= confidence_threshold <= 1.0:
            raise InvalidArgument(
                "confidence_threshold must be in [0, 1]", field="confidence_threshold"
            )

    def check_target(self, model: str, version: str, images: int, images_field: str) -> None:
        """Refuse a request for a bad model name or version, or with no images or too many,
        before any work: the checks every door (Classify, ModelInfer, the JSON API) shares.

        Args:
            model: the model's name.
            version: a version, an alias or "" (latest).
            images: how many images the request holds.
            images_field: the name of the field holding them, quoted in a refusal.

        Raises:
            InvalidArgument: naming the field at fault.
        """
        self.check_model(model, version)
        if images == 0:
            raise InvalidArgument("at least one image is required", field=images_field)
        if images > self.settings.max_images_per_request:
            raise InvalidArgument(
                f"{images} images in one request; the limit is "
                f"{self.settings.max_images_per_request} (split the batch, or use SubmitJob)",
                field=images_field,
            )

    @staticmethod
    def quality_gate(request: classify_pb2.ClassifyRequest) -> QualityGate:
        """What a `ClassifyRequest` asks of the photo-quality gate: its `quality_policy` and
        `quality_thresholds` (docs/trust.md#quality).

        Raises:
            InvalidArgument: an unknown policy, or a threshold out of its range, named.
        """
        policy = request.quality_policy
        if policy not in classify_pb2.QualityPolicy.values():
            raise InvalidArgument(
                f"quality_policy {policy} is none of FLAG and REFUSE", field="quality_policy"
            )
        message = request.quality_thresholds
        given = {
            name: getattr(message, name) for name in THRESHOLD_FIELDS if message.HasField(name)
        }
        return QualityGate(
            refuse=policy == classify_pb2.QUALITY_POLICY_REFUSE,
            override=parse_thresholds(given, "quality_thresholds."),
        )

    def _validate(self, request: classify_pb2.ClassifyRequest) -> None:
        """Refuse a malformed request before any work, naming the field at fault.

        Raises:
            InvalidArgument: a missing or over-long model name or version, no images or too
                many, more than `max_explanations_per_request` with `explain` (naming
                `explain`), an image id over `MAX_IMAGE_ID_CHARS`, a bad `top_k` or
                threshold, an image given by URI.
        """
        self.check_target(request.model, request.version, len(request.images), "images")
        self.check_answer_options(request.top_k, request.confidence_threshold)
        most = self.settings.max_explanations_per_request
        if request.explain and len(request.images) > most:
            raise InvalidArgument(
                f"explain: {len(request.images)} images in one request; the server explains "
                f"at most {most} per call (each costs {OCCLUSION.passes} forward passes): send "
                "fewer at a time",
                field="explain",
            )
        long_ids = [
            (field, too_long(field, len(image.id), MAX_IMAGE_ID_CHARS))
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
        self, tenant: str, contents: Sequence[bytes], spec: InputSpec, describe: Describe
    ) -> list[tuple[np.ndarray, DecodeInfo, str]]:
        """Each image decoded and resized (`_decode_one`, on the decode threads, in
        `tenant`'s turns), in order.

        Raises:
            InvalidImage: the undecodable images, each named by `describe`.
        """
        decoded = await asyncio.gather(
            *(
                asyncio.wrap_future(
                    self._decode_pool.submit_as(tenant, _decode_one, content, spec, self.limits)
                )
                for content in contents
            ),
            return_exceptions=True,
        )
        violations, reasons = [], {}
        for index, result in enumerate(decoded):
            if isinstance(result, InvalidImage):
                field, label = describe(index)
                violations.append((field, f"{label}: {result}"))
                reasons[field] = result.reason
                if self.metrics is not None:
                    self.metrics.images_rejected.labels(result.reason).inc()
            elif isinstance(result, BaseException):
                raise result
        if violations:
            first = violations[0][1]
            more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
            raise InvalidImage(
                first + more,
                reason=reasons[violations[0][0]],
                field=violations[0][0],
                violations=violations,
                violation_reasons=reasons,
            )
        return [result for result in decoded if isinstance(result, tuple)]

    async def infer(
        self,
        tenant: Tenant,
        model: str,
        version: str,
        images: Sequence[bytes] | np.ndarray,
        *,
        nbytes: int,
        deadline: float | None,
        describe: Describe,
        precision: str = "",
        quality: QualityGate = FLAG_ONLY,
        routing_key: str = "",
    ) -> Inference:
        """Classify `images` with `model@version`: the one path every door takes.

        Spends the tenant's images-per-minute quota, admits the request by images
        (`max_queue_size`, per model) and by bytes (`max_queue_bytes`, server-wide) before
        decoding, decodes and resizes with the shared function, and runs the model version's
        dynamic batcher. The caller has checked the tenant's role and model list (at the
        door's auth edge) and `check_target`.

        Args:
            tenant: the tenant the call acts as.
            model: the model's name.
            version: a version, an alias or "" (latest).
            images: encoded images (any accepted format), or a uint8 array [N, H, W, 3]
                already at the model's input size (RGB).
            nbytes: the request's size, counted against `max_queue_bytes`.
            deadline: `time.monotonic()` by which the answer is due, or None.
            describe: index -> (field, label) naming an image in a refusal, e.g.
                `("images[3]", "images[3] (id 'a.jpg')")`.
            precision: a precision to answer in, at least as exact as the server's setting,
                or "" for that setting (a preference): docs/models.md#precision.
            quality: the photo-quality gate's policy and threshold overrides: each decoded
                image is judged by the version's card's thresholds (`_judge`); with
                `quality.refuse`, poor photos are refused before the model runs.
            routing_key: keeps requests with the same key on one version while the alias
                has a canary ("": each request drawn at random): docs/models.md#canary.

        Returns:
            The probabilities of each image, in order, what answered, and each image's
            quality.

        Raises:
            QuotaExceeded: over the tenant's images per minute.
            NotFound: no such model, version or alias.
            InvalidArgument: pixels not [N, H, W, 3] at the model's input size, a
                `precision` that is not one or is less exact than the server's, or a
                `routing_key` over `MAX_ROUTING_KEY_CHARS`.
            PrecisionUnavailable: (FAILED_PRECONDITION) a `precision` no form of the version
                serves here (`selection.check_precision`).
            InvalidImage: undecodable images, each named by `describe` in the violations; or
                with `quality.refuse`, poor photos (reason POOR_QUALITY, each named with its
                issues), before any model compute.
            QueueFull: no room now (with a retry hint), or never (REQUEST_TOO_LARGE).
            DeadlineExceeded: the deadline passed while its images waited.
            ShuttingDown: the server is draining.
        """
        check_routing_key(routing_key)
        served = await self.pool.get(
            model,
            version,
            precision,
            routing_key=routing_key,
            images=len(images),
            pixels=isinstance(images, np.ndarray),  # shaped for the alias's own version
        )
        # Spent once the call names something that answers: a model, version or precision
        # that is not there costs the tenant nothing.
        per_minute = tenant.quotas.images_per_minute
        if per_minute is not None:
            await asyncio.to_thread(self.limiter.take, tenant.name, len(images), per_minute)
        manifest = served.model.manifest
        spec = manifest.input.spec()
        infos: list[DecodeInfo | None]
        judged: list[Quality | None]
        digests: list[str]
        with (
            served.batcher.admit(len(images), nbytes=nbytes, budget=self.queue_bytes) as admit,
            self._in_hand(),
        ):
            if isinstance(images, np.ndarray):
                expected = (spec.height, spec.width, 3)
                if images.dtype != np.uint8 or images.shape[1:] != expected:
                    field, _ = describe(0)
                    raise InvalidArgument(
                        f"pixels must be uint8 [N, {spec.height}, {spec.width}, 3] for "
                        f"{served.name}@{served.version}; got {images.dtype} "
                        f"{list(images.shape)}",
                        field=field.partition("[")[0],
                    )
                pixels, infos = list(images), [None] * len(images)
                judged = [None] * len(images)
                digests = await asyncio.wrap_future(
                    self._decode_pool.submit_as(tenant.name, _pixel_digests, images)
                )
            else:
                with tracing.span("perito.decode", images=len(images)):
                    decoded = await self._decode_all(tenant.name, images, spec, describe)
                pixels = [p for p, _, _ in decoded]
                infos = [info for _, info, _ in decoded]
                digests = [digest for _, _, digest in decoded]
                judged = self._judge(manifest, infos, quality, describe)
            with tracing.span("perito.batch", model=served.name, version=served.version):
                probabilities = await admit.run(pixels, deadline)
        if self.drift is not None:  # queued in memory only: written to Redis off this path
            self.drift.observe(manifest, probabilities, judged)
        inference = Inference(
            served.name,
            served.version,
            served.model.form,
            manifest,
            probabilities,
            infos,
            digests,
            pixels,
            served,
            judged,
        )
        if self.shadow is not None:  # queued in memory only: run after the caller's answer
            self.shadow.offer(version, images, inference)
        return inference

    @contextlib.contextmanager
    def _in_hand(self) -> Iterator[None]:
        """Mark a call's images in hand, admission to answer, for the bulk workers on this
        host (`InteractiveActivity`: none starts a forward pass meanwhile)."""
        activity = self.activity
        if activity is None:
            yield
            return
        activity.begin()
        try:
            yield
        finally:
            activity.end()

    def _judge(
        self,
        manifest: ModelManifest,
        infos: Sequence[DecodeInfo | None],
        gate: QualityGate,
        describe: Describe,
    ) -> list[Quality | None]:
        """Each decoded image's quality issues against the card's thresholds (the defaults
        where it has none, the request's overrides in their place); with `gate.refuse`, refuse
        the poor ones: each is named in the violations with its issues, reason POOR_QUALITY,
        and counted in `perito_images_rejected_total{reason="POOR_QUALITY"}`.

        Raises:
            InvalidImage: `gate.refuse` and some image has an issue.
        """
        thresholds = effective_thresholds(manifest.quality, gate.override)  # once a request
        judged = [
            None
            if info is None or info.quality is None
            else Quality(info.quality, find_issues(info.quality, thresholds))
            for info in infos
        ]
        if not gate.refuse:
            return judged
        poor = [
            (describe(index), quality)
            for index, quality in enumerate(judged)
            if quality is not None and quality.issues
        ]
        if not poor:
            return judged
        if self.metrics is not None:
            self.metrics.images_rejected.labels(POOR_QUALITY).inc(len(poor))
        violations = [
            (field, f"{label}: poor photo quality: {explain_issues(quality, thresholds)}")
            for (field, label), quality in poor
        ]
        more = f" (and {len(poor) - 1} more)" if len(poor) > 1 else ""
        raise InvalidImage(
            f"{violations[0][1]}{more} [{POOR_QUALITY}]",
            reason=POOR_QUALITY,
            field=violations[0][0],
            violations=violations,
        )

    def version_facts(self, manifest: ModelManifest) -> tuple[ServedVersion, CardFigures]:
        """A version's file digests (provenance) and model-card figures, read from its
        manifest once (a published version never changes)."""
        key = (manifest.name, manifest.version)
        facts = self._versions.get(key)
        if facts is None:
            if len(self._versions) >= 1024:
                self._versions.clear()
            facts = self._versions[key] = (ServedVersion.of(manifest), CardFigures.of(manifest))
        return facts

    async def classify(
        self, request: classify_pb2.ClassifyRequest, tenant: Tenant, deadline: float | None
    ) -> classify_pb2.ClassifyResponse:
        """`Classify` as `tenant`, due by `deadline` (monotonic): for every door; its answer
        or refusal is written to the tenant's prediction log (docs/trust.md#prediction-log).

        Raises:
            PeritoError: as `_classify`.
        """
        # Each image's bytes, read out of the message once: for the model and for the log.
        contents = [image.content for image in request.images]
        try:
            response = await self._classify(request, tenant, deadline, contents)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._log(tenant, request, contents, Outcome(error=error))
            raise
        self._log(tenant, request, contents, Outcome(response=response))
        return response

    def _log(
        self,
        tenant: Tenant,
        request: classify_pb2.ClassifyRequest,
        contents: list[bytes],
        outcome: Outcome,
    ) -> None:
        """Queue a Classify call's record in the tenant's prediction log, if it keeps one:
        references only (the images' bytes as `contents` holds them, the digests provenance
        computed), the request's size counted as its images' bytes."""
        if self.predictions is not None:
            answer = outcome.response
            digests = (
                [result.provenance.input_sha256 for result in answer.results]
                if isinstance(answer, classify_pb2.ClassifyResponse)
                else None
            )
            self.predictions.record(
                tenant,
                request,
                contents,
                outcome,
                model=request.model,
                nbytes=sum(map(len, contents)),
                input_sha256=digests,
            )

    async def _classify(
        self,
        request: classify_pb2.ClassifyRequest,
        tenant: Tenant,
        deadline: float | None,
        contents: list[bytes],
    ) -> classify_pb2.ClassifyResponse:
        """`Classify` as `tenant`, due by `deadline` (monotonic); `contents` is each image's
        `content`, in order.

        Admission is by images (`max_queue_size`, per model) and by encoded request bytes
        (`max_queue_bytes`, server-wide), reserved before decoding.

        Raises:
            InvalidArgument: a malformed request (see `_validate`) or undecodable images,
                each named in the violations; or images whose model output is no answer
                (NaN or infinity, or not probabilities: `_refuse_faulty_outputs`).
            NotFound: no such model, version or alias.
            QueueFull: no room for the request now (RESOURCE_EXHAUSTED with a retry hint),
                or it can never fit (reason REQUEST_TOO_LARGE); with `explain`, no room in
                the low-priority lane for its forward passes.
            DeadlineExceeded: the deadline passed while its images waited, or, with
                `explain`, before its explanations were done (`explanations.explain`).
            ShuttingDown: the server is draining.
        """
        self._validate(request)
        gate = self.quality_gate(request)

        def describe(i: int) -> tuple[str, str]:
            return f"images[{i}]", _image_label(i, request.images[i].id)

        inference = await self.infer(
            tenant,
            request.model,
            request.version,
            contents,
            nbytes=request.ByteSize(),
            deadline=deadline,
            describe=describe,
            precision=request.precision,
            quality=gate,
            routing_key=request.routing_key,
        )
        self._refuse_faulty_outputs(inference, describe, per_image=True)
        explanations = (
            await explain(
                inference.served,
                inference.pixels,
                inference.probabilities,
                deadline=deadline,
                executor=self._decode_pool,
                refuse_faulty=lambda bad: self._refuse_faulty_outputs(
                    inference, describe, per_image=True, bad=bad
                ),
            )
            if request.explain
            else None
        )
        return self.answer(
            inference,
            [image.id or str(index) for index, image in enumerate(request.images)],
            top_k=request.top_k or self.settings.default_top_k,
            threshold=inference.manifest.threshold(request.confidence_threshold),
            explanations=explanations,
        )

    def answer(
        self,
        inference: Inference,
        image_ids: Sequence[str],
        *,
        top_k: int,
        threshold: float,
        request_id: str | None = None,
        explanations: Sequence[classify_pb2.Explanation | None] | None = None,
    ) -> classify_pb2.ClassifyResponse:
        """The `ClassifyResponse` of `inference`: each image's top `top_k` predictions, its
        `uncertain` flag against `threshold`, provenance and the card's figures. Classify's
        answer; for OIP, what its prediction-log record holds.

        Args:
            inference: what the model answered.
            image_ids: each image's id, in order.
            top_k: predictions per image (clipped to the labels).
            threshold: the confidence threshold applied (0: none).
            request_id: the call's request id; None: this context's (`REQUEST_ID`).
            explanations: each image's explanation, in order (`explain`); None: none.
        """
        manifest = inference.manifest
        response = classify_pb2.ClassifyResponse(
            model=inference.model, model_version=inference.version, confidence_threshold=threshold
        )
        served, figures = self.version_facts(manifest)
        if request_id is None:
            request_id = REQUEST_ID.get() or ""
        results = zip(
            image_ids,
            inference.probabilities,
            inference.infos,
            inference.input_sha256,
            explanations or [None] * len(image_ids),
            inference.quality,
            strict=True,
        )
        # What every image's provenance shares, built once; each copy gets its own two.
        template = classify_pb2.Provenance(
            **provenance_record(
                served,
                input_sha256="",
                model=inference.model,
                model_version=inference.version,
                form=inference.form,
                confidence_threshold=threshold,
                request_id=request_id,
            )
        )
        for image_id, probs, info, digest, explanation, quality in results:
            summary = summarize(probs, manifest.labels, top_k, threshold)
            provenance = classify_pb2.Provenance()
            provenance.CopyFrom(template)
            provenance.input_sha256 = digest
            if quality is not None:
                provenance.quality_issues.extend(quality.issues)
            response.results.append(
                classification_message(
                    summary,
                    image_id=image_id,
                    form=inference.form,
                    first_frame_only=info is not None and info.first_frame_only,
                    provenance=provenance,
                    quality=quality_message(quality),
                    explanation=explanation,
                    figures=figures,
                )
            )
        return response

    def _refuse_faulty_outputs(
        self,
        inference: Inference,
        describe: Describe,
        *,
        per_image: bool,
        bad: Mapping[int, str] | None = None,
    ) -> None:
        """Refuse to answer for images whose model output is no answer
        (`summary.output_fault`: NaN or infinity, MODEL_OUTPUT_NOT_FINITE; a value outside
        [0, 1] or values not summing to 1, MODEL_OUTPUT_NOT_PROBABILITIES): each is named in
        the violations with its reason and counted in `perito_model_outputs_refused_total`.

        Args:
            inference: what the model answered.
            describe: an image's index -> (its field, a label for messages).
            bad: the images to refuse and why, found elsewhere (an explanation's forward
                passes); None: those of `inference.probabilities` (`output_faults`).
            per_image: the protocol fails images one by one (`Classify`: INVALID_ARGUMENT, as
                for an undecodable image, so that the SDK's `on_invalid="skip"` answers the
                others); otherwise (OIP, all or nothing) the call fails INTERNAL, as Triton
                answers a model's failure: the model is at fault, not the request.

        Raises:
            InvalidImage: `per_image`, naming each image; its reason the first image's.
            PeritoError: INTERNAL otherwise, naming each image.
        """
        if bad is None:
            bad = output_faults(inference.probabilities)
        if not bad:
            return
        if self.metrics is not None:
            for reason in bad.values():
                self.metrics.outputs_refused.labels(
                    inference.model, inference.version, inference.form, reason
                ).inc()
        log.warning(
            "%s@%s (%s): the output for %d of %d images is no answer (%s)",
            inference.model,
            inference.version,
            inference.form,
            len(bad),
            len(inference.probabilities),
            ", ".join(sorted(set(bad.values()))),
        )
        violations, reasons = [], {}
        for index, fault in bad.items():
            field, label = describe(index)
            violations.append((field, f"{label}: {FAULT_MESSAGES[fault]}"))
            reasons[field] = fault
        reason = next(iter(bad.values()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        error = InvalidImage if per_image else PeritoError
        raise error(
            f"{violations[0][1]}{more} [{reason}]",
            reason=reason,
            field=violations[0][0],
            violations=violations,
            violation_reasons=reasons,
        )

    # The Open Inference Protocol

    async def model_manifest(self, model: str, version: str) -> ModelManifest:
        """The manifest of `model` at `version` (a version, an alias or "" for latest).

        Raises:
            InvalidArgument: a malformed name.
            NotFound: no such model, version or alias.
        """
        self.check_model(model, version)
        pool = self.pool
        resolved = await pool.resolve(model, version)
        return await asyncio.to_thread(pool.registry.manifest, model, resolved)

    async def oip_model_metadata(self, model: str, version: str) -> dict[str, Any]:
        """OIP's model metadata (`model_metadata`) of `model` at `version` (a
        version, an alias or "" for latest), listing every version of the model.

        Raises:
            InvalidArgument: a malformed name.
            NotFound: no such model, version or alias.
        """
        manifest = await self.model_manifest(model, version)
        versions = await asyncio.to_thread(self.pool.registry.list_versions, model)
        return model_metadata(manifest, versions)

    async def model_ready(self, model: str, version: str) -> bool:
        """Whether `model@version` exists and the server takes requests (a version that is
        not loaded yet is loaded by the first request).

        Raises:
            InvalidArgument: a malformed name.
        """
        if not self.ready:
            return False
        try:
            await self.model_manifest(model, version)
        except NotFound:
            return False
        return True

    async def oip_infer(
        self,
        tenant: Tenant,
        model: str,
        version: str,
        inputs: Sequence[InputTensor],
        outputs: Sequence[RequestedOutput],
        *,
        nbytes: int,
        deadline: float | None,
        precision: object = None,
        quality: Mapping[str, object] | None = None,
        routing_key: object = None,
    ) -> InferResult:
        """Classify the images of the one input, and answer the requested outputs; the answer or
        refusal is written to the tenant's prediction log (docs/trust.md#prediction-log).

        Args:
            tenant: the caller's tenant (its role and model list already checked).
            model, version: the model, and a version, alias or "" (latest).
            inputs: exactly one: BYTES [N] / [N, 1] of encoded images, or UINT8 [N, H, W, 3].
            outputs: what to answer; empty means `probabilities`.
            nbytes: the request's size, for admission (`max_queue_bytes`).
            deadline: `time.monotonic()` by which to answer, or None.
            precision: the request's `precision` parameter (Perito's, as
                `ClassifyRequest.precision`: honoured or refused), None when absent.
            quality: the request's parameters (at least those of
                `oip_protocol.QUALITY_PARAMETERS` it holds), as sent: checked here
                (`oip_protocol.quality_gate`), a refusal logged as any other; refusing poor
                photos is all or nothing here too.
            routing_key: the request's `perito_routing_key` parameter (as
                `ClassifyRequest.routing_key`), None when absent.

        Returns:
            `probabilities` FP32 [N, C], or with `classification` = k, BYTES [N, k] of
            "score:index:label" (k clipped to C), for each output asked for; the response
            parameters: provenance, the card's figures and `perito_quality`
            (`oip_protocol.quality_parameter`).

        Raises:
            InvalidArgument: not one input, a bad shape or datatype, an unknown output, a bad
                `classification`, `precision` or quality parameter (named), an undecodable
                image (named `<input>[i]`).
            NotFound, PrecisionUnavailable, QueueFull, QuotaExceeded, DeadlineExceeded,
                ShuttingDown: as `infer`.
            PeritoError: INTERNAL, reason MODEL_OUTPUT_NOT_FINITE or _NOT_PROBABILITIES, when
                the model's output for any image is no answer (`_refuse_faulty_outputs`).
        """
        asked = classify_pb2.ClassifyRequest(
            model=model, version=version, precision=precision if isinstance(precision, str) else ""
        )
        images = inputs[0].data if len(inputs) == 1 else []
        try:
            result, inference = await self._oip_infer(
                tenant,
                model,
                version,
                inputs,
                outputs,
                nbytes=nbytes,
                deadline=deadline,
                precision=precision,
                quality=quality,
                routing_key=routing_key,
            )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._log_oip(tenant, asked, images, Outcome(error=error), nbytes)
            raise
        request_id = REQUEST_ID.get() or ""
        # The log keeps its own copy of the images: not the model's pixels (views of the
        # request's array, which its byte bound would not count).
        answered = replace(inference, pixels=[])

        def answer() -> classify_pb2.ClassifyResponse:  # on the log's thread
            return self.answer(
                answered,
                [str(index) for index in range(len(answered.probabilities))],
                top_k=self.settings.default_top_k,
                threshold=answered.manifest.threshold(),
                request_id=request_id,
            )

        self._log_oip(
            tenant, asked, images, Outcome(response=answer), nbytes, inference.input_sha256
        )
        return result

    def _log_oip(
        self,
        tenant: Tenant,
        asked: classify_pb2.ClassifyRequest,
        images: Sequence[bytes] | np.ndarray,
        outcome: Outcome,
        nbytes: int,
        input_sha256: Sequence[str] | None = None,
    ) -> None:
        """Queue an OIP call's record in the tenant's prediction log, if it keeps one: its
        answer as Classify's (the default top_k, the version's recommended threshold), and
        each image's sha256 once provenance computed it."""
        if self.predictions is not None:
            self.predictions.record(
                tenant,
                asked,
                images,
                outcome,
                model=asked.model,
                nbytes=nbytes,
                input_sha256=input_sha256,
            )

    async def _oip_infer(
        self,
        tenant: Tenant,
        model: str,
        version: str,
        inputs: Sequence[InputTensor],
        outputs: Sequence[RequestedOutput],
        *,
        nbytes: int,
        deadline: float | None,
        precision: object = None,
        quality: Mapping[str, object] | None = None,
        routing_key: object = None,
    ) -> tuple[InferResult, Inference]:
        """`oip_infer`'s work: its result, and the inference it came from."""
        if len(inputs) != 1:
            raise InvalidArgument(
                f"{len(inputs)} inputs; send exactly one: {IMAGES_INPUT!r} (BYTES) or "
                f"{PIXELS_INPUT!r} (UINT8)",
                field="inputs",
            )
        tensor = inputs[0]
        count = image_count(tensor.shape, tensor.datatype, tensor.name)
        for output in outputs:
            if output.name != PROBABILITIES_OUTPUT:
                raise InvalidArgument(
                    f"output {echo(output.name)!r}: unknown; the output is "
                    f"{PROBABILITIES_OUTPUT!r}",
                    field="outputs",
                )
            if output.classification < 0:
                raise InvalidArgument(
                    "the classification parameter must be a positive count", field="outputs"
                )
        if precision is not None and not isinstance(precision, str):
            raise InvalidArgument("the precision parameter must be a string", field="precision")
        gate = quality_gate(quality or {})
        key = check_routing_key(routing_key, ROUTING_KEY_PARAMETER)
        self.check_target(model, version, count, tensor.name)
        name = echo(tensor.name)

        def describe(i: int) -> tuple[str, str]:
            return f"{tensor.name[:64]}[{i}]", f"input {name!r}, image {i}"

        inference = await self.infer(
            tenant,
            model,
            version,
            tensor.data,
            nbytes=nbytes,
            deadline=deadline,
            describe=describe,
            precision=precision or "",
            quality=gate,
            routing_key=key,
        )
        self._refuse_faulty_outputs(inference, describe, per_image=False)
        wanted = outputs or [RequestedOutput(PROBABILITIES_OUTPUT)]
        result = InferResult(
            inference.model,
            inference.version,
            [_output(inference, o) for o in wanted],
            self._oip_parameters(inference),
        )
        return result, inference

    def _oip_parameters(self, inference: Inference) -> dict[str, str | float]:
        """Provenance and the card's figures as OIP response parameters (scalars; a value per
        image is a JSON array in a string): docs/trust.md#provenance."""
        served, figures = self.version_facts(inference.manifest)
        expected = [
            figures.expected_accuracy(float(np.max(probs))) for probs in inference.probabilities
        ]
        return {
            "perito_model_version": inference.version,
            "perito_artifact_sha256": served.artifact_sha256,
            "perito_form": inference.form,
            "perito_form_sha256": json.dumps(served.form_files(inference.form)),
            "perito_input_sha256": json.dumps(inference.input_sha256),
            "perito_request_id": REQUEST_ID.get() or "",
            "perito_confidence_threshold": inference.manifest.threshold(),
            "perito_expected_accuracy": json.dumps(expected),
            **quality_parameter(inference.quality),
        }

    # Bulk jobs

    async def submit_job(self, request: jobs_pb2.SubmitJobRequest, tenant: Tenant) -> jobs_pb2.Job:
        """`SubmitJob` as `tenant`, audited and counted: for every door.

        Raises:
            InvalidArgument: a malformed model, version, `top_k`, `confidence_threshold` or
                `chunk_size` (named), or as `JobService.submit`.
            PeritoError: as `JobService.submit`.
        """
        resource = f"models/{request.model[:64]}"

        async def submit() -> jobs_pb2.Job:
            nonlocal resource
            self.check_model(request.model, request.version)
            self.check_answer_options(request.top_k, request.confidence_threshold)
            if request.chunk_size < 0:
                raise InvalidArgument(
                    "chunk_size must be 0 (default) or positive", field="chunk_size"
                )
            job = await self.jobs.submit(request, tenant)
            resource = f"jobs/{job.id}"
            return job

        job = await self._audited(tenant, "SubmitJob", lambda: resource, submit)
        if self.metrics is not None:
            self.metrics.jobs_submitted.labels(job.model).inc()
        return job

    async def get_job(self, job_id: str, tenant: Tenant) -> jobs_pb2.Job:
        """`GetJob` as `tenant`.

        Raises:
            NotFound: no such job, or another tenant's.
        """
        return await self.jobs.get(job_id, tenant)

    async def list_jobs(
        self, request: jobs_pb2.ListJobsRequest, tenant: Tenant
    ) -> jobs_pb2.ListJobsResponse:
        """`ListJobs` as `tenant` (its own jobs only).

        Raises:
            InvalidArgument: a bad page size or token.
        """
        return await self.jobs.list_jobs(request, tenant)

    def watch_job(self, job_id: str, tenant: Tenant) -> AsyncIterator[jobs_pb2.Job]:
        """`WatchJob` as `tenant`: the job now, then at each change, until it ends.

        Raises:
            NotFound: no such job, or another tenant's.
        """
        return self.jobs.watch(job_id, tenant)

    async def list_job_results(
        self, request: jobs_pb2.ListJobResultsRequest, tenant: Tenant
    ) -> jobs_pb2.ListJobResultsResponse:
        """`ListJobResults` as `tenant`: one page of item results, in input order.

        Raises:
            NotFound: no such job, or another tenant's.
            InvalidArgument: a bad page size, token or filter.
        """
        return await self.jobs.list_results(request, tenant)

    async def cancel_job(self, job_id: str, tenant: Tenant) -> jobs_pb2.Job:
        """`CancelJob` as `tenant`, audited: for every door.

        Raises:
            PeritoError: as `JobService.cancel`.
        """
        return await self._audited(
            tenant, "CancelJob", f"jobs/{job_id[:64]}", lambda: self.jobs.cancel(job_id, tenant)
        )

    async def delete_job(self, job_id: str, tenant: Tenant) -> None:
        """`DeleteJob` as `tenant`, audited.

        Raises:
            PeritoError: as `JobService.delete`.
        """
        await self._audited(
            tenant, "DeleteJob", f"jobs/{job_id[:64]}", lambda: self.jobs.delete(job_id, tenant)
        )

    # Models

    async def list_models(
        self, request: models_pb2.ListModelsRequest, tenant: Tenant
    ) -> models_pb2.ListModelsResponse:
        """`ListModels` as `tenant` (its allowed models only): for every door.

        Paged as `paging.LIST_MODELS` says.

        Raises:
            InvalidArgument: a negative page size.
        """
        page_size = LIST_MODELS.of(request.page_size)
        names = [
            name
            for name in await asyncio.to_thread(self.pool.registry.list_models)
            if tenant.may_use_model(name)
        ]
        after = [n for n in names if n > request.page_token] if request.page_token else names
        page = after[:page_size]
        models = [(await self._describe(name, with_cards=False))[0] for name in page]
        token = page[-1] if len(after) > page_size else ""
        return models_pb2.ListModelsResponse(models=models, next_page_token=token)

    async def get_model(self, name: str) -> models_pb2.Model:
        """`GetModel`, cards and all (the caller has checked the tenant may use `name`).

        Raises:
            InvalidArgument: a malformed name.
            NotFound: no such model.
        """
        validate_model_name(name)
        model, _ = await self._describe(name, with_cards=True)
        return model

    async def get_model_cards(self, name: str) -> tuple[models_pb2.Model, list[ModelCard]]:
        """`get_model` without the cards in the message, and each version's typed card beside
        it, oldest first: for the JSON API, which writes the card as manifest.json types it
        (the message's `Struct` holds every number as a double).

        Raises:
            InvalidArgument: a malformed name.
            NotFound: no such model.
        """
        validate_model_name(name)
        model, manifests = await self._describe(name, with_cards=False)
        return model, [manifest.card() for manifest in manifests]

    async def _describe(
        self, name: str, *, with_cards: bool
    ) -> tuple[models_pb2.Model, list[ModelManifest]]:
        registry = self.pool.registry

        def read() -> tuple[list[ModelManifest], dict[str, str]]:
            versions = registry.list_versions(name)
            if not versions:
                registry.resolve(name)  # raises NotFound with the standard message
            return [registry.manifest(name, v) for v in versions], registry.aliases(name)

        manifests, aliases = await asyncio.to_thread(read)
        loaded = {version for model, version in self.pool.loaded if model == name}
        # Versions an alias (or its canary) was moved to that this server cannot load: the
        # reason may name the server's files, so it stays in the log (`ModelPool`).
        why: dict[str, list[str]] = {}
        for (model_name, key), failed in list(self.pool.rollout_errors.items()):
            if model_name == name:
                why.setdefault(failed.version, []).append(
                    f"as {failed.alias}'s canary, which sends it no requests meanwhile"
                    if key.endswith(":canary")
                    else f"for alias {failed.alias}, which still answers with its previous "
                    "version here"
                )
        load_errors = {
            version: f"this server cannot load it {'; nor '.join(uses)}; the load is retried, "
            "and the server's log has why"
            for version, uses in why.items()
        }
        rollouts = await asyncio.to_thread(alias_rollouts, registry, name, aliases)
        model = models_pb2.Model(
            name=name, latest_version=manifests[-1].version, aliases=aliases, rollouts=rollouts
        )
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
                load_error=load_errors.get(manifest.version, ""),
            )
            if with_cards:
                card = struct_pb2.Struct()
                # The card's JSON as manifest.json holds it, the drift reference summarized
                # (`ModelManifest.card`); the SDK and the web page read it.
                card.update(manifest.card().model_dump(mode="json"))
                version.card.CopyFrom(card)
            model.versions.append(version)
        return model, manifests


def _output(inference: Inference, output: RequestedOutput) -> OutputTensor:
    probabilities = np.stack(inference.probabilities).astype(np.float32, copy=False)
    if not output.classification:
        return OutputTensor(
            output.name, "FP32", list(probabilities.shape), probabilities, output.binary
        )
    labels = inference.manifest.labels
    k = min(output.classification, len(labels))
    strings = [
        f"{p.probability:f}:{p.class_index}:{p.label}".encode()
        for probs in inference.probabilities
        for p in summarize(probs, labels, k, None).predictions
    ]
    return OutputTensor(
        output.name, "BYTES", [len(inference.probabilities), k], strings, output.binary
    )
