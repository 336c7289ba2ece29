"""Prometheus metrics scraped from a running server and a running worker; JSON logs with ids."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import perito
from perito_core.jobs.store import ItemInput, JobStore
from tests.conftest import publish_tiny
from tests.helpers import (
    ServerThread,
    Stores,
    WorkerProcess,
    create_job,
    free_port,
    record_chunks,
    redis_server,
)

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _hold_a_job_running(redis_url: str, port: int, data_root: Path) -> dict[str, list[float]]:
    """A job made in the shared job store, then started there (as a worker's first chunk
    starts it), and removed: how much each of `perito_jobs{state="queued"}` and
    `{state="running"}` rose over its count before, once made and once started."""
    store = JobStore.connect(redis_url)
    states = ("queued", "running")
    before = scrape(port)
    job, _ = create_job(
        store,
        [ItemInput(id="0", uri="s3://never/read.jpg")],
        output_uri="s3://never/written",
        chunk_size=1,
        model="car-damage",
        data_root=str(data_root),
    )
    made = scrape(port)
    store.mark_running(job.id)
    started = scrape(port)
    store.mark_unrecorded(job.id, perito.ItemState.FAILED, "made by the metrics test")
    store.finish(job.id, [])
    assert store.delete(job.id)
    return {
        state: [
            value(after, "perito_jobs", state=state) - value(before, "perito_jobs", state=state)
            for after in (made, started)
        ]
        for state in states
    }


def test_server_and_worker_metrics_and_json_logs(
    tmp_path: Path, tiny_model_file: Path, redis_url: str
) -> None:
    stores = Stores(tmp_path, redis_url)
    publish_tiny(stores.open_registry("publish"), tiny_model_file, name="car-damage")
    worker_port = free_port()
    worker_tmp = tmp_path / "worker-tmp"
    worker_tmp.mkdir()
    worker_env = stores.worker_env(
        PERITO_METRICS_PORT=str(worker_port), PERITO_LOG_FORMAT="json", TMPDIR=str(worker_tmp)
    )
    image = np.full((32, 32, 3), 120, dtype=np.uint8)
    with WorkerProcess(worker_env, tmp_path / "worker.log").wait_ready():
        settings = stores.server_settings(metrics_port=0)
        with ServerThread(settings) as server, perito.Client(server.target) as client:
            for _ in range(3):
                client.classify([image, image], model="car-damage")
            with pytest.raises(perito.InvalidArgumentError):
                client.classify([b"not an image"], model="car-damage")
            with pytest.raises(perito.NotFoundError):
                client.classify([image], model="no-such-model")
            port = server.running.metrics_port  # type: ignore[attr-defined]
            before = value(scrape(port), "perito_jobs", state="partially_succeeded")
            job = client.submit_job([image] * 5 + [b""], model="car-damage").wait(60)
            assert (job.succeeded, job.failed) == (5, 1)
            metrics = scrape(port)
            held = _hold_a_job_running(redis_url, port, tmp_path / "job-data")
        # The finalising task may land a moment after the job reads as done.
        deadline = time.monotonic() + 20
        while True:
            work = scrape(worker_port)
            if value(work, "perito_worker_jobs_finished_total", state="partially_succeeded") or (
                time.monotonic() > deadline
            ):
                break
            time.sleep(0.2)

    assert value(metrics, "perito_requests_total", method="Classify", code="OK") == 3
    assert value(metrics, "perito_requests_total", method="Classify", code="INVALID_ARGUMENT") == 1
    assert value(metrics, "perito_requests_total", method="Classify", code="NOT_FOUND") == 1
    assert value(metrics, "perito_request_seconds_count", method="Classify") == 5
    assert value(metrics, "perito_images_rejected_total", reason="NOT_AN_IMAGE") == 1
    # Per loaded form: a version served in two forms (a request asked for a more exact one)
    # has a series for each.
    served = {"model": "car-damage", "version": "1", "form": "torchscript-fp32"}
    assert value(metrics, "perito_images_classified_total", **served) == 6
    assert value(metrics, "perito_batch_size_count", **served) >= 3
    assert value(metrics, "perito_model_loaded", **served) == 1
    assert value(metrics, "perito_model_load_seconds", **served) > 0
    # Every call was answered: nothing waits in the batcher, out of its room of 256.
    assert metrics[("perito_queue_images", tuple(sorted(served.items())))] == 0
    assert value(metrics, "perito_queue_capacity_images", **served) == 256
    # The batcher's refusals, drops and failures are exported (none happened here).
    for name, extra in (
        ("perito_batcher_rejected_total", {"budget": "images"}),
        ("perito_batcher_rejected_total", {"budget": "bytes"}),
        ("perito_batcher_dropped_total", {"reason": "deadline"}),
        ("perito_batcher_dropped_total", {"reason": "cancelled"}),
        ("perito_batches_failed_total", {}),
    ):
        assert metrics[(name, tuple(sorted({**served, **extra}.items())))] == 0, name
    assert value(metrics, "perito_jobs_submitted_total", model="car-damage") == 1
    # Jobs per state come from the shared job store: other tests' jobs may be there too.
    assert value(metrics, "perito_jobs", state="partially_succeeded") == before + 1
    assert held == {"queued": [1, 0], "running": [0, 1]}

    # The pool's metric samples were in a temporary folder, removed when the worker stopped.
    assert list(worker_tmp.iterdir()) == []

    items = "perito_worker_items_total"
    assert value(work, items, model="car-damage", version="1", outcome="succeeded") == 5
    assert value(work, items, model="car-damage", version="1", outcome="failed") == 1
    assert value(work, "perito_worker_jobs_finished_total", state="partially_succeeded") == 1
    assert value(work, "perito_worker_chunk_seconds_count") >= 1
    assert value(work, "perito_worker_model_load_seconds", model="car-damage", version="1") > 0

    lines = [
        json.loads(line)
        for line in (tmp_path / "worker.log").read_text().splitlines()
        if line.startswith("{")
    ]
    assert lines, "the worker logs JSON lines"
    assert any(entry.get("job_id") == job.id for entry in lines)
    assert {"time", "level", "logger", "message"} <= set(lines[0])


def test_stuck_jobs_and_dead_letters_are_exported(tmp_path: Path) -> None:
    """`perito_job_stalled_seconds` grows while a job does not move and drops when it records
    a result; `perito_dead_letters` counts the dead-letter list. Its own Redis: no other
    test's jobs."""
    with redis_server() as url:
        store = JobStore.connect(url)
        with ServerThread(Stores(tmp_path, url).server_settings(metrics_port=0)) as server:
            port = server.running.metrics_port  # type: ignore[attr-defined]

            def stalled(state: str) -> float:
                return value(scrape(port), "perito_job_stalled_seconds", state=state)

            quiet = scrape(port)
            job, _ = create_job(
                store,
                [ItemInput(id=str(i), uri=f"s3://never/{i}.jpg") for i in range(2)],
                output_uri="s3://never/written",
                chunk_size=1,
                data_root=str(tmp_path / "job-data"),
            )
            time.sleep(1.5)
            waited = stalled("queued")
            store.mark_running(job.id)
            started = stalled("running"), stalled("queued")
            time.sleep(1.5)
            stuck = stalled("running")
            record_chunks(store, job.id, chunks=[0])
            moved = stalled("running")
            store.dead_letter(job.id, 1, "made by the metrics test")
            dead = value(scrape(port), "perito_dead_letters")

    assert quiet[("perito_job_stalled_seconds", (("state", "queued"),))] == 0
    assert quiet[("perito_job_stalled_seconds", (("state", "running"),))] == 0
    assert quiet[("perito_dead_letters", ())] == 0
    assert waited >= 1.4
    assert started[0] < 1.0 and started[1] == 0  # the running job is no longer queued
    assert stuck >= 1.4
    assert moved < 1.0
    assert dead == 1
