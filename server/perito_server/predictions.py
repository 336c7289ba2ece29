"""The server's side of the prediction log (`perito_core.prediction_log`): which tenant logs
where, each answer or refusal as a record, and the log's metrics.

`PredictionRecorder.record` is called by the inference service where `classify` and
`oip_infer` answer or refuse (one place for every door); it costs the caller a queue append:
the record's JSON (the request's options, the answer as `perito.v1.ClassifyResponse`'s JSON
or the error, each image's provenance) is built on the log's own thread.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from perito.v1 import classify_pb2
from perito_core.access.tenancy import Tenant, Tenants, check_uri
from perito_core.errors import PeritoError
from perito_core.logs import DOOR, REQUEST_ID
from perito_core.prediction_log import (
    LOCATION_REFUSED,
    InputRef,
    LogEntry,
    PredictionLog,
    PredictionLogSetting,
)
from perito_core.storage import open_store
from perito_server.settings import ServerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What a call answered: a `ClassifyResponse`, or a function that builds one on the log's
    thread (OIP's, from its probabilities: the caller does not wait for it), or the error it
    was refused with."""

    response: classify_pb2.ClassifyResponse | Callable[[], classify_pb2.ClassifyResponse] | None = (
        None
    )
    error: BaseException | None = None


def error_json(error: BaseException) -> dict[str, Any]:
    """A refusal as the record's `error`: code, reason, message, field, violations. Any
    other exception is a fixed INTERNAL "internal error": its text (a path, the server's
    code) is not the tenant's to read, and stays in the operator's log where the door
    logged the failure."""
    if isinstance(error, PeritoError):
        return {
            "code": error.code.name,
            "reason": error.reason,
            "message": error.message,
            "field": error.field or "",
            "violations": [{"field": f, "description": d} for f, d in error.violations],
        }
    return {"code": "INTERNAL", "reason": "INTERNAL", "message": "internal error"}


def _options(request: Message) -> Message:
    """What the record keeps of a call's request: a `ClassifyRequest`'s fields copied into a
    new message, each image by its id (and URI) only, its content's bytes never copied nor
    referenced; any other request (OIP's options, built without tensor data) as it is."""
    if not isinstance(request, classify_pb2.ClassifyRequest):
        return request
    options = classify_pb2.ClassifyRequest()
    for field, value in request.ListFields():
        if field.name == "images":
            for image in value:
                kept = options.images.add(id=image.id)
                if image.WhichOneof("source") == "uri":
                    kept.uri = image.uri
        elif isinstance(value, Message):
            getattr(options, field.name).CopyFrom(value)
        elif isinstance(value, str | bytes | int | float):
            setattr(options, field.name, value)
        else:  # a repeated field
            getattr(options, field.name).extend(value)
    return options


def _json(message: Message) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


class PredictionRecorder:
    """Each tenant's prediction log: where it goes (`setting_for`), the records, the writer.

    Args:
        settings: the server's (`prediction_log_*`, the registry, S3 options).
        tenants: the tenants, whose `prediction_log` settings are read at each call (a
            re-read tenants file takes effect at once).
    """

    def __init__(self, settings: ServerSettings, tenants: Tenants) -> None:
        self.settings = settings
        self.tenants = tenants
        self.source = f"/perito/{socket.gethostname()}"
        self._checked: dict[tuple[str, str], bool] = {}
        # One attempt and a short connect: a store that is down fails a batch at once, and the
        # log's own back-off (`StoreBackoff`) decides when to try it again, not botocore.
        s3 = dataclasses.replace(settings.s3_options(), max_attempts=1, connect_timeout_s=1.0)
        self.log = PredictionLog(
            lambda uri: open_store(uri, s3),
            max_records=settings.prediction_log_queue_records,
            max_bytes=settings.prediction_log_queue_bytes,
            batch_records=settings.prediction_log_batch_records,
            flush_s=settings.prediction_log_flush_s,
            sweep_targets=self.sweep_targets,
            sweep_interval_s=settings.prediction_log_sweep_interval_s,
        )

    def start(self) -> None:
        self.log.start()

    def close(self, timeout_s: float) -> None:
        """Write what is queued within `timeout_s` (the rest is counted `shutdown`)."""
        self.log.close(timeout_s)

    def setting_for(self, tenant: Tenant, *, count: bool = True) -> PredictionLogSetting | None:
        """Where `tenant`'s log goes, or None when it logs nothing: its tenants-file entry's
        `prediction_log`; for the single tenant of a server without a tenants file
        (unrestricted), `prediction_log_uri`. The location is checked once as the tenant's
        own writable storage, never under the registry; a refused one logs nothing, says so
        once, and counts each record `location_refused`."""
        setting = tenant.prediction_log
        if setting is None and tenant.write is None and self.settings.prediction_log_uri:
            setting = PredictionLogSetting(self.settings.prediction_log_uri)
        if setting is None:
            return None
        key = (tenant.name, setting.uri)
        allowed = self._checked.get(key)
        if allowed is None:
            try:
                check_uri(
                    tenant,
                    setting.uri,
                    "write",
                    "prediction_log",
                    forbidden=(self.settings.registry,),
                )
                allowed = True
            except PeritoError as error:
                log.error("tenant %r: prediction log not written: %s", tenant.name, error.message)
                allowed = False
            self._checked[key] = allowed
        if not allowed:
            if count:
                self.log.drop(tenant.name, LOCATION_REFUSED)
            return None
        return setting

    def retention_s(self, setting: PredictionLogSetting) -> float:
        if setting.retention_s is not None:
            return setting.retention_s
        retention = self.settings.prediction_log_retention or self.settings.job_retention
        return retention.total_seconds()

    def sweep_targets(self) -> list[tuple[str, float]]:
        """Every configured log prefix and its retention (tenants re-read as they change)."""
        targets: dict[str, float] = {}
        for name in self.tenants.names:
            tenant = self.tenants.get(name)
            if tenant is None:
                continue
            setting = self.setting_for(tenant, count=False)
            if setting is not None:
                targets[setting.uri] = max(targets.get(setting.uri, 0.0), self.retention_s(setting))
        return sorted(targets.items())

    def record(
        self,
        tenant: Tenant,
        request: Message,
        images: Sequence[bytes] | np.ndarray,
        outcome: Outcome,
        *,
        model: str,
        nbytes: int,
        input_sha256: Sequence[str] | None = None,
    ) -> None:
        """Queue the record of one call (never blocks, never raises for the log's sake): the
        caller's work is holding references (OIP's pixels: one copy of the array) and copying
        the request's options. The queued entry holds no reference to `request` nor to a
        refusal's exception (whose traceback would hold the call's frames): its images'
        bytes are `images` only, what `nbytes` counts.

        Args:
            tenant: who called.
            request: the call's request (`ClassifyRequest`, or the OIP request's options as a
                message without its tensor data); its image bytes are left out of the record.
            images: each image's bytes as received, or OIP's pixels: uint8 [N, H, W, 3] (each
                image stored as its [H, W, 3] bytes, row-major, as its `input_sha256` hashes
                it).
            outcome: the answer or the refusal.
            model: the model asked for (the event's subject).
            nbytes: the request's size, counted against the queue's byte bound.
            input_sha256: each image's sha256 (hex) as provenance computed it, in order;
                None (a refusal before it was known): hashed on the log's thread.
        """
        setting = self.setting_for(tenant)
        if setting is None:
            return
        pixels_shape: list[int] | None = None
        inputs: Sequence[bytes | memoryview]
        if isinstance(images, np.ndarray):
            pixels_shape = list(images.shape[1:])
            # One copy (the request's buffer is not kept), each image a row of bytes.
            pixels = np.array(images, dtype=np.uint8, order="C", ndmin=1)
            rows = pixels.reshape(pixels.shape[0], math.prod(pixels.shape[1:]))
            inputs = [row.data for row in rows]
        else:
            inputs = images
        request_id = REQUEST_ID.get() or ""
        door = DOOR.get() or ""
        options = _options(request)
        response = outcome.response
        refusal = error_json(outcome.error) if outcome.error is not None else None

        def build(refs: list[InputRef]) -> dict[str, Any]:
            return self._data(
                tenant.name, request_id, door, options, refs, response, refusal, pixels_shape
            )

        self.log.submit(
            LogEntry(
                tenant=tenant.name,
                uri=setting.uri,
                inputs=inputs,
                build=build,
                subject=model[:128],
                source=self.source,
                nbytes=nbytes,
                input_sha256=input_sha256,
            )
        )

    @staticmethod
    def _data(
        tenant: str,
        request_id: str,
        door: str,
        options: Message,
        refs: list[InputRef],
        response: classify_pb2.ClassifyResponse
        | Callable[[], classify_pb2.ClassifyResponse]
        | None,
        refusal: dict[str, Any] | None,
        pixels_shape: Sequence[int] | None,
    ) -> dict[str, Any]:
        """The record's data, on the log's thread: `options` as `_options` made it, the
        answer (built now, if it is a function) or the `refusal` as `error_json` made it."""
        asked = _json(options)
        inputs = []
        for index, ref in enumerate(refs):
            entry: dict[str, Any] = {"index": index, **ref.as_json()}
            if isinstance(options, classify_pb2.ClassifyRequest) and index < len(options.images):
                entry["id"] = options.images[index].id
            if pixels_shape is not None:
                entry["pixels"] = list(pixels_shape)
            inputs.append(entry)
        data: dict[str, Any] = {
            "tenant": tenant,
            "request_id": request_id,
            "door": door,
            "model": asked.get("model", ""),
            "version_asked": asked.get("version", ""),
            "top_k": int(asked.get("top_k", 0)),
            "confidence_threshold": float(asked.get("confidence_threshold", 0.0)),
            "precision": asked.get("precision", ""),
            "request": asked,
            "inputs": inputs,
        }
        answered = response() if callable(response) else response
        if answered is not None:
            answer = _json(answered)
            data["outcome"] = "OK"
            data["answer"] = answer
            data["provenance"] = [r.get("provenance") for r in answer.get("results", [])]
        else:
            assert refusal is not None
            data["error"] = refusal
            data["outcome"] = refusal["code"]
        return data


class PredictionLogCollector(Collector):
    """The log's counters and queue, read at scrape time."""

    def __init__(self, recorder: PredictionRecorder) -> None:
        self.log = recorder.log

    def collect(self) -> Iterator[Metric]:
        written = CounterMetricFamily(
            "perito_prediction_log_records",
            "Prediction-log records written to the tenant's storage, by tenant.",
            labels=["tenant"],
        )
        inputs = CounterMetricFamily(
            "perito_prediction_log_inputs",
            "Images stored in a prediction log (a repeated photo is stored once), by tenant.",
            labels=["tenant"],
        )
        dropped = CounterMetricFamily(
            "perito_prediction_log_dropped",
            "Prediction-log records not written, by tenant and reason: queue_full, "
            "storage_error, record_error, shutdown, location_refused.",
            labels=["tenant", "reason"],
        )
        records, stored, lost = self.log.counts()
        for tenant, count in sorted(records.items()):
            written.add_metric([tenant], count)
        for tenant, count in sorted(stored.items()):
            inputs.add_metric([tenant], count)
        for (tenant, reason), count in sorted(lost.items()):
            dropped.add_metric([tenant, reason], count)
        entries, nbytes = self.log.queued
        queued = GaugeMetricFamily(
            "perito_prediction_log_queued",
            "Prediction-log records waiting to be written.",
            value=entries,
        )
        queued_bytes = GaugeMetricFamily(
            "perito_prediction_log_queued_bytes",
            "Bytes (images and requests) the prediction log's queue holds.",
            value=nbytes,
        )
        yield from (written, inputs, dropped, queued, queued_bytes)
