"""`Classify`, `ListModels` and `GetModel` over a real socket, local-folder registry."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

import perito
from perito.v1 import classify_pb2, image_pb2, service_pb2_grpc
from perito_server.settings import ServerSettings
from tests.conftest import lite0_and_tiny_registry, tiny_registry
from tests.helpers import ServerThread, run_in_threads

pytestmark = pytest.mark.integration

LITE0 = "imagenet-efficientnet-lite0"


@pytest.fixture(scope="module")
def registry_dir(
    tmp_path_factory: pytest.TempPathFactory, lite0_dir: Path, tiny_model_file: Path
) -> Path:
    return lite0_and_tiny_registry(tmp_path_factory.mktemp("registry"), lite0_dir, tiny_model_file)


@pytest.fixture(scope="module")
def server(registry_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread.serving(
        registry_dir,
        tmp_path_factory.mktemp("cache"),
        preload=[LITE0],
        max_images_per_request=16,
        max_message_bytes=8 * 1024 * 1024,
        # Batching is checked at a set size here; the size measured at load has its own
        # test (test_preferred_batch_size), and on a busy machine it could measure 2.
        preferred_batch_size=4,
    ) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[perito.Client]:
    with perito.Client(server.target, timeout=60) as sdk_client:
        yield sdk_client


EXPECTED = {
    "coffee": {"espresso", "cup", "coffee mug"},
    "chelsea": {"tabby, tabby cat", "tiger cat", "Egyptian cat"},
    "rocket": {"missile", "projectile, missile", "space shuttle"},
    "china": {"palace", "bell cote, bell cot", "pagoda, pagoda tree"},
}


def test_real_photos_get_the_labels_a_person_would_agree_with(
    client: perito.Client, photos: dict[str, Path]
) -> None:
    names = list(EXPECTED)
    results = client.classify([photos[n] for n in names], model=LITE0, top_k=3)
    assert [r.image_id for r in results] == [f"{n}.jpg" for n in names]
    for name, result in zip(names, results, strict=True):
        assert result.label in EXPECTED[name], (name, result.predictions)
        probabilities = [p.probability for p in result.predictions]
        assert probabilities == sorted(probabilities, reverse=True)
        assert result.model == LITE0 and result.model_version == "1"
    assert results[0].label == "espresso" and results[0].probability > 0.5


def test_uncertainty_flags_hesitant_predictions(
    client: perito.Client, photos: dict[str, Path]
) -> None:
    coffee, chelsea = client.classify(
        [photos["coffee"], photos["chelsea"]], model=LITE0, confidence_threshold=0.6
    )
    assert not coffee.uncertain  # espresso at ~90%
    assert chelsea.uncertain  # three kinds of cat at ~30% each
    assert chelsea.margin < coffee.margin
    assert chelsea.normalized_entropy > coffee.normalized_entropy


def test_versions_and_aliases_select_the_model(
    client: perito.Client, photos: dict[str, Path]
) -> None:
    by_alias = client.classify([photos["coffee"]], model=LITE0, version="production")
    by_number = client.classify([photos["coffee"]], model=LITE0, version="1")
    assert by_alias[0].model_version == by_number[0].model_version == "1"


def test_pil_images_numpy_arrays_and_bytes_are_accepted(
    client: perito.Client, photos: dict[str, Path]
) -> None:
    data = photos["coffee"].read_bytes()
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    results = client.classify([data, pil, np.asarray(pil)], model=LITE0)
    assert [r.label for r in results] == ["espresso"] * 3
    assert [r.image_id for r in results] == ["0", "1", "2"]


def _violation_fields(error: perito.PeritoError) -> list[str]:
    return [v.field for v in error.violations]


def test_bad_images_are_invalid_argument_naming_each_image(
    client: perito.Client, photos: dict[str, Path]
) -> None:
    good = photos["coffee"].read_bytes()
    with pytest.raises(perito.InvalidArgumentError) as caught:
        client.classify(
            [good, b"", good, b"not an image at all", good[: len(good) // 3]],
            model=LITE0,
            ids=["ok-1", "empty", "ok-2", "text", "cut"],
        )
    error = caught.value
    assert _violation_fields(error) == ["images[1]", "images[3]", "images[4]"]
    assert "empty" in error.message and "(and 2 more)" in error.message
    # The call's reason is its first bad image's; each image has its own.
    assert error.reason == "EMPTY"
    assert [v.reason for v in error.violations] == ["EMPTY", "NOT_AN_IMAGE", "TRUNCATED"]
    descriptions = " ".join(v.description for v in error.violations)
    assert "'text'" in descriptions and "not a recognised image format" in descriptions
    assert "damaged" in descriptions
    # Skipped, each rejected image says what was wrong with it.
    results = client.classify(
        [good, b"", good, b"not an image at all", good[: len(good) // 3]],
        model=LITE0,
        on_invalid="skip",
    )
    rejected = [r for r in results if isinstance(r, perito.RejectedImage)]
    assert [(r.index, r.error.reason) for r in rejected] == [
        (1, "EMPTY"),
        (3, "NOT_AN_IMAGE"),
        (4, "TRUNCATED"),
    ]


def test_unknown_model_and_version_are_not_found(
    client: perito.Client, photos: dict[str, Path]
) -> None:
    with pytest.raises(perito.NotFoundError, match="model 'car-damage' not found"):
        client.classify([photos["coffee"]], model="car-damage")
    with pytest.raises(perito.NotFoundError, match="no version 9"):
        client.classify([photos["coffee"]], model=LITE0, version="9")
    with pytest.raises(perito.NotFoundError, match="no alias 'staging'"):
        client.classify([photos["coffee"]], model=LITE0, version="staging")


def test_request_shape_errors_are_invalid_argument(
    server: ServerThread, photos: dict[str, Path]
) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = service_pb2_grpc.PeritoStub(channel)
        cases = {
            "at least one image": classify_pb2.ClassifyRequest(model=LITE0),
            "model is required": classify_pb2.ClassifyRequest(
                images=[image_pb2.Image(content=b"x")]
            ),
            "send URIs to SubmitJob": classify_pb2.ClassifyRequest(
                model=LITE0, images=[image_pb2.Image(uri="s3://bucket/a.jpg")]
            ),
            "the limit is 16": classify_pb2.ClassifyRequest(
                model=LITE0, images=[image_pb2.Image(content=b"x")] * 17
            ),
            "invalid model name": classify_pb2.ClassifyRequest(
                model="Not/A/Name", images=[image_pb2.Image(content=b"x")]
            ),
        }
        for message, request in cases.items():
            with pytest.raises(grpc.RpcError) as caught:
                stub.Classify(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in caught.value.details()


def test_messages_over_the_size_limit_are_resource_exhausted(client: perito.Client) -> None:
    with pytest.raises(perito.ResourceExhaustedError, match="larger than max"):
        client.classify([b"\xff" * (9 * 1024 * 1024)], model=LITE0)


def test_a_request_past_its_deadline_is_deadline_exceeded(
    client: perito.Client, photos: dict[str, Path]
) -> None:
    with pytest.raises(perito.DeadlineExceededError):
        client.classify([photos["coffee"]] * 16, model=LITE0, timeout=0.005)


def test_concurrent_calls_are_batched_together(
    server: ServerThread, photos: dict[str, Path]
) -> None:
    data = photos["chelsea"].read_bytes()
    pool = server.running.pool  # type: ignore[attr-defined]
    batcher = server.call(pool.get(LITE0)).batcher
    before = (batcher.stats.batch_size.count, batcher.stats.batch_size.total)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with perito.Client(server.target) as c:
                for _ in range(3):
                    assert c.classify([data], model=LITE0)[0].label in EXPECTED["chelsea"]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    run_in_threads(call, 12)
    assert not errors
    batches = batcher.stats.batch_size.count - before[0]
    images = batcher.stats.batch_size.total - before[1]
    assert images == 36
    assert batches < 36 / 2, f"{batches} forward passes for 36 images: no batching"


def test_a_full_queue_is_resource_exhausted_with_a_retry_hint(
    registry_dir: Path, tmp_path: Path, photos: dict[str, Path]
) -> None:
    settings = ServerSettings(
        port=0,
        registry=str(registry_dir),
        cache_dir=tmp_path,
        preload=[LITE0],
        max_batch_size=1,
        preferred_batch_size=1,
        max_queue_size=2,
    )
    data = photos["coffee"].read_bytes()
    with ServerThread(settings) as small:
        results: list[object] = []

        def call() -> None:
            with perito.Client(small.target, max_retries=0) as c:
                try:
                    results.append(c.classify([data, data], model=LITE0))
                except perito.PeritoError as exc:
                    results.append(exc)

        run_in_threads(call, 6)
    rejected = [r for r in results if isinstance(r, perito.ResourceExhaustedError)]
    assert rejected, results
    assert all(r.reason == "QUEUE_FULL" and r.retry_after and r.retry_after > 0 for r in rejected)
    assert any(isinstance(r, list) for r in results)
    # The SDK's retries, honouring the hint, get everyone through.
    with ServerThread(settings) as small, perito.Client(small.target, max_retries=20) as c:

        async def burst() -> list[object]:
            return await asyncio.gather(
                *(asyncio.to_thread(c.classify, [data, data], model=LITE0) for _ in range(6))
            )

        assert all(len(r) == 2 for r in asyncio.run(burst()))  # type: ignore[arg-type]


def test_a_tampered_artifact_is_refused_with_failed_precondition(
    tmp_path: Path, tiny_model_file: Path, photos: dict[str, Path]
) -> None:
    tiny_registry(tmp_path / "registry", tiny_model_file)
    stored = tmp_path / "registry/models/tiny/1/model.pt"
    stored.write_bytes(stored.read_bytes() + b"tampered")
    with (
        ServerThread.serving(tmp_path / "registry", tmp_path / "c2") as running,
        perito.Client(running.target) as c,
    ):
        with pytest.raises(perito.FailedPreconditionError, match="does not match") as caught:
            c.classify([photos["coffee"]], model="tiny")
        assert caught.value.reason == "MODEL_CHECKSUM_MISMATCH"


def test_models_are_listed_and_described_with_their_cards(client: perito.Client) -> None:
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {LITE0, "tiny"}
    assert models[LITE0].aliases == {"production": "1"}
    assert models[LITE0].versions[0].loaded
    model = client.get_model(LITE0)
    version = model.versions[0]
    assert len(version.labels) == 1000 and version.labels[967] == "espresso"
    assert version.input_height == version.input_width == 224
    assert version.card["input"]["interpolation"] == "bicubic"
    assert version.card["artifact"]["sha256"] == version.sha256
    with pytest.raises(perito.NotFoundError):
        client.get_model("nope")


def test_health_is_serving_and_reflection_lists_the_service(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "perito.v1.Perito"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        [answer] = list(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )
        names = {s.name for s in answer.list_services_response.service}
        assert "perito.v1.Perito" in names and "grpc.health.v1.Health" in names
