"""Prometheus metrics for `perito serve`, on their own HTTP port (`PERITO_METRICS_PORT`).

Request counts and latencies are recorded as calls finish; everything about models (queue
depth and time, compute time, batch sizes and the preferred one measured at load, images
classified, versions loaded, load times, failed rollouts) is read from the model pool, and jobs
per state, stuck jobs and dead letters from the job store, when Prometheus scrapes, so the
batcher stays free of any metrics library.
Each server has its own registry: several can live in one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from perito_core.errors import PeritoError
from perito_core.listening import WsgiListener, bind_tcp

if TYPE_CHECKING:
    from perito_core.jobs.store import JobStore
    from perito_server.batcher import Histogram as BatchHistogram
    from perito_server.model_pool import ModelPool

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "perito_requests",
            "gRPC calls finished, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "perito_request_seconds",
            "gRPC call duration, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.images_rejected = Counter(
            "perito_images_rejected",
            "Images refused before classification, by reason (InvalidImage's: NOT_AN_IMAGE, "
            "TRUNCATED, DECOMPRESSION_BOMB, ...).",
            ["reason"],
            registry=self.registry,
        )
        self.outputs_refused = Counter(
            "perito_model_outputs_refused",
            "Images whose model output was no answer, refused with no classification, by "
            "model, version, form and reason (MODEL_OUTPUT_NOT_FINITE: NaN or infinity; "
            "MODEL_OUTPUT_NOT_PROBABILITIES: a value outside [0, 1] or not summing to 1).",
            ["model", "version", "form", "reason"],
            registry=self.registry,
        )
        self.jobs_submitted = Counter(
            "perito_jobs_submitted",
            "Bulk jobs accepted, by model.",
            ["model"],
            registry=self.registry,
        )
        self._http: WsgiListener | None = None

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.request_seconds.labels(method).observe(seconds)

    def watch_pool(self, pool: ModelPool) -> None:
        self.registry.register(PoolCollector(pool))

    def watch_jobs(self, store: JobStore) -> None:
        self.registry.register(JobsCollector(store))

    def serve(self, host: str, port: int) -> list[str]:
        """Expose `/metrics` on `host:port` (every address of a name, one port; 0: any free
        port); returns the sockets bound, `["127.0.0.1:9500"]`.

        Raises:
            perito_core.listening.ListenError: an address could not be bound.
        """
        sockets = bind_tcp(host, port, "metrics")
        self._http = WsgiListener(make_wsgi_app(self.registry), sockets, "metrics")
        return self._http.addresses

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


class PoolCollector(Collector):
    """Reads the model pool's state and each batcher's statistics at scrape time."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        # `form`: which form of the version is loaded (torchscript-fp32, openvino-int8, ...);
        # a version runs in two forms when a request asks for a more exact one.
        labels = ["model", "version", "form"]
        loaded = GaugeMetricFamily(
            "perito_model_loaded", "1 for each model version held in memory.", labels=labels
        )
        load_seconds = GaugeMetricFamily(
            "perito_model_load_seconds",
            "Time to fetch, verify, load and warm each loaded version.",
            labels=labels,
        )
        images = CounterMetricFamily(
            "perito_images_classified", "Images run through a model.", labels=labels
        )
        families = {
            "queue": HistogramMetricFamily(
                "perito_queue_seconds",
                "Time an image waited in the batcher before its forward pass.",
                labels=labels,
            ),
            "compute": HistogramMetricFamily(
                "perito_compute_seconds", "Forward pass time per batch.", labels=labels
            ),
            "batch": HistogramMetricFamily(
                "perito_batch_size", "Images per forward pass.", labels=labels
            ),
        }
        # The batcher's own counters: what it refused or dropped, and why.
        refused = CounterMetricFamily(
            "perito_batcher_rejected",
            "Requests refused for want of room (RESOURCE_EXHAUSTED with a retry hint), by "
            "what was full: the model's image queue or the server's byte budget.",
            labels=[*labels, "budget"],
        )
        dropped = CounterMetricFamily(
            "perito_batcher_dropped",
            "Images admitted but never run: the deadline passed or the caller left.",
            labels=[*labels, "reason"],
        )
        failed_batches = CounterMetricFamily(
            "perito_batches_failed", "Forward passes that raised.", labels=labels
        )
        queue = GaugeMetricFamily(
            "perito_queue_images",
            "Callers' images admitted and not yet answered (decoding, queued or in a forward "
            "pass); the low-priority lane (explanations) is not counted.",
            labels=labels,
        )
        capacity = GaugeMetricFamily(
            "perito_queue_capacity_images",
            "The most images the batcher admits at once (PERITO_MAX_QUEUE_SIZE); more are "
            "refused with RESOURCE_EXHAUSTED.",
            labels=labels,
        )
        preferred = GaugeMetricFamily(
            "perito_preferred_batch_size",
            "The most images the batcher puts in one forward pass of this form: measured at "
            "load (PERITO_PREFERRED_BATCH_SIZE=auto, the smallest size within 3% of the best "
            "images/s) or set; at most PERITO_MAX_BATCH_SIZE.",
            labels=labels,
        )
        forward_rate = GaugeMetricFamily(
            "perito_forward_images_per_second",
            "The form's forward pass alone, images per second at each batch size, as measured "
            "at load to choose perito_preferred_batch_size (none when the size was set).",
            labels=[*labels, "batch_size"],
        )
        for served in self.pool.served():
            values = [served.name, served.version, served.model.form]
            preferred.add_metric(values, served.batching.preferred_batch_size)
            for size, rate in served.batching.images_per_second.items():
                forward_rate.add_metric([*values, str(size)], rate)
            stats = served.batcher.stats
            loaded.add_metric(values, 1)
            load_seconds.add_metric(values, served.model.load_seconds)
            images.add_metric(values, stats.batch_size.total)
            refused.add_metric([*values, "images"], stats.rejected - stats.rejected_for_bytes)
            refused.add_metric([*values, "bytes"], stats.rejected_for_bytes)
            dropped.add_metric([*values, "deadline"], stats.dropped_expired)
            dropped.add_metric([*values, "cancelled"], stats.dropped_cancelled)
            failed_batches.add_metric(values, stats.failed_batches)
            queue.add_metric(values, served.batcher.admitted)
            capacity.add_metric(values, served.batcher.max_queue_size)
            for key, histogram in (
                ("queue", stats.queue_seconds),
                ("compute", stats.compute_seconds),
                ("batch", stats.batch_size),
            ):
                families[key].add_metric(values, _buckets(histogram), histogram.total)
        failed = GaugeMetricFamily(
            "perito_rollout_failed",
            "1 while an alias's new version fails to load and the old one keeps serving.",
            labels=["model", "alias", "version"],
        )
        for (name, _), error in list(self.pool.rollout_errors.items()):
            failed.add_metric([name, error.alias, error.version], 1)
        yield from (loaded, load_seconds, images, *families.values(), refused, dropped)
        yield from (failed_batches, failed, queue, capacity, preferred, forward_rate)


class JobsCollector(Collector):
    """Jobs per state, how long the most stuck job has not moved, and the dead-letter list's
    length, from the job store (three small Redis reads per scrape)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.store.state_counts()
            stalled = self.store.stalled_seconds()
            dead = self.store.dead_letter_count()
        except PeritoError:  # Redis down: say nothing rather than something wrong
            return
        jobs = GaugeMetricFamily("perito_jobs", "Bulk jobs in each state.", labels=["state"])
        for state, count in counts.items():
            jobs.add_metric([state.value], count)
        yield jobs
        stuck = GaugeMetricFamily(
            "perito_job_stalled_seconds",
            "The longest a job has gone without moving, by state: queued, since it was made; "
            "running, since its last recorded result (or its start). 0: no job in that state.",
            labels=["state"],
        )
        for state, seconds in stalled.items():
            stuck.add_metric([state.value], seconds)
        yield stuck
        yield GaugeMetricFamily(
            "perito_dead_letters",
            "Chunks on the job store's dead-letter list (given up on after their retries; "
            "the newest 10,000 are kept).",
            value=dead,
        )


def _buckets(histogram: BatchHistogram) -> list[tuple[str, float]]:
    """The batcher's per-bucket counts as Prometheus's cumulative buckets."""
    cumulative, out = 0, []
    for bound, count in zip([*histogram.bounds, float("inf")], histogram.counts, strict=True):
        cumulative += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(cumulative)))
    return out
