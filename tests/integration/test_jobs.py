"""Bulk jobs end to end: real redis-server, real `perito worker` processes, S3 over HTTP."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import perito
from perito.v1.vocabulary import ItemState
from perito_core.imaging import load_model_input
from perito_core.jobs.store import DEAD_LETTER_KEY, ItemInput, JobStore, job_keys_pattern
from perito_core.models.engines.torchscript import TorchScriptModel
from perito_core.models.registry import ModelRegistry
from perito_training.datasets import load_fashion_mnist
from tests.helpers import (
    FASHION_MNIST_INPUT,
    MakeStores,
    ServerThread,
    WorkerProcess,
    create_job,
    encoded,
    train_fashion_mnist,
)

pytestmark = pytest.mark.integration

IMAGES = 2000
REGISTRY = "s3://models/bulk-tests"


def wait_for_items_done(handle: perito.JobHandle, items: int, timeout: float = 120) -> None:
    """Return once `items` of the job's items are done; fail, with its status, after `timeout`."""
    deadline = time.monotonic() + timeout
    while handle.status().done < items:
        assert time.monotonic() < deadline, handle.last
        time.sleep(0.02)


@dataclass
class Bulk:
    server: ServerThread
    client: perito.Client
    registry: ModelRegistry
    s3: object
    worker_env: dict[str, str]
    work: Path
    model_file: Path
    labels: list[str]
    truth: dict[str, int]  # image id -> true class
    image_bytes: dict[str, bytes]
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(self) -> WorkerProcess:
        worker = WorkerProcess(self.worker_env, self.work / f"worker-{len(self.workers)}.log")
        self.workers.append(worker.wait_ready())
        return worker

    def results_file(self, job: perito.Job) -> list[dict[str, object]]:
        jsonl = next(u for u in job.result_uris if u.endswith(".jsonl"))
        bucket, key = jsonl.removeprefix("s3://").split("/", 1)
        body = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]
        return [json.loads(line) for line in body.decode().splitlines()]


@pytest.fixture(scope="module")
def bulk(s3_stores: MakeStores) -> Iterator[Bulk]:
    stores = s3_stores("bulk", REGISTRY, results_uri="s3://results/jobs")
    work = stores.work
    model_file = work / "fashion.pt"
    labels = train_fashion_mnist(model_file)
    registry = stores.open_registry()
    registry.publish(
        "fashion", model_file, labels=labels, input=FASHION_MNIST_INPUT, aliases=("production",)
    )

    s3 = stores.s3_client()
    images, classes = load_fashion_mnist("test")
    truth, image_bytes = {}, {}
    for index in range(IMAGES):
        name = f"{index:05d}.png"
        truth[name], image_bytes[name] = int(classes[index]), encoded(images[index], "PNG")
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda n: s3.put_object(
                    Bucket="inspections", Key=f"fmnist/{n}", Body=image_bytes[n]
                ),
                truth,
            )
        )

    settings = stores.server_settings(
        job_chunk_size=50, visibility_timeout_s=10, watchdog_interval_s=1, lease_ttl_s=3
    )
    worker_env = stores.worker_env(PERITO_VISIBILITY_TIMEOUT_S="10", PERITO_LEASE_TTL_S="3")
    with ServerThread(settings) as server, perito.Client(server.target, timeout=60) as client:
        state = Bulk(
            server, client, registry, s3, worker_env, work, model_file, labels, truth, image_bytes
        )
        state.start_worker()
        yield state
        for worker in state.workers:
            worker.stop()


def test_a_prefix_job_matches_the_offline_evaluation_item_for_item(bulk: Bulk) -> None:
    handle = bulk.client.submit_job(
        "s3://inspections/fmnist/",
        model="fashion",
        version="production",
        top_k=3,
    )
    assert handle.last.total == IMAGES
    assert handle.last.model_version == "1"  # pinned at submission
    snapshots = list(handle.watch())
    job = snapshots[-1]
    assert job.state is perito.JobState.SUCCEEDED, job
    assert (job.succeeded, job.failed, job.cancelled) == (IMAGES, 0, 0)
    assert [s.done for s in snapshots] == sorted(s.done for s in snapshots)

    rows = bulk.results_file(job)
    assert [r["index"] for r in rows] == list(range(IMAGES))
    assert [r["id"] for r in rows] == sorted(bulk.truth)  # input order = key order
    served_accuracy = np.mean([bulk.labels.index(r["label"]) == bulk.truth[r["id"]] for r in rows])

    # The same version, evaluated offline on the same bytes, with the same preprocessing.
    artifact = bulk.registry.fetch("fashion", "1")
    model = TorchScriptModel.load(artifact.path, artifact.manifest, device="cpu")
    spec = artifact.manifest.input.spec()
    names = sorted(bulk.truth)
    offline = []
    for start in range(0, IMAGES, 100):
        batch = np.stack(
            [load_model_input(bulk.image_bytes[n], spec) for n in names[start : start + 100]]
        )
        offline += list(model.predict(batch).argmax(axis=1))
    offline_accuracy = np.mean([p == bulk.truth[n] for p, n in zip(offline, names, strict=True)])
    assert served_accuracy == offline_accuracy
    assert [bulk.labels.index(r["label"]) for r in rows] == [int(p) for p in offline]
    assert served_accuracy > 0.75

    csv_key = job.result_uris[1].removeprefix("s3://results/")
    table = bulk.s3.get_object(Bucket="results", Key=csv_key)["Body"].read().decode()  # type: ignore[attr-defined]
    assert len(table.strip().splitlines()) == IMAGES + 1


def test_a_worker_killed_mid_job_loses_nothing_and_counts_nothing_twice(bulk: Bulk) -> None:
    handle = bulk.client.submit_job("s3://inspections/fmnist/", model="fashion", chunk_size=20)
    wait_for_items_done(handle, 300)
    bulk.workers[-1].kill_hard()
    done_at_kill = handle.status().done
    assert done_at_kill < IMAGES, "the job finished before the kill: nothing was tested"

    bulk.start_worker()
    job = handle.wait(timeout=180)
    assert job.state is perito.JobState.SUCCEEDED, job
    assert (job.succeeded, job.failed, job.cancelled, job.total) == (IMAGES, 0, 0, IMAGES)
    rows = bulk.results_file(job)
    assert sorted(r["index"] for r in rows) == list(range(IMAGES))  # every item exactly once
    assert all(r["state"] == "succeeded" for r in rows)


def test_a_worker_stopped_with_sigterm_finishes_its_chunk_and_exits_cleanly(bulk: Bulk) -> None:
    """What Kubernetes and Docker do on a scale-down or rollout: SIGTERM to the main process."""
    handle = bulk.client.submit_job("s3://inspections/fmnist/", model="fashion", chunk_size=40)
    wait_for_items_done(handle, 200)
    worker = bulk.workers[-1]
    try:
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(60) == 0, "the worker did not exit cleanly on SIGTERM"
        stopped_at = handle.status().done
    finally:
        bulk.start_worker()  # whatever happened, the next tests need a worker
    assert stopped_at < IMAGES, "the job finished before the stop: nothing was tested"
    assert stopped_at % 40 == 0, "the chunk in hand was finished, not abandoned midway"
    job = handle.wait(timeout=180)
    assert (job.succeeded, job.failed, job.total) == (IMAGES, 0, IMAGES)
    rows = bulk.results_file(job)
    assert sorted(r["index"] for r in rows) == list(range(IMAGES))


def test_bad_images_fail_alone_with_reasons(bulk: Bulk) -> None:
    good = list(bulk.image_bytes.values())[:5]
    objects = {
        "mixed/good-0.png": good[0],
        "mixed/good-1.png": good[1],
        "mixed/truncated.png": good[2][: len(good[2]) // 2],
        "mixed/text.jpg": b"this is a text file with a .jpg name",
        "mixed/empty.png": b"",
        "mixed/good-2.png": good[3],
    }
    for key, body in objects.items():
        bulk.s3.put_object(Bucket="inspections", Key=key, Body=body)  # type: ignore[attr-defined]
    uris = [f"s3://inspections/{k}" for k in objects] + ["s3://inspections/mixed/missing.png"]
    job = bulk.client.submit_job(uris, model="fashion").wait(timeout=120)
    assert job.state is perito.JobState.PARTIALLY_SUCCEEDED
    assert (job.succeeded, job.failed) == (3, 4)
    failures = {r.image_id: r.error for r in bulk.client.job(job.id).results(failed_only=True)}
    assert list(failures) == ["truncated.png", "text.jpg", "empty.png", "missing.png"]
    assert failures["truncated.png"].startswith("TRUNCATED")
    assert failures["text.jpg"].startswith("NOT_AN_IMAGE")
    assert failures["empty.png"].startswith("EMPTY")
    assert (
        failures["missing.png"].startswith("NOT_FOUND") and "missing.png" in failures["missing.png"]
    )


def test_inline_and_local_folder_jobs(bulk: Bulk) -> None:
    names = sorted(bulk.image_bytes)[:6]
    job = bulk.client.submit_job(
        [bulk.image_bytes[n] for n in names] + [b""], model="fashion"
    ).wait(60)
    assert (job.total, job.succeeded, job.failed) == (7, 6, 1)

    folder = bulk.work / "site-photos"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(bulk.image_bytes[name])
    output = bulk.work / "site-results"
    job = bulk.client.submit_job(folder, model="fashion", output_uri=str(output)).wait(60)
    assert job.state is perito.JobState.SUCCEEDED
    assert (output / "results.csv").read_text().count("\n") == len(names) + 1
    with pytest.raises(perito.InvalidArgumentError, match="not under an allowed local root"):
        bulk.client.submit_job("/etc", model="fashion")


def test_a_local_folder_is_uploaded_to_s3_and_run_from_there(
    bulk: Bulk, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = bulk.work / "laptop-photos"
    (folder / "level-2").mkdir(parents=True)
    names = sorted(bulk.image_bytes)[:5]
    for name in names:
        (folder / "level-2" / name).write_bytes(bulk.image_bytes[name])
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", bulk.worker_env["PERITO_S3_ENDPOINT_URL"])
    handle = bulk.client.submit_job(
        folder, model="fashion", upload_to="s3://inspections/uploads/site-9"
    )
    job = handle.wait(60)
    assert (job.total, job.succeeded) == (5, 5)
    uris = [item.uri for item in handle.results()]
    assert uris == [f"s3://inspections/uploads/site-9/level-2/{n}" for n in names]
    with pytest.raises(TypeError, match="local folder"):
        bulk.client.submit_job(["a.png"], model="fashion", upload_to="s3://inspections/x/")


def test_cancel_stops_a_running_job_and_accounts_for_every_item(bulk: Bulk) -> None:
    handle = bulk.client.submit_job("s3://inspections/fmnist/", model="fashion", chunk_size=10)
    wait_for_items_done(handle, 50, timeout=60)
    job = handle.cancel()
    assert job.state is perito.JobState.CANCELLED
    assert job.cancelled > 0 and job.done == job.total == IMAGES
    time.sleep(2)  # chunks that were running stop at their next batch; nothing overwrites
    later = handle.status()
    assert (later.succeeded, later.failed, later.cancelled) == (
        job.succeeded,
        job.failed,
        job.cancelled,
    )
    states = [r["state"] for r in bulk.results_file(later)]
    assert states.count("cancelled") == job.cancelled and len(states) == IMAGES


def test_a_job_whose_model_version_is_broken_or_gone_fails_clearly(bulk: Bulk) -> None:
    for _ in range(2):
        bulk.registry.publish(
            "doomed", bulk.model_file, labels=bulk.labels, input=FASHION_MNIST_INPUT
        )
    bulk.s3.put_object(Bucket="models", Key="bulk-tests/models/doomed/1/model.pt", Body=b"tampered")  # type: ignore[attr-defined]
    bulk.s3.delete_object(Bucket="models", Key="bulk-tests/models/doomed/2/model.pt")  # type: ignore[attr-defined]
    uris = [f"s3://inspections/fmnist/{n}" for n in sorted(bulk.truth)[:30]]
    tampered = bulk.client.submit_job(uris, model="doomed", version="1").wait(60)
    deleted = bulk.client.submit_job(uris, model="doomed", version="2").wait(60)
    for job, words in ((tampered, "does not match"), (deleted, "not found")):
        assert job.state is perito.JobState.FAILED
        assert job.failed == job.total == 30
        assert "doomed@" in job.error and words in job.error
    with pytest.raises(perito.NotFoundError):
        bulk.client.submit_job(uris, model="doomed", version="7")


def _fashion_job(bulk: Bulk, store: JobStore, names: list[str], output_uri: str) -> Any:
    """A job of the bucket's images `names`, one chunk, recorded straight in `store` (no
    server): for tests that run `classify_chunk` in this process."""
    items = [ItemInput(id=n, uri=f"s3://inspections/fmnist/{n}") for n in names]
    job, _ = create_job(
        store,
        items,
        output_uri=output_uri,
        chunk_size=len(names),
        model="fashion",
        top_k=3,
        data_root=str(bulk.work / "job-data"),
    )
    return job


def test_a_chunk_that_keeps_killing_workers_is_dead_lettered(bulk: Bulk, redis_url: str) -> None:
    from perito_worker.processing import WorkerRuntime, classify_chunk
    from perito_worker.settings import WorkerSettings

    store = JobStore.connect(redis_url)
    job = _fashion_job(bulk, store, sorted(bulk.truth)[:8], "s3://results/dead-letter")
    for attempt in range(3):  # three workers took it and died without a trace
        store.acquire_chunk(job.id, 0, f"dead-worker-{attempt}", ttl_s=0.001)
        time.sleep(0.01)
    settings = WorkerSettings(
        redis_url=redis_url,
        registry=REGISTRY,
        s3_endpoint_url=bulk.server.settings.s3_endpoint_url,  # type: ignore[attr-defined]
        cache_dir=bulk.work / "inline-cache",
        max_attempts=3,
    )
    finalized: list[str] = []
    classify_chunk(WorkerRuntime(settings), job.id, 0, 0, 8, finalized.append)
    after = store.get(job.id)
    assert (after.failed, after.succeeded) == (8, 0)
    assert finalized == [job.id]
    error = store.results(job.id, 0, 1)[0].error
    assert "dead-lettered" in error and "started 3 times" in error and "killed" in error
    letters = [json.loads(x) for x in store.redis.lrange(DEAD_LETTER_KEY, 0, -1)]
    assert {"job_id": job.id, "chunk": 0} in [
        {"job_id": x["job_id"], "chunk": x["chunk"]} for x in letters
    ]


def test_an_unforeseen_error_on_an_item_fails_it_without_its_text(
    bulk: Bulk, redis_url: str
) -> None:
    """Whatever an image raises fails that image; an exception nobody foresaw (here the
    storage library's, naming a server path) reached the job's owner as its text: now the
    item says INTERNAL and where the worker's log has it."""
    from perito_worker.processing import WorkerRuntime, classify_chunk
    from perito_worker.settings import WorkerSettings

    store = JobStore.connect(redis_url)
    names = sorted(bulk.truth)[:2]
    job = _fashion_job(bulk, store, names, "s3://results/unforeseen")
    settings = WorkerSettings(
        redis_url=redis_url,
        registry=REGISTRY,
        s3_endpoint_url=bulk.server.settings.s3_endpoint_url,  # type: ignore[attr-defined]
        cache_dir=bulk.work / "inline-cache",
    )
    runtime = WorkerRuntime(settings)
    read = runtime.sources.read
    secret = "/srv/perito/tenants/other-customer/cache.db"

    def failing(uri: str, **options: Any) -> bytes:
        if uri.endswith(names[1]):
            raise OSError(5, "Input/output error", secret)
        return read(uri, **options)

    runtime.sources.read = failing  # type: ignore[method-assign]
    classify_chunk(runtime, job.id, 0, 0, 2, lambda _: None)
    first, second = store.results(job.id, 0, 2)
    assert first.state is ItemState.SUCCEEDED
    assert second.error == (
        f"INTERNAL: an unforeseen error; the worker's log has it under job {job.id} item 1"
    )


def test_odd_files_in_a_folder_job_fail_alone_and_the_job_ends_within_seconds(
    bulk: Bulk,
) -> None:
    folder = bulk.work / "odd-files"
    folder.mkdir()
    names = sorted(bulk.image_bytes)[:4]
    for name in names:
        (folder / name).write_bytes(bulk.image_bytes[name])
    (folder / "outside.png").symlink_to("/etc/hostname")  # a symlink out of the allowed root
    (folder / "x.jpg").mkdir()  # a directory named like a photo
    os.mkfifo(folder / "pipe.png")  # reading it would block forever
    with (folder / "sparse.png").open("wb") as sparse:  # 2 GB, no disk used
        sparse.truncate(2 * 1024**3)
    started = time.monotonic()
    job = bulk.client.submit_job(folder, model="fashion").wait(60)
    seconds = time.monotonic() - started
    assert job.state is perito.JobState.PARTIALLY_SUCCEEDED, job
    assert (job.total, job.succeeded, job.failed) == (8, 4, 4)
    failed = {Path(r.uri).name: r.error for r in bulk.client.job(job.id).results(failed_only=True)}
    assert set(failed) == {"outside.png", "x.jpg", "pipe.png", "sparse.png"}, failed
    assert "symbolic link that leads out of the allowed local roots" in failed["outside.png"]
    assert "TOO_LARGE" in failed["sparse.png"]
    assert seconds < 20, seconds


def test_a_retried_submission_with_the_same_request_id_makes_one_job(bulk: Bulk) -> None:
    uris = [f"s3://inspections/fmnist/{n}" for n in sorted(bulk.truth)[:5]]
    first = bulk.client.submit_job(uris, model="fashion", request_id="claim-7f3a")
    again = bulk.client.submit_job(uris, model="fashion", request_id="claim-7f3a")
    assert again.id == first.id
    assert first.wait(60).state is perito.JobState.SUCCEEDED
    other = bulk.client.submit_job(uris, model="fashion")
    assert other.id != first.id
    with pytest.raises(perito.InvalidArgumentError, match="request_id"):
        bulk.client.submit_job(uris, model="fashion", request_id="not/a valid id")


def test_an_unwritable_output_location_is_refused_at_submission(bulk: Bulk) -> None:
    uris = [f"s3://inspections/fmnist/{n}" for n in sorted(bulk.truth)[:2]]
    with pytest.raises(perito.FailedPreconditionError, match="output_uri") as caught:
        bulk.client.submit_job(uris, model="fashion", output_uri="s3://no-such-bucket/x")
    assert "does not exist" in str(caught.value)


def test_a_deleted_job_is_gone_and_its_results_file_stays(bulk: Bulk, redis_url: str) -> None:
    uris = [f"s3://inspections/fmnist/{n}" for n in sorted(bulk.truth)[:3]]
    job = bulk.client.submit_job(uris, model="fashion", request_id="to-delete").wait(60)
    bulk.client.delete_job(job.id)
    with pytest.raises(perito.FailedPreconditionError, match="since deleted"):
        bulk.client.submit_job(uris, model="fashion", request_id="to-delete")  # not made again
    with pytest.raises(perito.NotFoundError):
        bulk.client.get_job(job.id)
    assert not JobStore.connect(redis_url).redis.keys(job_keys_pattern(job.id))
    assert len(bulk.results_file(job)) == 3
    with pytest.raises(perito.NotFoundError):
        bulk.client.delete_job(job.id)


def test_a_folder_jobs_items_are_named_by_their_path_below_the_folder(bulk: Bulk) -> None:
    """Two inspections' `IMG_0001.jpg` in one job were both named `IMG_0001.jpg`: a caller
    matching verdicts to photos by id could not tell them apart."""
    folder = bulk.work / "two-sites"
    image = bulk.image_bytes[sorted(bulk.image_bytes)[0]]
    for site in ("north", "south"):
        (folder / site).mkdir(parents=True)
        (folder / site / "IMG_0001.jpg").write_bytes(image)
    (folder / "cover.jpg").write_bytes(image)
    job = bulk.client.submit_job(folder, model="fashion").wait(60)
    ids = [r.image_id for r in bulk.client.job(job.id).results()]
    assert ids == ["cover.jpg", "north/IMG_0001.jpg", "south/IMG_0001.jpg"], ids


def test_a_job_read_through_a_symbolic_link_names_the_link_not_where_it_leads(
    bulk: Bulk,
) -> None:
    """Results named the resolved path of a folder, an image or an output folder given
    through a symbolic link: where the link leads may be another tenant's folder."""
    real = bulk.work / "linked-real"
    (real / "in").mkdir(parents=True)
    (real / "out").mkdir()
    names = sorted(bulk.image_bytes)[:2]
    for name in names:
        (real / "in" / name).write_bytes(bulk.image_bytes[name])
    (real / "in" / "broken.png").symlink_to(real / "in" / "gone.png")
    link = bulk.work / "linked-shown"
    link.symlink_to(real)
    output = f"{link}/out/run-1"
    job = bulk.client.submit_job(f"{link}/in", model="fashion", output_uri=output).wait(60)
    assert job.output_uri == output, job
    assert job.result_uris == [f"{output}/results.jsonl", f"{output}/results.csv"], job
    uris = {r.image_id: (r.uri, r.error) for r in bulk.client.job(job.id).results()}
    assert uris[names[0]] == (f"{link}/in/{names[0]}", ""), uris
    assert uris["broken.png"][0] == f"{link}/in/broken.png"
    assert str(real) not in repr(uris) + repr(job), (uris, job)
    lines = (real / "out" / "run-1" / "results.jsonl").read_text()
    assert str(real) not in lines and f"{link}/in/{names[1]}" in lines
    single = bulk.client.submit_job([f"{link}/in/{names[1]}"], model="fashion").wait(60)
    [result] = bulk.client.job(single.id).results()
    assert result.uri == f"{link}/in/{names[1]}" and result.image_id == names[1]


def test_a_folder_job_accounts_for_every_phone_format_and_every_file(bulk: Bulk) -> None:
    from perito_core.imaging import HEIF_SUPPORTED

    assert HEIF_SUPPORTED, "pillow-heif is part of the serve install"
    folder = bulk.work / "phone-photos"
    folder.mkdir()
    grey = Image.open(io.BytesIO(bulk.image_bytes[sorted(bulk.image_bytes)[0]])).convert("RGB")
    photo = grey.resize((64, 64))
    photo.save(folder / "IMG_0001.HEIC", format="HEIF")
    photo.save(folder / "IMG_0002.heif", format="HEIF")
    photo.save(folder / "IMG_0003.avif", format="AVIF")
    photo.save(folder / "download.jfif", format="JPEG")
    photo.save(folder / "DSC_0004.JPG", format="JPEG")
    (folder / "x.jpg").write_text("not a photo at all")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # ignored, by the documented rule
    job = bulk.client.submit_job(folder, model="fashion").wait(60)
    assert (job.total, job.succeeded, job.failed) == (6, 5, 1), job
    results = {Path(r.uri).name: r for r in bulk.client.job(job.id).results()}
    assert set(results) == {
        "IMG_0001.HEIC",
        "IMG_0002.heif",
        "IMG_0003.avif",
        "download.jfif",
        "DSC_0004.JPG",
        "x.jpg",
    }
    assert "NOT_AN_IMAGE" in results["x.jpg"].error


ODD_KEYS = ["claim #1234.jpg", "what?.png", "100% dent.png", "a+b c.png", "Schäden/rück tür.png"]


def test_odd_s3_keys_classify_from_a_prefix_a_manifest_and_a_uri_list(bulk: Bulk) -> None:
    data = bulk.image_bytes[sorted(bulk.image_bytes)[1]]
    for key in ODD_KEYS:
        bulk.s3.put_object(Bucket="inspections", Key=f"odd/{key}", Body=data)  # type: ignore[attr-defined]
    uris = [f"s3://inspections/odd/{key}" for key in ODD_KEYS]
    manifest = "uri,id\n" + "".join(
        '"{}",{}\n'.format(uri.replace('"', '""'), n) for n, uri in enumerate(uris)
    )
    bulk.s3.put_object(Bucket="inspections", Key="odd-manifest.csv", Body=manifest.encode())  # type: ignore[attr-defined]
    for source in ("s3://inspections/odd/", "s3://inspections/odd-manifest.csv", uris):
        job = bulk.client.submit_job(source, model="fashion").wait(60)
        assert (job.total, job.succeeded) == (len(ODD_KEYS), len(ODD_KEYS)), (source, job)
        rows = bulk.results_file(job)
        assert sorted(r["uri"] for r in rows) == sorted(uris), source


def test_a_chunk_slower_than_the_visibility_timeout_is_read_once_and_succeeds(
    bulk: Bulk, s3_endpoint: str
) -> None:
    """Slow storage (0.8 s per object), two worker processes, a 10 s visibility timeout, a
    chunk of 16 objects read one at a time: the broker hands the chunk to the second process
    while the first is still on it, which must skip it (the lease is live)."""
    from tests.helpers import SlowS3Proxy

    names = sorted(bulk.truth)[:16]
    for worker in bulk.workers:
        worker.stop()
    bulk.workers.clear()
    try:
        with SlowS3Proxy(s3_endpoint, delay_s=0.8) as proxy:
            slow_env = {
                **bulk.worker_env,
                "PERITO_S3_ENDPOINT_URL": proxy.endpoint,
                "PERITO_DECODE_THREADS": "1",
            }
            slow = [
                WorkerProcess(slow_env, bulk.work / f"slow-{n}.log").wait_ready() for n in range(2)
            ]
            try:
                uris = [f"s3://inspections/fmnist/{n}" for n in names]
                started = time.monotonic()
                job = bulk.client.submit_job(uris, model="fashion", chunk_size=16).wait(120)
                took = time.monotonic() - started
            finally:
                for worker in slow:
                    worker.stop()
            reads = {path: count for path, count in proxy.gets.items() if "/fmnist/" in path}
    finally:
        bulk.start_worker()
    assert took > 12, f"the chunk took {took:.1f} s: not longer than the visibility timeout"
    assert job.state is perito.JobState.SUCCEEDED, job
    assert (job.succeeded, job.failed) == (16, 0)
    assert len(reads) == 16 and set(reads.values()) == {1}, reads
    logs = "".join((bulk.work / f"slow-{n}.log").read_text() for n in range(2))
    assert "died" not in logs
    assert "another worker holds it; delivery skipped" in logs, "no second delivery: not tested"


def test_unknown_jobs_are_not_found(bulk: Bulk) -> None:
    with pytest.raises(perito.NotFoundError, match="job 'nope' not found"):
        bulk.client.get_job("nope")


def test_the_cli_submits_follows_and_reads_jobs(bulk: Bulk) -> None:
    from tests.helpers import run_perito

    env = {**bulk.worker_env, "PERITO_SERVER": bulk.server.target}

    def perito_lines(*args: str) -> list[str]:
        return run_perito(*args, env=env, timeout=120).stdout.splitlines()

    def perito_json(*args: str) -> object:
        return json.loads(run_perito(*args, "--json", env=env, timeout=120).stdout)

    manifest = bulk.work / "manifest.csv"
    names = sorted(bulk.truth)[:12]
    manifest.write_text(
        "uri,id\n"
        + "".join(f"s3://inspections/fmnist/{n},photo-{n}\n" for n in names)
        + "s3://inspections/fmnist/nope.png,ghost\n"
    )
    labels = ("--label", "site=garage-7", "--label", "floor=2")
    job = perito_json("submit", str(manifest), "--model", "fashion", "--wait", "-k", "2", *labels)
    assert isinstance(job, dict)
    assert job["state"] == "partially_succeeded" and job["total"] == 13 and job["failed"] == 1
    status = perito_json("job", "status", job["id"])
    assert isinstance(status, dict) and status["succeeded"] == 12
    rows = [json.loads(line) for line in perito_lines("job", "results", job["id"], "--json")]
    assert [r["image_id"] for r in rows] == [f"photo-{n}" for n in names] + ["ghost"]
    assert len(rows[0]["classification"]["predictions"]) == 2
    # Each answer names the model and the concrete version that gave it.
    assert rows[0]["classification"]["model"] == "fashion"
    assert rows[0]["classification"]["model_version"] == job["model_version"] == "1"
    labelled = perito_lines("job", "list", *labels, "--json")
    assert [json.loads(line)["id"] for line in labelled] == [job["id"]]
    assert json.loads(labelled[0])["labels"] == {"site": "garage-7", "floor": "2"}
    failed_lines = perito_lines("job", "results", job["id"], "--failed")
    assert failed_lines[0].split() == ["INDEX", "IMAGE", "ANSWER"]
    failed = "\n".join(failed_lines)
    assert "ghost" in failed and "NOT_FOUND" in failed and "photo-" not in failed
    watched = perito_lines("job", "watch", job["id"], "--json")
    assert json.loads(watched[-1])["state"] == "partially_succeeded"
    cancelled = perito_json("job", "cancel", job["id"])
    assert isinstance(cancelled, dict) and cancelled["state"] == "partially_succeeded"


def test_with_redis_down_jobs_are_unavailable_and_classify_still_works(
    tmp_path: Path, tiny_model_file: Path, photos: dict[str, Path]
) -> None:
    from tests.conftest import tiny_registry
    from tests.helpers import free_port

    server = ServerThread.serving(
        tiny_registry(tmp_path / "registry", tiny_model_file),
        tmp_path / "cache",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        local_roots=[tmp_path],
    )
    with server, perito.Client(server.target, max_retries=0) as client:
        assert client.classify([photos["coffee"]], model="tiny")[0].label in {
            "minor",
            "moderate",
            "severe",
        }
        with pytest.raises(perito.UnavailableError, match="job store") as caught:
            client.submit_job([photos["coffee"].read_bytes()], model="tiny")
        assert caught.value.reason == "STORAGE_UNAVAILABLE"
        with pytest.raises(perito.UnavailableError, match="job store"):
            client.get_job("anything")


async def test_the_async_client_submits_watches_and_reads_a_job(
    bulk: Bulk, capsys: pytest.CaptureFixture[str]
) -> None:
    names = sorted(bulk.image_bytes)[:20]
    async with perito.AsyncClient(bulk.server.target, timeout=60) as client:
        handle = await client.submit_job(
            [bulk.image_bytes[n] for n in names], model="fashion@production"
        )
        seen = [job async for job in handle.watch()]
        assert seen[-1].terminal and seen[-1].succeeded == 20
        job = await handle.wait(timeout=30, progress=True)
        assert job.state is perito.JobState.SUCCEEDED
        results = [item async for item in handle.results(page_size=7)]
    assert [r.index for r in results] == list(range(20))
    predicted = [r.classification.label for r in results if r.classification]
    assert len(predicted) == 20
    assert "20/20" in capsys.readouterr().err  # the progress bar


def test_job_state_counts_match_the_jobs(bulk: Bulk, redis_url: str) -> None:
    """The per-state counters behind the `perito_jobs` gauge agree with the jobs themselves."""
    from perito_core.jobs.store import JOBS_KEY, JobStore

    bulk.client.submit_job(
        [bulk.image_bytes[n] for n in sorted(bulk.image_bytes)[:3]], model="fashion"
    ).wait(60)
    store = JobStore.connect(redis_url)
    counts = store.state_counts()
    job_ids = [_id.decode() for _id in store.redis.zrange(JOBS_KEY, 0, -1)]
    assert sum(counts.values()) == len(job_ids) and min(counts.values()) >= 0
    jobs = [store.get(job_id) for job_id in job_ids]
    for state in perito.JobState:
        if state.terminal:
            core_state = next(s for s in counts if s.value == state.value)
            assert counts[core_state] == sum(j.state.value == state.value for j in jobs), state


def _idle_class_threads(pid: int) -> tuple[int, int]:
    """(threads in SCHED_IDLE, threads in all) of process `pid` and its children."""
    idle = total = 0
    pids = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    for process in pids:
        for task in Path(f"/proc/{process}/task").iterdir():
            total += 1
            idle += os.sched_getscheduler(int(task.name)) == os.SCHED_IDLE
    return idle, total


def test_the_worker_computes_in_sched_idle_and_renews_leases_in_the_normal_class(
    bulk: Bulk,
) -> None:
    """On a machine it shares with `perito serve`, the worker's model and decoders run only on
    CPU time the server leaves; its main thread (Celery, Redis, the lease) stays normal."""
    job = bulk.client.submit_job(
        [bulk.image_bytes[n] for n in sorted(bulk.image_bytes)[:8]], model="fashion"
    ).wait(60)
    assert job.state is perito.JobState.SUCCEEDED
    pid = bulk.workers[0].process.pid
    idle, total = _idle_class_threads(pid)
    # The model's thread and its engine pool, the decoders: lowered; the rest not.
    assert 2 <= idle < total, (idle, total)
    assert os.sched_getscheduler(pid) != os.SCHED_IDLE
