"""A job whose results files cannot be written still ends: FAILED with a reason its owner may
read, its item results kept, its concurrent-job slot given back. Real redis-server, a real
`perito worker` process, the server over gRPC, S3 over HTTP (moto, or a server refusing writes).

A refusal that waiting cannot change (a symbolic link, a file where the output folder should
be, a missing bucket, access denied) ends the job at once; storage that cannot be reached is
tried again until `finalize_timeout_s` has passed since the first failed write.

Reads alike: an image whose folder was swapped for a symbolic link after the job was submitted
is not read through it."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import perito
from perito import ItemState, JobState
from perito_core.access.tenancy import Quotas, add_tenant
from perito_core.errors import StorageUnavailable
from perito_core.jobs.results import finalize_job
from perito_core.jobs.store import ItemInput, JobStore
from perito_core.storage import S3Options
from tests.conftest import tiny_registry
from tests.helpers import (
    ServerThread,
    Stores,
    WorkerProcess,
    create_job,
    encoded,
    free_port,
    record_chunks,
)
from tests.integration.test_job_store import _watchdog

pytestmark = pytest.mark.integration

# What the tests allow a permanent refusal, from the last item recorded to the job's end:
# the worker that recorded it finalises at once; the watchdog would within its grace.
AT_ONCE_S = 20.0


def _complete_job(store: JobStore, output_uri: str, folder: Path, items: int = 3) -> str:
    """A job of `items` items, every one recorded succeeded, not finalised yet; its data in
    `folder`'s `job-data`."""
    inputs = (ItemInput(id=str(i), uri=f"s3://b/{i}.jpg") for i in range(items))
    data_root = str(folder / "job-data")
    job, _ = create_job(store, inputs, output_uri=output_uri, chunk_size=4, data_root=data_root)
    record_chunks(store, job.id)
    return job.id


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore.connect(redis_url)


def _ended_failed(store: JobStore, job_id: str, reason: str) -> None:
    job = store.get(job_id)
    assert job.state is JobState.FAILED, job
    assert job.error == f"results could not be written: {reason}"
    assert job.result_uris == []
    assert [r.state for r in store.results(job_id, 0, job.total)] == [ItemState.SUCCEEDED] * 3


def test_a_file_where_the_output_folder_should_be_ends_the_job_at_the_first_try(
    store: JobStore, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("not a folder")
    job_id = _complete_job(store, str(tmp_path / "file" / "out"), tmp_path)
    finalize_job(store, job_id, S3Options(), give_up_after_s=300)
    _ended_failed(store, job_id, "part of the output path is a file, not a folder")


def test_an_output_folder_deleted_mid_job_is_made_again(store: JobStore, tmp_path: Path) -> None:
    out = tmp_path / "acme" / "out"
    out.mkdir(parents=True)
    job_id = _complete_job(store, str(out), tmp_path)
    out.rmdir()
    out.parent.rmdir()
    job = finalize_job(store, job_id, S3Options(), give_up_after_s=300)
    assert job.state is JobState.SUCCEEDED, job
    assert (out / "results.jsonl").read_text().count("\n") == 3


def test_a_results_file_that_is_a_symbolic_link_is_not_followed_even_inside_the_folder(
    store: JobStore, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("kept\n")
    (out / "results.csv").symlink_to(out / "mine.txt")
    job_id = _complete_job(store, str(out), tmp_path)
    finalize_job(store, job_id, S3Options(), give_up_after_s=300)
    _ended_failed(store, job_id, "results.csv is a symbolic link; it is not followed")
    assert (out / "mine.txt").read_text() == "kept\n"
    assert not (out / "results.jsonl").exists()  # nothing written: neither file


def test_a_missing_s3_bucket_ends_the_job_at_the_first_try(
    store: JobStore, s3_endpoint: str, tmp_path: Path
) -> None:
    job_id = _complete_job(store, "s3://no-such-bucket/jobs/x", tmp_path)
    finalize_job(store, job_id, S3Options(endpoint_url=s3_endpoint), give_up_after_s=300)
    _ended_failed(store, job_id, "bucket 'no-such-bucket' does not exist")


@dataclass
class _Refusing:
    """An S3 endpoint that answers every request 403 AccessDenied (a bucket policy denying
    writes), counting the requests."""

    endpoint: str
    requests: list[str]


@pytest.fixture
def refusing_s3() -> Iterator[_Refusing]:
    requests: list[str] = []
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
        b"<Message>Access Denied</Message></Error>"
    )

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _deny(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            requests.append(f"{self.command} {self.path}")
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _deny

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield _Refusing(f"http://127.0.0.1:{server.server_address[1]}", requests)
    finally:
        server.shutdown()
        server.server_close()


def test_s3_denying_writes_ends_the_job_at_the_first_try(
    store: JobStore, refusing_s3: _Refusing, tmp_path: Path
) -> None:
    job_id = _complete_job(store, "s3://results/acme/x", tmp_path)
    options = S3Options(endpoint_url=refusing_s3.endpoint, access_key_id="k", secret_access_key="s")
    finalize_job(store, job_id, options, give_up_after_s=300)
    _ended_failed(store, job_id, "object storage refused the write (AccessDenied)")
    assert [r.split()[0] for r in refusing_s3.requests] == ["PUT"]  # one try, not retried


def test_unreachable_storage_is_tried_again_until_the_bound_then_the_job_fails(
    store: JobStore, tmp_path: Path
) -> None:
    job_id = _complete_job(store, "s3://results/acme/x", tmp_path)
    nobody = S3Options(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1)
    with pytest.raises(StorageUnavailable, match="results not written yet"):
        finalize_job(store, job_id, nobody, give_up_after_s=300)  # an outage: tried again
    assert store.get(job_id).state is JobState.QUEUED
    watchdog = _watchdog(store, finalize_timeout_s=3.0)
    watchdog.s3 = nobody
    started = time.monotonic()
    while store.get(job_id).state is JobState.QUEUED and time.monotonic() - started < 30:
        watchdog.sweep()
        time.sleep(0.2)
    waited = time.monotonic() - started
    job = store.get(job_id)
    assert job.state is JobState.FAILED, job
    assert 2.5 <= waited <= 3.0 + 2.0  # tried up to the bound, and ended at it
    assert job.error.startswith("results could not be written: object storage is unreachable (")
    assert job.finalize_attempts >= 2
    assert [r.state for r in store.results(job_id, 0, 3)] == [ItemState.SUCCEEDED] * 3


# Through the server and a worker process, as a tenant would meet it.


@dataclass
class Tenant:
    client: perito.Client
    work: Path
    photos: Path
    stores: Stores


@pytest.fixture
def acme(tmp_path: Path, redis_url: str, tiny_model_file: Path) -> Iterator[Tenant]:
    """Tenant `acme`, allowed one job at a time, reading and writing `work/acme`; no worker
    running yet."""
    work = tmp_path
    tiny_registry(work / "registry", tiny_model_file)
    photos = work / "acme" / "photos"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for n in range(3):
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        (photos / f"{n}.png").write_bytes(encoded(pixels, "PNG"))
    tenants = work / "tenants.yaml"
    token = add_tenant(
        tenants,
        "acme",
        roles=["classify", "jobs", "models:read"],
        models=["tiny"],
        read=[str(work / "acme")],
        write=[str(work / "acme")],
        quotas=Quotas(concurrent_jobs=1),
    )
    stores = Stores(work, redis_url)
    settings = stores.server_settings(tenants_file=tenants, watchdog_interval_s=1)
    with ServerThread(settings) as server, perito.Client(server.target, token=token) as client:
        yield Tenant(client, work, photos, stores)


def _wait(handle: perito.JobHandle, done: int, timeout: float) -> perito.Job:
    """The job once `done` items are done and it is terminal, or as it is after `timeout`."""
    deadline = time.monotonic() + timeout
    job = handle.status()
    while not (job.done >= done and job.terminal) and time.monotonic() < deadline:
        time.sleep(0.1)
        job = handle.status()
    return job


def test_a_results_file_that_is_a_symlink_ends_the_job_failed_and_frees_its_slot(
    acme: Tenant,
) -> None:
    globex = acme.work / "globex" / "results.jsonl"  # another tenant's file
    globex.parent.mkdir()
    globex.write_text("globex's own results\n")
    out = acme.work / "acme" / "out"
    out.mkdir()
    handle = acme.client.submit_job(str(acme.photos), model="tiny", output_uri=str(out))
    with pytest.raises(perito.ResourceExhaustedError):  # its one slot is taken
        acme.client.submit_job(str(acme.photos), model="tiny", output_uri=str(out.parent / "out2"))
    (out / "results.jsonl").symlink_to(globex)  # while the job waits for a worker

    with WorkerProcess(acme.stores.worker_env(), acme.work / "worker.log").wait_ready(120):
        started = time.monotonic()
        while handle.status().done < 3 and time.monotonic() - started < 120:
            time.sleep(0.1)
        all_done = time.monotonic()
        job = _wait(handle, 3, AT_ONCE_S)
        took = time.monotonic() - all_done
        assert job.state is perito.JobState.FAILED, (job, took)
        assert took < AT_ONCE_S
        assert job.error == (
            "results could not be written: results.jsonl is a symbolic link; it is not followed"
        )
        assert str(globex.parent) not in job.error
        assert (job.succeeded, job.failed) == (3, 0)  # every item keeps its result
        assert [r.state for r in handle.results()] == [perito.ItemState.SUCCEEDED] * 3
        assert globex.read_text() == "globex's own results\n"
        assert not (out / "results.csv").exists()

        again = acme.client.submit_job(
            str(acme.photos), model="tiny", output_uri=str(out.parent / "out2")
        )
        final = _wait(again, 3, 120)
        assert final.state is perito.JobState.SUCCEEDED, final
        assert (out.parent / "out2" / "results.jsonl").read_text().count("\n") == 3


def test_a_folder_swapped_for_a_link_after_submission_is_not_read(acme: Tenant) -> None:
    """While acme's job waits for a worker, its folder is swapped for a link to another
    tenant's folder under the same local root: the worker reads each image at the path
    checked at submission, with no link followed, so every item fails naming acme's own
    path, and the other tenant's photos are never read."""
    globex = acme.work / "globex" / "photos"
    globex.mkdir(parents=True)
    for photo in acme.photos.iterdir():
        (globex / photo.name).write_bytes(photo.read_bytes())
    handle = acme.client.submit_job(str(acme.photos), model="tiny")
    acme.photos.rename(acme.photos.with_name("moved"))
    acme.photos.symlink_to(globex)

    with WorkerProcess(acme.stores.worker_env(), acme.work / "worker.log").wait_ready(120):
        job = _wait(handle, 3, 120)
    assert (job.state, job.succeeded, job.failed) == (perito.JobState.FAILED, 0, 3), job
    for result in handle.results():
        assert result.error.startswith(f"INVALID_ARGUMENT: {acme.photos / result.image_id}: "), (
            result
        )
        assert "a symbolic link took the place of part of its path" in result.error, result
        assert "globex" not in result.error
