"""The SDK against a real server: sync and async clients alike, large requests split
client-side, TLS and bearer tokens."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import perito
from perito_core.models.registry import ModelRegistry
from perito_server.settings import ServerSettings
from tests.conftest import publish_lite0, publish_tiny
from tests.helpers import ServerThread

pytestmark = pytest.mark.integration

LITE0 = "imagenet-efficientnet-lite0"
TOKEN = "claims-team-token"


@pytest.fixture(scope="module")
def registry_dir(
    tmp_path_factory: pytest.TempPathFactory, lite0_dir: Path, tiny_model_file: Path
) -> Path:
    root = tmp_path_factory.mktemp("sdk-registry")
    registry = ModelRegistry.open(str(root), cache_dir=root / ".cache")
    publish_lite0(registry, lite0_dir, aliases=("production",))
    publish_tiny(registry, tiny_model_file, name="car-damage")
    return root


@pytest.fixture(scope="module")
def server(registry_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    settings = ServerSettings(
        port=0,
        registry=str(registry_dir),
        cache_dir=tmp_path_factory.mktemp("cache"),
        max_images_per_request=16,
    )
    with ServerThread(settings) as running:
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


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_tls_and_bearer_tokens(
    registry_dir: Path, tmp_path: Path, photos: dict[str, Path]
) -> None:
    cert, key = _self_signed(tmp_path)
    settings = ServerSettings(
        port=0,
        registry=str(registry_dir),
        cache_dir=tmp_path / "cache",
        tls_cert_file=cert,
        tls_key_file=key,
        auth_tokens=[TOKEN, "second-team-token"],
        health_port=0,
    )
    with ServerThread(settings) as server:
        target = f"localhost:{server.port}"
        with perito.Client(target, root_certificates=cert, token=TOKEN) as client:
            [result] = client.classify([photos["coffee"]], model=LITE0)
            assert result.label == "espresso"
        async with perito.AsyncClient(target, root_certificates=str(cert), token=TOKEN) as aclient:
            assert [m.name for m in await aclient.list_models()] == ["car-damage", LITE0]
        for token in (None, "wrong-token"):
            with (
                perito.Client(target, root_certificates=cert, token=token) as client,
                pytest.raises(perito.UnauthenticatedError, match="bearer token"),
            ):
                client.list_models()
        with (
            perito.Client(target, token=TOKEN, timeout=2, max_retries=0) as client,
            pytest.raises(perito.UnavailableError),  # plaintext to a TLS port
        ):
            client.list_models()
        # Probes need no token.
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(target, credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
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
