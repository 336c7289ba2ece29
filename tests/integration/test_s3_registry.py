"""The registry over the S3 protocol (boto3 -> a local S3-compatible HTTP server), end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

import perito
from perito_core.errors import StorageUnavailable
from perito_core.models.registry import ModelRegistry
from perito_core.storage import S3Options
from perito_server.settings import ServerSettings
from tests.conftest import publish_lite0, publish_tiny
from tests.helpers import ServerThread, free_port

pytestmark = pytest.mark.integration

LITE0 = "imagenet-efficientnet-lite0"


def open_s3_registry(endpoint: str, cache: Path) -> ModelRegistry:
    return ModelRegistry.open(
        "s3://models/perito", cache_dir=cache, s3=S3Options(endpoint_url=endpoint)
    )


def test_s3_registry_publishes_resolves_and_verifies(
    s3_endpoint: str, tmp_path: Path, tiny_model_file: Path
) -> None:
    registry = open_s3_registry(s3_endpoint, tmp_path)
    assert publish_tiny(registry, tiny_model_file, name="s3-tiny", aliases=("staging",)) == "1"
    assert publish_tiny(registry, tiny_model_file, name="s3-tiny") == "2"
    assert registry.list_versions("s3-tiny") == ["1", "2"]
    assert registry.resolve("s3-tiny", "staging") == "1"
    assert "s3-tiny" in registry.list_models()
    fetched = registry.fetch("s3-tiny", "2")
    assert fetched.path.read_bytes() == tiny_model_file.read_bytes()
    # The objects really are in the bucket, under the documented layout.
    keys = {
        o["Key"]
        for o in registry.store.client.list_objects_v2(  # type: ignore[attr-defined]
            Bucket="models", Prefix="perito/models/s3-tiny/"
        )["Contents"]
    }
    assert {
        "perito/models/s3-tiny/1/model.pt",
        "perito/models/s3-tiny/1/manifest.json",
        "perito/models/s3-tiny/aliases/staging.json",
    } <= keys


def test_classify_serves_a_model_from_s3(
    s3_endpoint: str, tmp_path: Path, lite0_dir: Path, photos: dict[str, Path]
) -> None:
    publish_lite0(open_s3_registry(s3_endpoint, tmp_path / "publish"), lite0_dir)
    settings = ServerSettings(
        port=0,
        registry="s3://models/perito",
        s3_endpoint_url=s3_endpoint,
        cache_dir=tmp_path / "server-cache",
    )
    with ServerThread(settings) as server, perito.Client(server.target, timeout=120) as client:
        coffee, rocket = client.classify([photos["coffee"], photos["rocket"]], model=LITE0)
        assert coffee.label == "espresso"
        assert rocket.label in {"missile", "projectile, missile"}
        assert LITE0 in {m.name for m in client.list_models()}


def test_unreachable_storage_is_unavailable(tmp_path: Path, photos: dict[str, Path]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageUnavailable, match="unreachable"):
        open_s3_registry(dead, tmp_path).resolve("anything")
    settings = ServerSettings(
        port=0, registry="s3://models/perito", s3_endpoint_url=dead, cache_dir=tmp_path
    )
    with ServerThread(settings) as server, perito.Client(server.target, max_retries=1) as client:
        with pytest.raises(perito.UnavailableError, match="unreachable") as caught:
            client.classify([photos["coffee"]], model=LITE0)
        assert caught.value.reason == "STORAGE_UNAVAILABLE"


def test_a_missing_bucket_says_so(s3_endpoint: str, tmp_path: Path) -> None:
    registry = ModelRegistry.open(
        "s3://no-such-bucket/x", cache_dir=tmp_path, s3=S3Options(endpoint_url=s3_endpoint)
    )
    with pytest.raises(StorageUnavailable, match="bucket 'no-such-bucket' does not exist"):
        registry.list_models()
