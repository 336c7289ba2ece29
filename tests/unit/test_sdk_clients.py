"""`Client` and `AsyncClient` against a scripted in-process server: the whole-call deadline
across split calls, retries, idempotent submission, pagination, job handles and split calls
with bad images. No model and no real server: the fake answers in microseconds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import perito
from perito.v1 import classify_pb2, jobs_pb2, models_pb2, service_pb2_grpc

BAD = b"bad image"  # content the fake server refuses, as the real one refuses a truncated JPEG


@dataclass
class Seen:
    """One Classify call as the server saw it."""

    ids: list[str]
    time_remaining: float | None


@dataclass
class Fake(service_pb2_grpc.PeritoServicer):
    """A Perito server that answers from a script."""

    classify_delay: float = 0.0
    # Statuses to fail the next calls with, in order: (code, retry_after or None).
    failures: list[tuple[grpc.StatusCode, float | None]] = field(default_factory=list)
    # At most this many bad images named one by one, then one summary (as the real server).
    max_named: int = 16
    classify_calls: list[Seen] = field(default_factory=list)
    submit_ids: list[str] = field(default_factory=list)
    models_page_tokens: list[str] = field(default_factory=list)
    results_page_tokens: list[str] = field(default_factory=list)

    def _scripted_failure(self, context: grpc.ServicerContext) -> None:
        if self.failures:
            code, retry_after = self.failures.pop(0)
            details = []
            if retry_after is not None:
                info = error_details_pb2.RetryInfo(
                    retry_delay=duration_pb2.Duration(nanos=int(retry_after * 1e9))
                )
                packed = any_pb2.Any()
                packed.Pack(info)
                details.append(packed)
            status = status_pb2.Status(
                code=code.value[0], message=f"scripted {code.name}", details=details
            )
            context.abort_with_status(rpc_status.to_status(status))

    def Classify(
        self, request: classify_pb2.ClassifyRequest, context: grpc.ServicerContext
    ) -> classify_pb2.ClassifyResponse:
        self.classify_calls.append(
            Seen([image.id for image in request.images], context.time_remaining())
        )
        self._scripted_failure(context)
        bad = [i for i, image in enumerate(request.images) if image.content == BAD]
        if bad:
            named, rest = bad[: self.max_named], bad[self.max_named :]
            violations = [
                error_details_pb2.BadRequest.FieldViolation(
                    field=f"images[{i}]",
                    description=f"images[{i}] (id {request.images[i].id!r}): truncated",
                )
                for i in named
            ]
            if rest:
                violations.append(
                    error_details_pb2.BadRequest.FieldViolation(
                        field="images",
                        description=f"... and {len(rest)} more "
                        f"(images[{rest[0]}] to images[{rest[-1]}])",
                    )
                )
            packed = any_pb2.Any()
            packed.Pack(error_details_pb2.BadRequest(field_violations=violations))
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            status = status_pb2.Status(
                code=code_pb2.INVALID_ARGUMENT,
                message=violations[0].description + more,
                details=[packed],
            )
            context.abort_with_status(rpc_status.to_status(status))
        time.sleep(self.classify_delay)
        return classify_pb2.ClassifyResponse(
            model=request.model,
            model_version="1",
            results=[
                classify_pb2.Classification(
                    image_id=image.id,
                    predictions=[
                        classify_pb2.Prediction(label="ok", class_index=0, probability=0.9)
                    ],
                )
                for image in request.images
            ],
        )

    def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        self.models_page_tokens.append(request.page_token)
        self._scripted_failure(context)
        pages = {"": (["a", "b"], "p2"), "p2": (["c", "d"], "p3"), "p3": (["e"], "")}
        names, token = pages[request.page_token]
        return models_pb2.ListModelsResponse(
            models=[models_pb2.Model(name=name) for name in names], next_page_token=token
        )

    def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        self.submit_ids.append(request.request_id)
        self._scripted_failure(context)
        return jobs_pb2.Job(id="job-1", state=jobs_pb2.JOB_STATE_QUEUED, total_items=3)

    def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        return _job(request.job_id, jobs_pb2.JOB_STATE_SUCCEEDED, done=3)

    def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[jobs_pb2.Job]:
        yield _job(request.job_id, jobs_pb2.JOB_STATE_RUNNING, done=1)
        yield _job(request.job_id, jobs_pb2.JOB_STATE_SUCCEEDED, done=3)

    def ListJobResults(
        self, request: jobs_pb2.ListJobResultsRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.ListJobResultsResponse:
        self.results_page_tokens.append(request.page_token)
        start = int(request.page_token or 0)
        stop = min(start + request.page_size, 3)
        return jobs_pb2.ListJobResultsResponse(
            results=[
                jobs_pb2.JobItemResult(
                    index=i, image_id=f"{i}.jpg", state=jobs_pb2.ITEM_STATE_SUCCEEDED
                )
                for i in range(start, stop)
            ],
            next_page_token=str(stop) if stop < 3 else "",
        )

    def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        return _job(request.job_id, jobs_pb2.JOB_STATE_CANCELLED, done=3)


def _job(job_id: str, state: Any, done: int) -> jobs_pb2.Job:
    return jobs_pb2.Job(id=job_id, state=state, total_items=3, succeeded_items=done)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Fake]]:
    """A real gRPC server on a local port, answering from one `Fake` reset for each test."""
    servicer = Fake()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    service_pb2_grpc.add_PeritoServicer_to_server(servicer, grpc_server)  # type: ignore[no-untyped-call]
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield f"127.0.0.1:{port}", servicer
    grpc_server.stop(0)


@pytest.fixture
def fake(server: tuple[str, Fake]) -> Fake:
    servicer = server[1]
    servicer.__dict__.update(Fake().__dict__)  # a fresh script
    return servicer


@pytest.fixture
def target(server: tuple[str, Fake]) -> str:
    return server[0]


# The whole-call deadline across split calls.

ONE_PER_CALL = perito.Limits(max_images_per_request=1, max_concurrent_requests=1)


async def test_async_classify_keeps_one_deadline_for_all_its_parts(target: str, fake: Fake) -> None:
    """Four parts of 0.4 s each, one at a time, under a 1 s timeout: the call fails with
    DEADLINE_EXCEEDED at about 1 s. (Before the shared core, each part got a fresh full
    timeout after waiting on its semaphore, and the call took 1.6 s and succeeded.)"""
    fake.classify_delay = 0.4
    started = time.monotonic()
    async with perito.AsyncClient(target, limits=ONE_PER_CALL, max_retries=0) as client:
        with pytest.raises(perito.DeadlineExceededError):
            await client.classify([b"a", b"b", b"c", b"d"], model="m", timeout=1.0)
    elapsed = time.monotonic() - started
    assert elapsed < 1.4, elapsed
    # Each part was sent with what was left of the call's budget, not a fresh one.
    remaining = [seen.time_remaining for seen in fake.classify_calls]
    assert all(r is not None for r in remaining)
    assert remaining[1] is not None and remaining[1] < 0.65, remaining


async def test_async_classify_budget_includes_waiting_for_a_slot(target: str, fake: Fake) -> None:
    """Parts sent concurrently: a part that waited for a free slot gets only what is left."""
    fake.classify_delay = 0.3
    limits = perito.Limits(max_images_per_request=1, max_concurrent_requests=2)
    async with perito.AsyncClient(target, limits=limits, max_retries=0) as client:
        results = await client.classify([b"a", b"b", b"c", b"d"], model="m", timeout=5.0)
    assert [r.image_id for r in results] == ["0", "1", "2", "3"]
    remaining = sorted((s.time_remaining or 0.0 for s in fake.classify_calls), reverse=True)
    assert remaining[0] > 4.5 and remaining[-1] < 4.85, remaining


def test_sync_classify_keeps_one_deadline_for_all_its_parts(target: str, fake: Fake) -> None:
    fake.classify_delay = 0.4
    started = time.monotonic()
    with (
        perito.Client(target, limits=ONE_PER_CALL, max_retries=0) as client,
        pytest.raises(perito.DeadlineExceededError),
    ):
        client.classify([b"a", b"b", b"c", b"d"], model="m", timeout=1.0)
    assert time.monotonic() - started < 1.4


# Retries and idempotent submission.


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_unavailable_and_hinted_overload_are_retried(
    target: str, fake: Fake, asynchronous: bool
) -> None:
    unavailable = (grpc.StatusCode.UNAVAILABLE, None)
    hinted = (grpc.StatusCode.RESOURCE_EXHAUSTED, 0.01)
    fake.failures = [unavailable, hinted, unavailable]
    models = await _list_models(target, asynchronous, max_retries=3)
    assert [m.name for m in models] == ["a", "b", "c", "d", "e"]
    assert fake.models_page_tokens == ["", "", "", "", "p2", "p3"]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_retries_stop_at_max_retries_and_at_unhinted_overload(
    target: str, fake: Fake, asynchronous: bool
) -> None:
    fake.failures = [(grpc.StatusCode.UNAVAILABLE, None)] * 3
    with pytest.raises(perito.UnavailableError):
        await _list_models(target, asynchronous, max_retries=2)
    assert len(fake.models_page_tokens) == 3
    fake.failures = [(grpc.StatusCode.RESOURCE_EXHAUSTED, None)]
    with pytest.raises(perito.ResourceExhaustedError):
        await _list_models(target, asynchronous, max_retries=2)
    assert len(fake.models_page_tokens) == 4


async def _list_models(target: str, asynchronous: bool, **options: Any) -> list[perito.Model]:
    if asynchronous:
        async with perito.AsyncClient(target, **options) as aclient:
            return await aclient.list_models()
    with perito.Client(target, **options) as client:
        return client.list_models()


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_a_submission_keeps_its_request_id_across_retries(
    target: str, fake: Fake, asynchronous: bool
) -> None:
    fake.failures = [(grpc.StatusCode.UNAVAILABLE, None)]
    uris = ["s3://b/1.jpg", "s3://b/2.jpg"]
    if asynchronous:
        async with perito.AsyncClient(target) as aclient:
            await aclient.submit_job(uris, model="m")
            await aclient.submit_job(uris, model="m", request_id="mine")
    else:
        with perito.Client(target) as client:
            client.submit_job(uris, model="m")
            client.submit_job(uris, model="m", request_id="mine")
    first, retried, second = fake.submit_ids
    assert first == retried and len(first) == 36 and second == "mine"


# Job handles, through the clients' public job methods.


def test_a_sync_job_handle(target: str, fake: Fake) -> None:
    with perito.Client(target) as client:
        handle = client.submit_job(["s3://b/1.jpg"], model="m")
        states = [job.state for job in handle.watch()]
        assert states == [perito.JobState.RUNNING, perito.JobState.SUCCEEDED]
        assert handle.wait(timeout=5).state == perito.JobState.SUCCEEDED
        results = list(handle.results(page_size=2))
        assert [r.index for r in results] == [0, 1, 2]
        assert fake.results_page_tokens == ["", "2"]
        assert handle.cancel().state == perito.JobState.CANCELLED
        assert client.job("job-1").status().done == 3


async def test_an_async_job_handle(target: str, fake: Fake) -> None:
    async with perito.AsyncClient(target) as client:
        handle = await client.submit_job(["s3://b/1.jpg"], model="m")
        states = [job.state async for job in handle.watch()]
        assert states == [perito.JobState.RUNNING, perito.JobState.SUCCEEDED]
        assert (await handle.wait(timeout=5)).state == perito.JobState.SUCCEEDED
        results = [r async for r in handle.results(page_size=2)]
        assert [r.index for r in results] == [0, 1, 2]
        assert fake.results_page_tokens == ["", "2"]
        assert (await handle.cancel()).state == perito.JobState.CANCELLED
        assert (await (await client.job("job-1")).status()).done == 3


# Split calls with bad images.

SPLIT = perito.Limits(max_images_per_request=4)


def _images(count: int, bad: list[int]) -> list[bytes]:
    return [BAD if i in bad else b"fine" for i in range(count)]


async def _classify(target: str, asynchronous: bool, images: list[bytes], **options: Any) -> Any:
    if asynchronous:
        async with perito.AsyncClient(target, limits=SPLIT) as aclient:
            return await aclient.classify(images, model="m", **options)
    with perito.Client(target, limits=SPLIT) as client:
        return client.classify(images, model="m", **options)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_a_split_call_names_bad_images_by_the_callers_index(
    target: str, fake: Fake, asynchronous: bool
) -> None:
    images = _images(10, bad=[6, 7])
    ids = [f"photo-{i}" for i in range(10)]
    with pytest.raises(perito.InvalidArgumentError) as caught:
        await _classify(target, asynchronous, images, ids=ids)
    error = caught.value
    assert [v.field for v in error.violations] == ["images[6]", "images[7]"]
    assert error.message == "images[6] (id 'photo-6'): truncated (and 1 more)"
    assert error.violations[1].description == "images[7] (id 'photo-7'): truncated"


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_skip_returns_every_image_with_the_bad_ones_rejected(
    target: str, fake: Fake, asynchronous: bool
) -> None:
    fake.max_named = 2  # the server names two bad images per answer: parts are resent
    bad = [1, 4, 5, 6, 7, 9]
    images = _images(10, bad)
    results = await _classify(target, asynchronous, images, on_invalid="skip")
    assert [r.image_id for r in results] == [str(i) for i in range(10)]
    rejected = [r for r in results if isinstance(r, perito.RejectedImage)]
    assert [r.index for r in rejected] == bad
    for r in rejected:
        assert r.error.violations[0].field == f"images[{r.index}]"
        assert r.error.message == f"images[{r.index}] (id '{r.index}'): truncated"
    classified = [r for r in results if isinstance(r, perito.Classification)]
    assert [r.image_id for r in classified] == ["0", "2", "3", "8"]
    assert all(r.error is None and r.label == "ok" for r in classified)


async def test_async_parts_still_running_are_cancelled_when_one_fails(
    target: str, fake: Fake
) -> None:
    fake.classify_delay = 1.0
    limits = perito.Limits(max_images_per_request=1, max_concurrent_requests=4)
    started = time.monotonic()
    async with perito.AsyncClient(target, limits=limits) as client:
        with pytest.raises(perito.InvalidArgumentError, match=r"images\[3\]"):
            await client.classify(_images(4, bad=[3]), model="m", timeout=30)
        assert time.monotonic() - started < 0.9  # not waiting for the slow parts
