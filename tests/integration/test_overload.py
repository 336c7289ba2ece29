"""More than the server can take, over a real socket to `perito serve` in its own process.

Ten times the callers its queue admits get RESOURCE_EXHAUSTED with a retry hint for the excess,
every admitted call its right answer, health SERVING throughout and the server's memory
bounded. Whatever a caller sends (64 bad images with 250-character ids, a model name of 5000
characters), the error it gets back is the typed one, whole, within the trailer budget.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

import perito
from perito.v1 import classify_pb2, image_pb2, service_pb2_grpc
from perito_core.models.registry import ModelRegistry
from perito_server.errors import MAX_TRAILER_BYTES
from perito_server.settings import ServerSettings
from tests.conftest import publish_tiny
from tests.helpers import (
    Proc,
    ServerThread,
    free_port,
    perito_proc,
    subprocess_env,
    wait_for_port,
)

pytestmark = pytest.mark.integration

QUEUE_IMAGES = 64  # the server's max_queue_size
IMAGES_PER_CALL = 8
CALLERS = 10 * QUEUE_IMAGES // IMAGES_PER_CALL  # 80 callers: ten times what the queue admits
QUEUE_BYTES = 2 * 1024 * 1024  # the server's max_queue_bytes
# Growth of the server's RSS during the burst that counts as bounded. Were every caller's
# images decoded at once it would be 640 x 6.75 MB (4.3 GB); bounded, it is a few decodes.
MAX_RSS_GROWTH_MB = 300


@dataclass
class Served:
    target: str
    process: Proc
    log: Path

    def rss_mb(self) -> float:
        """The server's resident memory now (VmRSS from /proc), in MiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_file: Path) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("overload")
    registry = ModelRegistry.open(str(work / "registry"), cache_dir=work / ".publish-cache")
    publish_tiny(registry, tiny_model_file)
    port = free_port()
    env = subprocess_env(
        PERITO_REGISTRY=str(work / "registry"),
        PERITO_CACHE_DIR=str(work / "cache"),
        PERITO_REDIS_URL="redis://127.0.0.1:1/0",  # no jobs here: nothing listens there
        PERITO_MAX_QUEUE_SIZE=str(QUEUE_IMAGES),
        PERITO_MAX_QUEUE_BYTES=str(QUEUE_BYTES),
        PERITO_MAX_BATCH_SIZE="8",
        PERITO_DECODE_THREADS="2",
        PERITO_TORCH_THREADS="1",
    )
    log_path = work / "serve.log"
    args = ["serve", "--port", str(port), "--preload", "tiny"]
    process = perito_proc("perito serve", args, env, log_path, "serving on").launch()
    try:
        wait_for_port(port, timeout=120, process=process)
        yield Served(f"127.0.0.1:{port}", process, log_path)
    finally:
        code = process.stop()
    assert code == 0, log_path.read_text()[-4000:]


def _gradient_pngs(count: int, side: int = 1500) -> list[bytes]:
    """Cheap to send (about 10 KB), slow to decode (about 35 ms): the queue stays full."""
    rng = np.random.default_rng(7)
    ramp = (np.mgrid[0:side, 0:side][1] / side)[..., None]
    images = []
    for _ in range(count):
        start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        pixels = (ramp * start + (1 - ramp) * end).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


@dataclass
class Burst:
    answered: list[list[perito.Classification]] = field(default_factory=list)
    refused: list[perito.ResourceExhaustedError] = field(default_factory=list)
    other: list[BaseException] = field(default_factory=list)
    health: list[int] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)


async def _burst(served: Served, images: list[bytes], ids: list[str]) -> Burst:
    burst = Burst()
    done = asyncio.Event()

    async def caller(client: perito.AsyncClient) -> None:
        try:
            burst.answered.append(await client.classify(images, model="tiny", ids=ids))
        except perito.ResourceExhaustedError as error:
            burst.refused.append(error)
        except BaseException as error:  # noqa: BLE001 - anything else fails the test below
            burst.other.append(error)

    async def probe() -> None:
        async with grpc.aio.insecure_channel(served.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not done.is_set():
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                burst.health.append(reply.status)
                await asyncio.sleep(0.02)

    async with perito.AsyncClient(served.target, timeout=60, max_retries=0) as client:
        prober = asyncio.ensure_future(probe())
        await asyncio.gather(*(caller(client) for _ in range(CALLERS)))
        done.set()
        await prober
    return burst


def test_ten_times_overload_is_shed_with_retry_hints_while_serving(served: Served) -> None:
    images = _gradient_pngs(IMAGES_PER_CALL)
    ids = [f"photo-{i}" for i in range(IMAGES_PER_CALL)]
    with perito.Client(served.target, timeout=60) as client:
        reference = client.classify(images, model="tiny", ids=ids)
    expected = [[p.probability for p in r.predictions] for r in reference]
    # The images tell apart: an answer swapped between callers or positions would show.
    assert len({tuple(np.round(e, 4)) for e in expected}) == IMAGES_PER_CALL

    baseline = served.rss_mb()
    sampling = threading.Event()
    samples: list[float] = []

    def sample() -> None:
        while not sampling.is_set():
            samples.append(served.rss_mb())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    try:
        burst = asyncio.run(_burst(served, images, ids))
    finally:
        sampling.set()
        sampler.join()
    elapsed = time.monotonic() - started
    peak = max(samples)
    hints = [e.retry_after or 0.0 for e in burst.refused] or [0.0]
    print(
        f"\noverload: {CALLERS} callers x {IMAGES_PER_CALL} images against a queue of "
        f"{QUEUE_IMAGES}: {len(burst.answered)} admitted and answered, {len(burst.refused)} "
        f"refused RESOURCE_EXHAUSTED (retry hints {min(hints):.2f}-{max(hints):.2f} s), "
        f"{len(burst.other)} other; "
        f"{len(burst.health)} health checks; {elapsed:.1f} s; server RSS {baseline:.0f} MiB "
        f"before, peak {peak:.0f} MiB (+{peak - baseline:.0f})"
    )

    assert burst.other == []
    assert len(burst.answered) + len(burst.refused) == CALLERS
    assert len(burst.refused) >= CALLERS // 2, "the burst should overload the queue"
    assert burst.answered, "some callers must be admitted"
    for error in burst.refused:
        assert error.reason == "QUEUE_FULL"
        assert error.retry_after is not None and error.retry_after > 0
    for results in burst.answered:
        assert [r.image_id for r in results] == ids
        for result, probabilities in zip(results, expected, strict=True):
            assert [p.probability for p in result.predictions] == pytest.approx(
                probabilities, abs=1e-5
            )
    assert burst.health and set(burst.health) == {health_pb2.HealthCheckResponse.SERVING}
    assert peak - baseline < MAX_RSS_GROWTH_MB
    # Once the burst is over, the server answers again.
    with perito.Client(served.target, timeout=60) as client:
        assert len(client.classify(images[:1], model="tiny")) == 1


def test_a_request_over_the_byte_budget_is_refused_without_a_retry_hint(served: Served) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    assert len(buffer.getvalue()) > QUEUE_BYTES
    with (
        perito.Client(served.target, timeout=60) as client,
        pytest.raises(perito.ResourceExhaustedError) as caught,
    ):
        client.classify([buffer.getvalue()], model="tiny")
    assert caught.value.reason == "REQUEST_TOO_LARGE"
    assert caught.value.retry_after is None
    assert f"{QUEUE_BYTES} bytes" in caught.value.message


LONG_IDS = [f"claim-{i:02d}-" + "x" * 241 for i in range(64)]  # 250 characters each


def test_sixty_four_bad_images_with_long_ids_give_typed_errors_every_time(
    served: Served,
) -> None:
    assert {len(i) for i in LONG_IDS} == {250}
    bad = [b"not an image at all"] * 64
    with perito.Client(served.target, timeout=60, max_retries=0) as client:
        for _ in range(20):
            with pytest.raises(perito.InvalidArgumentError) as caught:
                client.classify(bad, model="tiny", ids=LONG_IDS)
            error = caught.value
            assert error.reason == "NOT_AN_IMAGE"
            fields = [v.field for v in error.violations]
            assert fields[:3] == ["images[0]", "images[1]", "images[2]"]
            assert LONG_IDS[0][:64] + "…" in error.violations[0].description
            assert LONG_IDS[0] not in error.message
            summary = error.violations[-1]
            assert summary.field == "images"
            kept = len(error.violations) - 1
            assert summary.description.startswith(f"... and {64 - kept} more")


def _trailers(served: Served, request: classify_pb2.ClassifyRequest) -> grpc.RpcError:
    with grpc.insecure_channel(served.target) as channel:
        stub = service_pb2_grpc.PeritoStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as caught:
            stub.Classify(request, timeout=30)
    return caught.value


def test_the_trailers_of_the_worst_error_stay_within_the_budget(served: Served) -> None:
    request = classify_pb2.ClassifyRequest(
        model="tiny",
        images=[image_pb2.Image(id=i, content=b"\x89PNG broken") for i in LONG_IDS],
    )
    error = _trailers(served, request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    call: Any = error
    sent = len(call.details().encode())
    for key, value in call.trailing_metadata() or ():
        sent += len(key) + len(base64.b64encode(value) if key.endswith("-bin") else value)
    assert sent <= MAX_TRAILER_BYTES


@pytest.mark.parametrize(
    ("kwargs", "field", "limit"),
    [
        ({"model": "m" * 5000}, "model", 128),
        ({"model": "tiny", "version": "1" * 5000}, "version", 128),
        ({"model": "tiny", "ids": ["ok", "i" * 257]}, "images[1].id", 256),
    ],
    ids=["model", "version", "image-id"],
)
def test_over_long_names_are_refused_early_naming_the_field_and_limit(
    served: Served, kwargs: dict[str, object], field: str, limit: int
) -> None:
    images = _gradient_pngs(2, side=40)
    with (
        perito.Client(served.target, timeout=60, max_retries=0) as client,
        pytest.raises(perito.InvalidArgumentError) as caught,
    ):
        client.classify(images, **kwargs)  # type: ignore[arg-type]
    error = caught.value
    assert [v.field for v in error.violations] == [field]
    assert f"the limit is {limit}" in error.message
    assert len(error.message) < 100


def test_calls_past_max_concurrent_rpcs_are_refused_by_grpc(tmp_path: Path) -> None:
    """Two health watches hold both slots; a third call is refused until one ends."""
    settings = ServerSettings(
        port=0,
        registry=str(tmp_path / "registry"),
        cache_dir=tmp_path / "cache",
        redis_url="redis://127.0.0.1:1/0",
        max_concurrent_rpcs=2,
    )
    with (
        ServerThread(settings) as running,
        grpc.insecure_channel(running.target) as channel,
        perito.Client(running.target, timeout=10, max_retries=0) as client,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(2)]
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(perito.ResourceExhaustedError, match="Concurrent RPC limit"):
            client.list_models()
        watches[0].cancel()
        deadline = time.monotonic() + 10
        while True:  # the server sees the cancellation a moment later
            try:
                assert client.list_models() == []
                break
            except perito.ResourceExhaustedError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        watches[1].cancel()
