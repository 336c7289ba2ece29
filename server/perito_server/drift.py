"""The server's drift monitor: feeds each answered image into its version's shared live window
and exports the drift gauges (docs/monitoring.md#drift).

`DriftMonitor.observe` is called at the end of `InferenceService.infer` (every door's images):
it only queues a compact row in memory (`perito_core.drift.DriftWindows`); a background thread
writes the queued rows to Redis in batches and, every `drift_interval_s`, reads the windows of
the versions this replica serves or has fed (shared with the other replicas and the workers),
compares each with its card's reference (`perito_core.drift.evaluate`) and keeps the result
for Prometheus's scrape. It also watches the versions whose windows others feed
(`perito_core.drift.windowed_versions`: a version only bulk workers answer with, or one
another replica serves), at most `MAX_WATCHED` in all. A version without a reference exports
nothing.

Gauges: `perito_drift_p_value{model,version,signal}`, `perito_drift_psi{model,version,signal}`,
`perito_drift_window_images{model,version}`, `perito_drift_detected{model,version}` (1 for
the `drift` verdict `perito models drift` prints, else 0). Each family is listed from the
server's start, before any sample.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from perito_core.drift import DriftReport, DriftWindows, evaluate, windowed_versions
from perito_core.errors import NotFound
from perito_core.quality import Quality

if TYPE_CHECKING:
    import numpy as np
    import redis

    from perito_core.models.manifest import ModelManifest
    from perito_core.models.registry import ModelRegistry
    from perito_server.model_pool import ModelPool

log = logging.getLogger(__name__)

# Versions watched at most (those fed here and those loaded); the least recently fed go first.
MAX_WATCHED = 256


class DriftMonitor(Collector):
    """Feeds the live windows and holds each watched version's latest verdict.

    Args:
        client: the Redis connection (the job store's).
        pool: the loaded versions (watched too, fed here or not).
        window: rows per version's window (`drift_window`).
        interval_s: how often the verdicts are recomputed (`drift_interval_s`).
        flush_s: how often queued rows are written.
    """

    def __init__(
        self,
        client: redis.Redis,
        pool: ModelPool,
        *,
        window: int,
        interval_s: float,
        flush_s: float = 1.0,
    ) -> None:
        self.windows = DriftWindows(client, window)
        self.pool = pool
        self.registry: ModelRegistry = pool.registry
        self.interval_s = interval_s
        self.flush_s = min(flush_s, interval_s)
        # (model, version) -> its manifest, for the versions fed here (newest last).
        self._fed: dict[tuple[str, str], ModelManifest] = {}
        self._reports: dict[tuple[str, str], DriftReport] = {}
        # (model, version) -> its manifest (None: no longer published), for the versions
        # others feed: read once, a published version never changes.
        self._manifests: dict[tuple[str, str], ModelManifest | None] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.evaluation_failures = 0

    def observe(
        self,
        manifest: ModelManifest,
        probabilities: Sequence[np.ndarray],
        quality: Sequence[Quality | None],
    ) -> None:
        """Queue one call's answered images for `manifest`'s window (no I/O; nothing for a
        version without a reference or a non-finite answer). Never raises: the caller's
        answer is sent whatever drift makes of it (failures are logged and counted as
        `perito_drift_rows_dropped_total{reason="error"}`)."""
        try:
            if not manifest.drift.classes:
                return
            key = (manifest.name, manifest.version)
            with self._lock:
                self._fed.pop(key, None)
                self._fed[key] = manifest
                while len(self._fed) > MAX_WATCHED:
                    del self._fed[next(iter(self._fed))]
        except Exception:  # drift never fails the caller
            self.windows.error_rows += len(probabilities)
            log.exception("drift: %s@%s's answers not queued", manifest.name, manifest.version)
            return
        self.windows.add(manifest, probabilities, quality)  # never raises

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="drift-monitor", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread and write what is queued."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.windows.flush()

    def _run(self) -> None:
        """Flush every `flush_s`, evaluate every `interval_s`; an exception is logged and
        counted (`evaluation_failures`), and the loop goes on (tried again next time)."""
        due = time.monotonic() + self.interval_s
        while not self._stop.wait(self.flush_s):
            try:
                self.windows.flush()
                if time.monotonic() >= due:
                    due = time.monotonic() + self.interval_s
                    self.evaluate_now()
            except Exception:  # the thread outlives any one failure
                self.evaluation_failures += 1
                log.exception("drift monitor: a round failed; trying again next interval")

    def _watched(self) -> dict[tuple[str, str], ModelManifest]:
        """The versions fed here, those loaded, then those whose windows others feed (newest
        first), at most `MAX_WATCHED`; only those with a reference.

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        with self._lock:
            watched = dict(self._fed)
        for served in self.pool.served():
            manifest = served.model.manifest
            watched.setdefault((manifest.name, manifest.version), manifest)
        for key in windowed_versions(self.windows.client, MAX_WATCHED):
            if len(watched) >= MAX_WATCHED:
                break
            if key not in watched and (found := self._manifest(*key)) is not None:
                watched[key] = found
        return {key: m for key, m in watched.items() if m.drift.classes}

    def _manifest(self, model: str, version: str) -> ModelManifest | None:
        """`model@version`'s manifest, read once; None once the registry says it is gone.

        Raises:
            StorageUnavailable: the registry cannot be read now (tried again next time).
        """
        key = (model, version)
        if key not in self._manifests:
            if len(self._manifests) >= 4 * MAX_WATCHED:
                self._manifests.clear()
            try:
                self._manifests[key] = self.registry.manifest(model, version)
            except NotFound:
                self._manifests[key] = None
        return self._manifests[key]

    def evaluate_now(self) -> None:
        """Recompute every watched version's verdict from its shared window (a Redis
        failure keeps the last verdicts and is logged; a version whose evaluation fails,
        its reference not fitting its window say, is logged and left out)."""
        reports = {}
        try:
            watched = self._watched()
        except Exception as error:  # noqa: BLE001 - Redis or the registry down: keep the last
            self.evaluation_failures += 1
            log.warning("drift: the watched versions not listed: %s", error)
            return
        for key, manifest in watched.items():
            try:
                rows = self.windows.read(*key)
            except Exception as error:  # noqa: BLE001 - Redis down: keep the last verdicts
                self.evaluation_failures += 1
                log.warning("drift windows not read: %s", error)
                return
            try:
                reports[key] = evaluate(manifest.drift, rows)
            except Exception:  # one version's failure, not the others'
                self.evaluation_failures += 1
                log.exception("drift: %s@%s not evaluated", *key)
        with self._lock:
            self._reports = reports

    def collect(self) -> Iterator[Metric]:
        version_labels = ["model", "version"]
        signal_labels = [*version_labels, "signal"]
        p_value = GaugeMetricFamily(
            "perito_drift_p_value",
            "Two-sample test p-value of each drift signal, live window against the card's "
            "reference (softmax: Bonferroni-corrected KS, Rabanser et al. 2019).",
            labels=signal_labels,
        )
        psi = GaugeMetricFamily(
            "perito_drift_psi",
            "Population stability index of each drift signal, live window against reference.",
            labels=signal_labels,
        )
        window = GaugeMetricFamily(
            "perito_drift_window_images",
            "Images in the version's shared live window.",
            labels=version_labels,
        )
        detected = GaugeMetricFamily(
            "perito_drift_detected",
            "1 while the version's verdict is drift (perito models drift), else 0.",
            labels=version_labels,
        )
        dropped = CounterMetricFamily(
            "perito_drift_rows_dropped",
            "Live-window rows never written: Redis failed (failed), too many queued (shed), "
            "or the drift code raised on the answers (error: a reference that does not fit "
            "the version's outputs, say; logged).",
            labels=["reason"],
        )
        with self._lock:
            reports = dict(self._reports)
        for (model, version), report in sorted(reports.items()):
            window.add_metric([model, version], report.window)
            detected.add_metric([model, version], 1.0 if report.detected else 0.0)
            for signal in report.signals:
                p_value.add_metric([model, version, signal.signal], signal.p_value)
                psi.add_metric([model, version, signal.signal], signal.psi)
        dropped.add_metric(["failed"], self.windows.failed_rows)
        dropped.add_metric(["shed"], self.windows.shed_rows)
        dropped.add_metric(["error"], self.windows.error_rows)
        yield from (p_value, psi, window, detected, dropped)
