"""The SDK against a real server: sync and async clients alike, large requests split
client-side, TLS and bearer tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import perito
from scripts.deploy_secrets import generate
from tests.conftest import lite0_and_tiny_registry
from tests.helpers import ServerThread, run_perito, subprocess_env

pytestmark = pytest.mark.integration

LITE0 = "imagenet-efficientnet-lite0"
TOKEN = "claims-team-token"


@pytest.fixture(scope="module")
def registry_dir(
    tmp_path_factory: pytest.TempPathFactory, lite0_dir: Path, tiny_model_file: Path
) -> Path:
    return lite0_and_tiny_registry(
        tmp_path_factory.mktemp("sdk-registry"), lite0_dir, tiny_model_file, "car-damage"
    )


@pytest.fixture(scope="module")
def server(registry_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    cache = tmp_path_factory.mktemp("cache")
    with ServerThread.serving(registry_dir, cache, max_images_per_request=16) as running:
        yield running


async def test_async_and_sync_clients_agree(server: ServerThread, photos: dict[str, Path]) -> None:
    images = [photos["coffee"], photos["chelsea"], photos["rocket"]]
    with perito.Client(server.target, timeout=60) as client:
        expected = client.classify(images, model=LITE0, version="production", top_k=3)
        sync_models = client.list_models()
    async with perito.AsyncClient(server.target, timeout=60) as client:
        results = await client.classify(images, model=f"{LITE0}@production", top_k=3)
        models = await client.list_models()
        card = await client.get_model("car-damage")
        with pytest.raises(perito.NotFoundError, match="claims-model"):
            await client.classify(images, model="claims-model")
    assert [r.label for r in results] == [r.label for r in expected]
    assert [r.image_id for r in results] == ["coffee.jpg", "chelsea.jpg", "rocket.jpg"]
    assert results[0].label == "espresso" and results[0].model_version == "1"
    assert [m.name for m in models] == [m.name for m in sync_models] == ["car-damage", LITE0]
    assert card.versions[0].labels == ["minor", "moderate", "severe"]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_many_images_are_split_into_calls_within_the_servers_limit(
    server: ServerThread, asynchronous: bool
) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (24, 24, 3), dtype=np.uint8) for _ in range(40)]
    ids = [f"photo-{i}" for i in range(40)]
    limits = perito.Limits(max_images_per_request=16)
    if asynchronous:
        async with perito.AsyncClient(server.target, limits=limits) as aclient:
            results = await aclient.classify(images, model="car-damage", ids=ids)
    else:
        with perito.Client(server.target, limits=limits) as client:
            results = client.classify(images, model="car-damage", ids=ids)
    assert [r.image_id for r in results] == ids
    # Sent as one call, the same images break the server's limit.
    unsplit = perito.Limits(max_images_per_request=64)
    with (
        perito.Client(server.target, limits=unsplit) as client,
        pytest.raises(perito.InvalidArgumentError, match="16"),
    ):
        client.classify(images, model="car-damage")


def test_a_model_reference_names_one_version_only() -> None:
    with perito.Client("localhost:1") as client, pytest.raises(ValueError, match="names a version"):
        client.classify([b"x"], model="car-damage@2", version="3")


async def test_tls_and_bearer_tokens(
    registry_dir: Path, tmp_path: Path, photos: dict[str, Path]
) -> None:
    # The certificates a deployment gets: its own CA, and a server certificate for localhost.
    generate(tmp_path / "secrets")
    tls = tmp_path / "secrets" / "server" / "tls"
    ca = tls / "ca.pem"
    with ServerThread.serving(
        registry_dir,
        tmp_path / "cache",
        tls_cert_file=tls / "server.pem",
        tls_key_file=tls / "server.key",
        auth_tokens=[TOKEN, "second-team-token"],
        health_port=0,
    ) as server:
        target = f"localhost:{server.port}"
        with perito.Client(target, root_certificates=ca, token=TOKEN) as client:
            [result] = client.classify([photos["coffee"]], model=LITE0)
            assert result.label == "espresso"
        async with perito.AsyncClient(target, root_certificates=str(ca), token=TOKEN) as aclient:
            assert [m.name for m in await aclient.list_models()] == ["car-damage", LITE0]
        for token in (None, "wrong-token"):
            with (
                perito.Client(target, root_certificates=ca, token=token) as client,
                pytest.raises(perito.UnauthenticatedError, match="bearer token"),
            ):
                client.list_models()
        with (
            perito.Client(target, token=TOKEN, timeout=2, max_retries=0) as client,
            pytest.raises(perito.UnavailableError),  # plaintext to a TLS port
        ):
            client.list_models()
        # Probes need no token.
        credentials = grpc.ssl_channel_credentials(ca.read_bytes())
        with grpc.secure_channel(target, credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # `perito health` takes TLS from the environment, as every command does.
        checked = run_perito(
            "health", "--server", target, env=subprocess_env(PERITO_TLS_CA=str(ca))
        )
        assert checked.stdout.strip() == f"{target}: SERVING"
        # Probes that cannot speak TLS use the plaintext health port, which serves nothing else.
        plain = f"127.0.0.1:{server.running.health_port}"  # type: ignore[attr-defined]
        with grpc.insecure_channel(plain) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with (
            perito.Client(plain, token=TOKEN, max_retries=0) as client,
            pytest.raises(perito.PeritoError, match="Method not found"),
        ):
            client.list_models()


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_images_the_client_cannot_send_are_named_and_skipped_like_the_servers(
    server: ServerThread, photos: dict[str, Path], tmp_path: Path, asynchronous: bool
) -> None:
    """A CMYK PIL image raised PIL's OSError, a float array numpy's TypeError, a missing
    file FileNotFoundError, an image larger than a request gRPC's RESOURCE_EXHAUSTED for the
    whole call: none named its image, and `on_invalid="skip"` lost the whole call."""
    from PIL import Image

    good = photos["coffee"]
    images: list[object] = [
        good,
        Image.open(good).resize((64, 48)).convert("CMYK"),  # sent as RGB, as read from a JPEG
        np.zeros((32, 32, 3), dtype=np.float32),
        tmp_path / "deleted.jpg",
        b"\xff" * 300_000,
        np.zeros((2, 32, 32, 3), dtype=np.uint8)[0],
    ]
    limits = perito.Limits(max_request_bytes=200_000)
    if asynchronous:
        async with perito.AsyncClient(server.target, timeout=60, limits=limits) as client:
            results = await client.classify(images, model="car-damage", on_invalid="skip")
            with pytest.raises(perito.InvalidArgumentError) as refused:
                await client.classify(images, model="car-damage")
    else:
        with perito.Client(server.target, timeout=60, limits=limits) as client:
            results = client.classify(images, model="car-damage", on_invalid="skip")
            with pytest.raises(perito.InvalidArgumentError) as refused:
                client.classify(images, model="car-damage")
    assert [r.error is None for r in results] == [True, True, False, False, False, True]
    assert [r.index for r in results if r.error] == [2, 3, 4]  # type: ignore[union-attr]
    said = {r.index: r.error.message for r in results if r.error}  # type: ignore[union-attr]
    assert said[2].startswith("images[2]: a numpy array of float32 [32, 32, 3]")
    assert said[3].startswith("images[3]: cannot read") and "deleted.jpg" in said[3]
    assert said[4].startswith("images[4]: 300,000 bytes, more than one request carries")
    assert refused.value.message.startswith("images[2]: ") and "(and 2 more)" in (
        refused.value.message
    )
    assert [v.field for v in refused.value.violations] == ["images[2]", "images[3]", "images[4]"]


def test_a_client_made_outside_any_loop_works_in_the_loop_that_uses_it(
    server: ServerThread,
) -> None:
    """An AsyncClient made at import (a web app's global) failed in every loop ("attached to
    a different loop"); a closed client raised grpc's own ValueError or UsageError."""
    import asyncio

    client = perito.AsyncClient(server.target, timeout=30)

    async def names() -> list[str]:
        return [m.name for m in await client.list_models()]

    assert asyncio.run(names()) == ["car-damage", LITE0]
    with pytest.raises(perito.FailedPreconditionError, match="one AsyncClient per event loop"):
        asyncio.run(names())

    async def closed() -> None:
        await client.close()
        await client.close()  # twice is harmless
        await client.list_models()

    with pytest.raises(perito.FailedPreconditionError, match="this client is closed"):
        asyncio.run(closed())
    sync = perito.Client(server.target, timeout=30)
    assert [m.name for m in sync.list_models()] == ["car-damage", LITE0]
    sync.close()
    with pytest.raises(perito.FailedPreconditionError, match="this client is closed"):
        sync.list_models()
