"""Prometheus metrics for `perito worker`, on their own HTTP port (`PERITO_METRICS_PORT`).

Celery's prefork pool does the work in child processes, so the metrics use prometheus_client's
multiprocess mode: the CLI points `PROMETHEUS_MULTIPROC_DIR` at a fresh folder before this
module is imported, every process writes its samples there, and the parent serves their sum.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.multiprocess import MultiProcessCollector

from perito_core.listening import WsgiListener, bind_tcp

ITEMS = Counter(
    "perito_worker_items",
    "Images classified or failed by this worker, by model, version and outcome.",
    ["model", "version", "outcome"],
)
OUTPUTS_REFUSED = Counter(
    "perito_worker_model_outputs_refused",
    "Items whose model output was no answer, failed with its reason, by model, version, form "
    "and reason (MODEL_OUTPUT_NOT_FINITE, MODEL_OUTPUT_NOT_PROBABILITIES).",
    ["model", "version", "form", "reason"],
)
CHUNKS = Counter(
    "perito_worker_chunks",
    "Chunks handled: done, skipped (job over or cancelled), duplicate (another worker holds "
    "it), error (attempt ended early; retried), dead_lettered, model_failed.",
    ["outcome"],
)
# Exported at 0 from the start: the first dead letter is then an increase the PeritoDeadLetters
# alert sees (a series born at 1 has no earlier sample to rise from).
CHUNKS.labels("dead_lettered")
CHUNK_SECONDS = Histogram(
    "perito_worker_chunk_seconds",
    "Time to handle one chunk.",
    buckets=(0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
JOBS_FINISHED = Counter(
    "perito_worker_jobs_finished", "Jobs finalised (results written), by final state.", ["state"]
)
YIELDED_SECONDS = Counter(
    "perito_worker_yielded_seconds",
    "Time forward passes waited for a `perito serve` on this host to finish its callers' "
    "images (claims first, bulk second).",
)
MODEL_LOAD_SECONDS = Gauge(
    "perito_worker_model_load_seconds",
    "Time to fetch, verify, load and warm a model version.",
    ["model", "version"],
    multiprocess_mode="max",
)


def serve_metrics(host: str, port: int) -> list[str]:
    """Serve the sum over every worker process on `host:port` (every address of a name, one
    port; 0: any free port); returns the sockets bound, `["0.0.0.0:9501"]`.

    Raises:
        perito_core.listening.ListenError: an address could not be bound.
    """
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    sockets = bind_tcp(host, port, "metrics")
    return WsgiListener(make_wsgi_app(registry), sockets, "metrics").addresses
