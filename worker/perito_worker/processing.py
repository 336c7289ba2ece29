"""Classifying one chunk of a job, and the per-process state that keeps models warm.

Each worker process builds one `WorkerRuntime` (after the fork, so no Redis socket or torch
thread pool is shared with the parent) and keeps every model version it loads. A chunk is
processed in batches, in three stages: images for the next batch are fetched and decoded on a
thread pool while the current batch runs on the model's thread and the previous one is
summarized (for a model on a CUDA device, the batch's JPEGs are decoded together on it:
`perito_core.imaging_device`). When the last batch is summarized, the chunk's results are
written as one part in object storage and the chunk is closed in the job store
(`JobStore.record_chunk`): a chunk is recorded whole or not at all, so a redelivered chunk
runs again whole, and progress moves a chunk at a time.

Whatever happens, an item ends recorded: an exception while fetching or decoding one image
fails that image (with `INTERNAL: ...` at worst); an exception that ends the whole attempt
(out of memory, storage down, the time limit) is kept as the chunk's error, the lease is given
back, and the watchdog sends the chunk again, until `max_attempts` starts have been used: then
its items fail with that error and the chunk is dead-lettered. A chunk runs under a lease
renewed by a heartbeat thread, so a second delivery of it while it runs is skipped; a worker
that lost its lease (presumed dead, its chunk given to another) stops at its next batch, and
its part, if it got as far, is refused by the job store and never read.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from perito.v1.vocabulary import ItemState
from perito_core.drift import COMPARE_JOB_LABEL, DriftWindows
from perito_core.errors import (
    ArtifactIntegrityError,
    InvalidArgument,
    ModelLoadError,
    NotFound,
    PeritoError,
    StorageUnavailable,
    describe_exception,
)
from perito_core.imaging import load_model_input_with_info
from perito_core.imaging_device import DeviceDecoded, decode_device, prepare_batch
from perito_core.jobs.items import ItemInput, ItemResult
from perito_core.jobs.sources import SourceReader
from perito_core.jobs.store import Job, JobStore
from perito_core.models.batching import profile_batch_sizes
from perito_core.models.cache import ModelCache
from perito_core.models.engines.base import LoadedModel
from perito_core.models.provenance import sha256_hex
from perito_core.models.reduced_precision import serve_fp16
from perito_core.models.selection import (
    Asked,
    PrecisionUnavailable,
    check_precision,
    load_model,
    requested_precision,
)
from perito_core.models.summary import (
    FAULT_MESSAGES,
    output_fault,
    summarize,
)
from perito_core.quality import Quality, assess
from perito_core.scheduling import run_when_idle
from perito_worker import metrics
from perito_worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class WorkerRuntime:
    """What a worker process keeps between tasks: connections, the decode pool, warm models."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.store = JobStore.connect(
            settings.redis_url,
            outage_retry_s=settings.store_outage_retry_s,
            s3=settings.s3_options(),
        )
        self.registry = settings.open_registry()
        self.sources = SourceReader(settings.s3_options(), settings.local_roots)
        # The model's thread (loading, warming and every forward pass, so the engine's own
        # thread pool is made from it) and the decoders, in SCHED_IDLE with `idle_compute`:
        # Celery's thread, the lease heartbeat and Redis stay in the normal class.
        lower = run_when_idle if settings.idle_compute else None
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="model", initializer=lower)
        self.decode_pool = ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="decode", initializer=lower
        )
        # Found by (name, version, precision); at most max_loaded_models forms held.
        self.models: ModelCache[LoadedModel] = ModelCache(settings.max_loaded_models)
        # Each held form's batch size, by (name, version, form); dropped with the form.
        self.batch_sizes: dict[tuple[str, str, str], int] = {}
        # Drift detection's live windows, shared with the servers (written once per chunk).
        self.drift = DriftWindows(self.store.redis, settings.drift_window)
        # Where this host's servers mark a caller's images in hand (claims first).
        self.activity = settings.open_activity() if settings.yield_max_wait_s > 0 else None

    def _load(self, name: str, version: str, precision: str) -> tuple[LoadedModel, int]:
        """Load, warm and time one form at its candidate batch sizes (`profile_batch_sizes`,
        for throughput: the very fastest), on the model's thread; at `auto` on a CUDA device,
        FP16 where it agrees with FP32 (`serve_fp16`). Returns it and its batch size."""
        settings = self.settings
        fixed = None if settings.batch_size == "auto" else settings.batch_size
        cap = fixed or settings.max_batch_size
        warmup = tuple(range(1, cap + 1))  # a chunk's last batch may be any size
        loaded = load_model(
            self.registry,
            name,
            version,
            precision=precision,
            device=settings.device,
            warmup_batch_sizes=warmup,
        )
        if precision == "auto":  # on a CUDA device: FP16 where it agrees with FP32
            loaded = serve_fp16(loaded, warmup)
        profile = profile_batch_sizes(loaded, cap, preferred_batch_size=fixed, tolerance=0.0)
        loaded.load_seconds += profile.seconds
        return loaded, profile.preferred_batch_size

    def batch_size(self, model: LoadedModel) -> int:
        """The images per forward pass `model` (held by this runtime) runs at."""
        size = self.batch_sizes.get(_form_key(model))
        if size is None:
            setting = self.settings.batch_size
            return self.settings.max_batch_size if setting == "auto" else setting
        return size

    def model(self, name: str, version: str, precision: str = "") -> LoadedModel:
        """The pinned version, loaded once per process and precision (sha256-verified by the
        registry). `precision`: the job's, required as a request's (`check_precision`); one
        less exact than this worker's setting (as the server refuses at submission) gives way
        to the setting.

        Raises:
            PrecisionUnavailable: the job's precision has no form that serves here.
            NotFound, ArtifactIntegrityError, ModelLoadError: as `load_model`.
        """
        try:
            asked = requested_precision(precision, self.settings.precision)
        except InvalidArgument:
            asked = Asked(self.settings.precision)
        precision = asked.precision
        held = self.models.get(name, version, precision)
        if held is not None:
            check_precision(held.manifest, asked, served=held)
            return held
        if asked.required:  # refused before loading where the version has no such form
            manifest = self.registry.manifest(name, version)
            check_precision(manifest, asked, device=self.settings.device)
        # Room first: a worker holds no more than its bound, even while it loads.
        for dropped in self.models.make_room():
            self.batch_sizes.pop(_form_key(dropped), None)
            manifest = dropped.manifest
            log.info(
                "dropping %s@%s (%s): least recently used",
                manifest.name,
                manifest.version,
                dropped.form,
            )
        loaded, batch_size = self.compute.submit(self._load, name, version, precision).result()
        log.info(
            "loaded %s@%s in %.1fs, form %s, batch size %d",
            name,
            version,
            loaded.load_seconds,
            loaded.form,
            batch_size,
        )
        metrics.MODEL_LOAD_SECONDS.labels(name, version).set(loaded.load_seconds)
        model, _ = self.models.add(name, version, precision, loaded.form, lambda: loaded)
        self.batch_sizes[_form_key(model)] = batch_size
        check_precision(model.manifest, asked, served=model)  # a form that failed gave way
        return model


def _form_key(model: LoadedModel) -> tuple[str, str, str]:
    return model.manifest.name, model.manifest.version, model.form


@dataclass
class _Prepared:
    index: int
    item: ItemInput
    pixels: np.ndarray | None
    error: str = ""
    first_frame_only: bool = False
    input_sha256: str = ""
    quality: Quality | None = None


def _fetch(rt: WorkerRuntime, job: Job, index: int, item: ItemInput) -> bytes:
    """An item's image bytes: its URI's object, or its inline data in the job store."""
    if item.uri:
        return rt.sources.read(item.uri, max_bytes=rt.settings.image_limits().max_bytes)
    inline = rt.store.inline_image(job.id, index)
    if inline is None:
        raise NotFound("inline image data is missing from the job store")
    return inline


def _prepare(
    rt: WorkerRuntime,
    job: Job,
    index: int,
    item: ItemInput,
    model: LoadedModel,
    fetched: Callable[[], bytes] | None = None,
    decoded: DeviceDecoded | None = None,
) -> _Prepared:
    """Fetch and decode one image; whatever goes wrong with it is that item's failure only,
    except object storage being unreachable, which ends the attempt (retried later).
    With GPU decode (`prepare_batch`): `fetched` gives the bytes already fetched (or raises
    what fetching raised), `decoded` the image decoded on the device (None: Pillow's)."""
    limits = rt.settings.image_limits()
    if item.error:  # found unreadable at submission
        return _Prepared(index, item, None, item.error)
    try:
        data = fetched() if fetched is not None else _fetch(rt, job, index, item)
        spec = model.manifest.input.spec()
        if decoded is not None:
            pixels, info = decoded.with_quality(spec)
        else:
            pixels, info = load_model_input_with_info(data, spec, limits)
        return _Prepared(
            index,
            item,
            pixels,
            first_frame_only=info.first_frame_only,
            input_sha256=sha256_hex(data),
            quality=None if info.quality is None else assess(info.quality, model.manifest.quality),
        )
    except StorageUnavailable:
        raise
    except PeritoError as error:
        # Named as the caller named it, never where a symbolic link led.
        message = error.message.replace(item.uri, item.given) if item.given else error.message
        return _Prepared(index, item, None, f"{error.reason}: {message}")
    except Exception:  # an item must end recorded, whatever it raised
        # Its text (a path, a host, the code) is the operator's, in the log; the job's owner
        # reads where to find it.
        log.exception("job %s item %d (%s): unexpected error", job.id, index, item.uri)
        return _Prepared(index, item, None, unforeseen(f"job {job.id} item {index}"))


def unforeseen(where: str, what: str = "an unforeseen error") -> str:
    """An item's error for an exception nobody foresaw while reading, decoding or
    classifying it: INTERNAL, `what` happened and where the worker's log has it (`where`:
    "job J item N"), never the exception's text, which may name a path, a host, the model's
    code or another tenant's data (as the server's INTERNAL answers)."""
    return f"INTERNAL: {what}; the worker's log has it under {where}"


def _predict(model: LoadedModel, good: list[_Prepared], job_id: str) -> list[np.ndarray | str]:
    """Probabilities for each prepared image, or the error of an image the model fails on.

    A batch whose forward pass raises is run again one image at a time, so an image that
    breaks the model fails alone: INTERNAL, and where the worker's log has the model's own
    words (they may quote the model's code or the server's files, which the job's owner may
    not read: `unforeseen`). If every image fails alone too, the model (or the device: out
    of memory) is at fault, not the images: the batch's error is raised, which ends the
    attempt (retried within `max_attempts`)."""
    pixels = np.stack([p.pixels for p in good])  # type: ignore[misc]
    try:
        return list(model.predict(pixels))
    except Exception as batch_error:  # isolated below, or raised again
        log.warning("a batch of %d failed (%s); one image at a time", len(good), batch_error)
        outcomes: list[np.ndarray | str] = []
        for one, prepared in zip(pixels, good, strict=True):
            try:
                outcomes.append(model.predict(one[None])[0])
            except Exception as error:  # noqa: BLE001 - this image's failure
                where = f"job {job_id} item {prepared.index}"
                log.warning(
                    "%s: the model failed on it alone: %s", where, describe_exception(error)
                )
                outcomes.append(unforeseen(where, "the model failed on this image alone"))
        if all(isinstance(outcome, str) for outcome in outcomes):
            raise batch_error from None
        return outcomes


def _compute(
    rt: WorkerRuntime, model: LoadedModel, batch: list[_Prepared], job_id: str
) -> Future[list[np.ndarray | str]] | None:
    """Queue a decoded batch's forward pass on the model's thread (`_yield_then_predict`:
    claims first); None when no image decoded."""
    good = [p for p in batch if p.pixels is not None]
    if not good:
        return None
    return rt.compute.submit(_yield_then_predict, rt, model, good, job_id)


def _yield_then_predict(
    rt: WorkerRuntime, model: LoadedModel, good: list[_Prepared], job_id: str
) -> list[np.ndarray | str]:
    """`_predict`, on the model's thread once no call of a server on this host is in hand:
    waited for here, right before the forward pass, not when the batch was queued behind
    the one still running."""
    if rt.activity is not None:
        waited = rt.activity.wait_until_quiet(
            rt.settings.yield_quiet_s, rt.settings.yield_max_wait_s
        )
        metrics.YIELDED_SECONDS.inc(waited)
    return _predict(model, good, job_id)


def _classify(
    rt: WorkerRuntime,
    job: Job,
    model: LoadedModel,
    batch: list[_Prepared],
    drift: bool,
    computing: Future[list[np.ndarray | str]] | None = None,
) -> list[ItemResult]:
    """The results of a decoded batch: its forward pass (`computing`, as `_compute` started
    it; started here when None), each answer summarized; `drift`: its answers also feed the
    live drift window.

    Raises:
        Exception: the batch's forward pass failed for every image alone too (`_predict`).
    """
    good = [p for p in batch if p.pixels is not None]
    results = {
        p.index: ItemResult(
            p.index, ItemState.FAILED, id=p.item.id, uri=p.item.shown_uri, error=p.error
        )
        for p in batch
        if p.pixels is None
    }
    answered: list[tuple[np.ndarray, Quality | None]] = []
    if good:
        threshold = model.manifest.threshold(job.confidence_threshold)
        started = computing or _compute(rt, model, batch, job.id)
        assert started is not None  # some image decoded
        outcomes = started.result()
        for prepared, probs in zip(good, outcomes, strict=True):
            fault = None if isinstance(probs, str) else output_fault(probs)
            if fault is not None:  # no answer: the model's fault
                probs = f"{fault}: {FAULT_MESSAGES[fault]}"
                metrics.OUTPUTS_REFUSED.labels(
                    job.model, job.model_version, model.form, fault
                ).inc()
            if isinstance(probs, str):
                results[prepared.index] = ItemResult(
                    prepared.index,
                    ItemState.FAILED,
                    id=prepared.item.id,
                    uri=prepared.item.shown_uri,
                    error=probs,
                )
                continue
            answered.append((probs, prepared.quality))
            summary = summarize(probs, model.labels, job.top_k, threshold)
            results[prepared.index] = ItemResult(
                prepared.index,
                ItemState.SUCCEEDED,
                id=prepared.item.id,
                uri=prepared.item.shown_uri,
                predictions=[(p.label, p.class_index, p.probability) for p in summary.predictions],
                margin=summary.margin,
                normalized_entropy=summary.normalized_entropy,
                uncertain=summary.uncertain,
                first_frame_only=prepared.first_frame_only,
                form=model.form,
                input_sha256=prepared.input_sha256,
                quality=prepared.quality,
            )
    if drift and answered:  # queued in memory; the chunk writes them at its end
        rt.drift.add(model.manifest, [p for p, _ in answered], [q for _, q in answered])
    return [results[p.index] for p in batch]


class _Heartbeat:
    """Renews a chunk's lease every third of its TTL while the chunk runs (a thread, so a long
    forward pass or a slow read cannot starve it). `lost` turns true if the lease was taken
    by another worker (this one was presumed dead): the chunk then stops at its next batch."""

    def __init__(self, store: JobStore, job_id: str, chunk: int, holder: str, ttl_s: float):
        self.store, self.job_id, self.chunk, self.holder, self.ttl_s = (
            store,
            job_id,
            chunk,
            holder,
            ttl_s,
        )
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.store.renew_chunk(self.job_id, self.chunk, self.holder, self.ttl_s):
                    self.lost = True
                    log.warning("job %s chunk %d: lease lost", self.job_id, self.chunk)
                    return
            except PeritoError as exc:  # Redis down: keep trying; the lease may lapse
                log.warning("job %s chunk %d: lease not renewed: %s", self.job_id, self.chunk, exc)


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def classify_chunk(
    rt: WorkerRuntime,
    job_id: str,
    chunk: int,
    start: int,
    stop: int,
    finalize: Callable[[str], None],
) -> None:
    """Classify items start..stop-1 of a job (its chunk `chunk`), recording them once.

    Never raises for anything an item or the chunk does: see the module docstring. Raises
    `StorageUnavailable` only when the job store stays unreachable past
    `store_outage_retry_s` before the chunk could start (the watchdog resends it later).
    """
    store = rt.store
    holder = _holder()
    lease = store.acquire_chunk(job_id, chunk, holder, rt.settings.lease_ttl_s)
    if lease.outcome != "acquired":
        metrics.CHUNKS.labels("duplicate" if lease.outcome == "busy" else "skipped").inc()
        if lease.outcome == "busy":
            log.info("job %s chunk %d: another worker holds it; delivery skipped", job_id, chunk)
        if lease.outcome == "done":  # every item recorded: finish the job if nobody did
            job = store.get(job_id)
            if job.done >= job.total:
                finalize(job_id)
        return
    error = ""
    try:
        with _Heartbeat(store, job_id, chunk, holder, rt.settings.lease_ttl_s) as heartbeat:
            _run_chunk(rt, job_id, chunk, start, stop, lease.attempts, finalize, heartbeat)
    except Exception as exc:
        error = (
            f"{exc.reason}: {exc.message}"
            if isinstance(exc, PeritoError)
            # What ended the attempt, named (a model that fails on every image, out of memory):
            # the chunk's reason if it is given up on.
            else f"INTERNAL: {describe_exception(exc)}"
        )
        log.exception("job %s chunk %d attempt %d ended early", job_id, chunk, lease.attempts)
        metrics.CHUNKS.labels("error").inc()
    finally:
        try:
            store.release_chunk(job_id, chunk, holder, error)
        except PeritoError as exc:  # the lease lapses by itself
            log.warning("job %s chunk %d: lease not released: %s", job_id, chunk, exc)


def _record(
    rt: WorkerRuntime,
    job: Job,
    chunk: int,
    heartbeat: _Heartbeat,
    attempt: int,
    results: list[ItemResult],
    finalize: Callable[[str], None],
) -> None:
    """Write the chunk's part and close the chunk, if this worker still holds its lease
    (asked once more right before the part is written, so a worker presumed dead while it
    computed does not even write); finalise the job if that accounted for its last item."""
    store = rt.store
    if heartbeat.lost or not store.renew_chunk(
        job.id, chunk, heartbeat.holder, rt.settings.lease_ttl_s
    ):
        log.warning("job %s chunk %d: lease lost before its part was written", job.id, chunk)
        metrics.CHUNKS.labels("skipped").inc()
        return
    record = store.record_chunk(job, chunk, heartbeat.holder, attempt, results)
    if record.outcome == "recorded":
        for result in results:
            metrics.ITEMS.labels(job.model, job.model_version, result.state.value).inc()
        metrics.CHUNKS.labels("done").inc()
    else:  # lost, done (cancelled meanwhile), terminal or gone: the part is never read
        log.info("job %s chunk %d: not recorded (%s)", job.id, chunk, record.outcome)
        metrics.CHUNKS.labels("skipped").inc()
    if record.complete:
        finalize(job.id)


def _close_cancelled(store: JobStore, job_id: str, finalize: Callable[[str], None]) -> None:
    """Close a cancelled job's open chunks, their items cancelled, and finalise it: what the
    server does after asking for the cancel (`JobStore.mark_unrecorded`), done again in case
    it died in between; idempotent."""
    store.mark_unrecorded(job_id, ItemState.CANCELLED, "")
    job = store.get(job_id)
    if job.done >= job.total:
        finalize(job_id)


def _run_chunk(
    rt: WorkerRuntime,
    job_id: str,
    chunk: int,
    start: int,
    stop: int,
    attempt: int,
    finalize: Callable[[str], None],
    heartbeat: _Heartbeat,
) -> None:
    store = rt.store
    job = store.get(job_id)
    if not job.data_uri:  # recorded by an earlier version: it can never run here
        message = (
            "the job was recorded by an earlier version of Perito, which kept its items in "
            "Redis; submit it again"
        )
        store.set_job_error(job_id, message)
        store.mark_unrecorded(job_id, ItemState.FAILED, message)
        finalize(job_id)
        return
    if job.cancel_requested:  # the server that asked died before closing the chunks
        _close_cancelled(store, job_id, finalize)
        return
    if attempt > rt.settings.max_attempts:
        last = store.chunk_error(job_id, chunk) or (
            "the worker process running it stopped each time without finishing (killed, or "
            "out of memory)"
        )
        reason = (
            f"chunk {chunk} was started {attempt - 1} times without finishing; given up and "
            f"dead-lettered. Last attempt: {last}"
        )
        # Closed in Redis alone, no part: a chunk whose parts cannot be written ends too.
        record = store.fail_chunk(job, chunk, heartbeat.holder, reason)
        if record.outcome == "recorded":
            store.dead_letter(job_id, chunk, reason)
            metrics.CHUNKS.labels("dead_lettered").inc()
            metrics.ITEMS.labels(job.model, job.model_version, ItemState.FAILED.value).inc(
                stop - start
            )
        else:  # lost, done (cancelled meanwhile), terminal or gone
            log.info("job %s chunk %d: not given up (%s)", job_id, chunk, record.outcome)
            metrics.CHUNKS.labels("skipped").inc()
        if record.complete:
            finalize(job_id)
        return

    inputs = store.chunk_inputs(job, chunk)
    if len(inputs) != stop - start:
        raise PeritoError(
            f"chunk {chunk} was sent as items {start}..{stop - 1}; the job has "
            f"{len(inputs)} items there"
        )
    todo = [(start + i, item) for i, item in enumerate(inputs)]
    store.mark_running(job_id)
    try:
        model = rt.model(job.model, job.model_version, job.precision)
    except (NotFound, ArtifactIntegrityError, ModelLoadError, PrecisionUnavailable) as error:
        message = f"model {job.model}@{job.model_version} cannot be used: {error.message}"
        log.error("job %s: %s", job_id, message)
        store.set_job_error(job_id, message)
        metrics.CHUNKS.labels("model_failed").inc()
        store.mark_unrecorded(job_id, ItemState.FAILED, message)
        finalize(job_id)
        return

    size = rt.batch_size(model)
    batches = [todo[i : i + size] for i in range(0, len(todo), size)]
    results: list[ItemResult] = []

    spec = model.manifest.input.spec()
    device = decode_device(rt.settings.gpu_decode, model.device, spec)

    def submit(batch: list[tuple[int, ItemInput]]) -> list[Future[_Prepared]]:
        if device is not None:  # GPU decode: the batch's JPEGs together, on the model's device
            return prepare_batch(
                rt.decode_pool,
                [None if item.error else partial(_fetch, rt, job, i, item) for i, item in batch],
                [partial(_prepare, rt, job, i, item, model) for i, item in batch],
                spec,
                rt.settings.image_limits(),
                device,
            )
        return [rt.decode_pool.submit(_prepare, rt, job, i, item, model) for i, item in batch]

    # The offline comparison's jobs (a hand-picked folder) are no live traffic.
    drift = COMPARE_JOB_LABEL not in job.labels

    # Three stages: the next batch decodes while this one computes, and the previous one is
    # summarized meanwhile, so the model's thread never waits on either.
    upcoming = submit(batches[0]) if batches else []
    in_flight: tuple[list[_Prepared], Future[Any] | None] | None = None
    try:
        for number in range(len(batches)):
            prepared = [future.result() for future in upcoming]  # storage down: attempt ends
            upcoming = submit(batches[number + 1]) if number + 1 < len(batches) else []
            if heartbeat.lost or store.is_cancel_requested(job_id):
                # Cancelled: the cancel closed the chunk, its items cancelled. Lost: another
                # worker runs it now. Either way nothing of this attempt is recorded.
                metrics.CHUNKS.labels("skipped").inc()
                if not heartbeat.lost:
                    _close_cancelled(store, job_id, finalize)
                return
            computing = _compute(rt, model, prepared, job_id)
            if in_flight is not None:
                results += _classify(rt, job, model, in_flight[0], drift, in_flight[1])
            in_flight = (prepared, computing)
        if in_flight is not None:
            results += _classify(rt, job, model, in_flight[0], drift, in_flight[1])
    finally:
        for future in upcoming:
            future.cancel()
        rt.drift.flush()  # one round trip a chunk; a failure is logged and counted only
    _record(rt, job, chunk, heartbeat, attempt, results, finalize)
