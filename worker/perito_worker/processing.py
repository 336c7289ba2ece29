"""Classifying one chunk of a job, and the per-process state that keeps models warm.

Each worker process builds one `WorkerRuntime` (after the fork, so no Redis socket or torch
thread pool is shared with the parent) and keeps every model version it loads. A chunk is
processed in batches; images for the next batch are fetched and decoded on a thread pool while
the current batch runs. Results are recorded per batch, idempotently, so a redelivered chunk
redoes only what was not recorded, and progress moves while a chunk runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from perito_core.errors import ArtifactIntegrityError, InvalidImage, ModelLoadError, NotFound
from perito_core.imaging import load_model_input
from perito_core.jobs import ItemInput, ItemResult, ItemState, Job, JobStore
from perito_core.runtime import LoadedModel, summarize
from perito_core.sources import SourceReader
from perito_worker import metrics
from perito_worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class WorkerRuntime:
    """What a worker process keeps between tasks: connections, the decode pool, warm models."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.store = JobStore.connect(settings.redis_url)
        self.registry = settings.open_registry()
        self.sources = SourceReader(settings.s3_options(), settings.local_roots)
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.models: dict[tuple[str, str], LoadedModel] = {}

    def model(self, name: str, version: str) -> LoadedModel:
        """The pinned version, loaded once per process (sha256-verified by the registry)."""
        key = (name, version)
        if key not in self.models:
            artifact = self.registry.fetch(name, version)
            self.models[key] = LoadedModel.load(
                artifact.path,
                artifact.manifest,
                device=self.settings.device,
                warmup_batch_sizes=tuple(range(1, self.settings.batch_size + 1)),
            )
            seconds = self.models[key].load_seconds
            log.info("loaded %s@%s in %.1fs", name, version, seconds)
            metrics.MODEL_LOAD_SECONDS.labels(name, version).set(seconds)
        return self.models[key]


@dataclass
class _Prepared:
    index: int
    item: ItemInput
    pixels: np.ndarray | None
    error: str = ""


def _prepare(
    rt: WorkerRuntime, job: Job, index: int, item: ItemInput, model: LoadedModel
) -> _Prepared:
    """Fetch and decode one image; a bad or missing image is that item's failure only."""
    try:
        if item.uri:
            data = rt.sources.read(item.uri)
        else:
            inline = rt.store.inline_image(job.id, index)
            if inline is None:
                raise NotFound("inline image data is missing from the job store")
            data = inline
        pixels = load_model_input(data, model.manifest.input.spec(), rt.settings.image_limits())
        return _Prepared(index, item, pixels)
    except (InvalidImage, NotFound) as error:
        return _Prepared(index, item, None, f"{error.reason}: {error.message}")


def _classify(job: Job, model: LoadedModel, batch: list[_Prepared]) -> list[ItemResult]:
    good = [p for p in batch if p.pixels is not None]
    results = {
        p.index: ItemResult(p.index, ItemState.FAILED, id=p.item.id, uri=p.item.uri, error=p.error)
        for p in batch
        if p.pixels is None
    }
    if good:
        probabilities = model.predict(np.stack([p.pixels for p in good]))  # type: ignore[misc]
        threshold = job.confidence_threshold or model.manifest.confidence_threshold or 0.0
        for prepared, probs in zip(good, probabilities, strict=True):
            summary = summarize(probs, model.labels, job.top_k, threshold)
            results[prepared.index] = ItemResult(
                prepared.index,
                ItemState.SUCCEEDED,
                id=prepared.item.id,
                uri=prepared.item.uri,
                predictions=[(p.label, p.class_index, p.probability) for p in summary.predictions],
                margin=summary.margin,
                normalized_entropy=summary.normalized_entropy,
                uncertain=summary.uncertain,
            )
    return [results[p.index] for p in batch]


def classify_chunk(
    rt: WorkerRuntime,
    job_id: str,
    chunk: int,
    start: int,
    stop: int,
    finalize: Callable[[str], None],
) -> None:
    """Classify items start..stop-1 of a job, recording each result exactly once."""
    store = rt.store
    attempts = store.count_attempt(job_id, chunk)
    job = store.get(job_id)
    if job.state.terminal or job.cancel_requested:
        metrics.CHUNKS.labels("skipped").inc()
        return
    inputs = store.inputs(job_id, start, stop - 1)
    recorded = store.recorded(job_id, range(start, start + len(inputs)))
    todo = [(start + i, item) for i, item in enumerate(inputs) if start + i not in recorded]

    if not todo:  # redelivered after every item was recorded: finish the job if nobody did
        if store.get(job_id).done >= job.total:
            finalize(job_id)
        return

    if attempts > rt.settings.max_attempts:
        reason = (
            f"chunk {chunk} was delivered {attempts - 1} times without finishing (a worker "
            "died on it each time); given up and dead-lettered"
        )
        store.dead_letter(job_id, chunk, reason)
        metrics.CHUNKS.labels("dead_lettered").inc()
        _, complete = store.record_results(
            job_id,
            [
                ItemResult(i, ItemState.FAILED, id=item.id, uri=item.uri, error=reason)
                for i, item in todo
            ],
        )
        if complete:
            finalize(job_id)
        return

    store.mark_running(job_id)
    try:
        model = rt.model(job.model, job.model_version)
    except (NotFound, ArtifactIntegrityError, ModelLoadError) as error:
        message = f"model {job.model}@{job.model_version} cannot be used: {error.message}"
        log.error("job %s: %s", job_id, message)
        store.set_job_error(job_id, message)
        metrics.CHUNKS.labels("model_failed").inc()
        store.mark_unrecorded(job_id, ItemState.FAILED, message)
        finalize(job_id)
        return

    size = rt.settings.batch_size
    batches = [todo[i : i + size] for i in range(0, len(todo), size)]
    complete = False

    def submit(batch: list[tuple[int, ItemInput]]) -> list[Future[_Prepared]]:
        return [rt.decode_pool.submit(_prepare, rt, job, i, item, model) for i, item in batch]

    upcoming = submit(batches[0]) if batches else []
    for number in range(len(batches)):
        prepared = [future.result() for future in upcoming]
        upcoming = submit(batches[number + 1]) if number + 1 < len(batches) else []
        if store.is_cancel_requested(job_id):
            for future in upcoming:
                future.cancel()
            metrics.CHUNKS.labels("skipped").inc()
            return
        results = _classify(job, model, prepared)
        _, complete = store.record_results(job_id, results)
        for result in results:
            metrics.ITEMS.labels(job.model, job.model_version, result.state.value).inc()
    metrics.CHUNKS.labels("done").inc()
    if complete:
        finalize(job_id)
