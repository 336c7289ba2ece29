"""The model registry on a local folder: versions, aliases, verification, the cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from perito_core.errors import ArtifactIntegrityError, InvalidArgument, NotFound
from perito_core.models.registry import ModelRegistry
from tests.conftest import publish_tiny


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry.open(str(tmp_path / "registry"), cache_dir=tmp_path / "cache")


def test_versions_count_up_and_latest_is_the_highest(
    registry: ModelRegistry, tiny_model_file: Path
) -> None:
    assert [publish_tiny(registry, tiny_model_file) for _ in range(3)] == ["1", "2", "3"]
    assert registry.list_versions("tiny") == ["1", "2", "3"]
    assert registry.resolve("tiny") == "3"
    assert registry.resolve("tiny", "latest") == "3"
    assert registry.resolve("tiny", "2") == "2"
    assert registry.list_models() == ["tiny"]


def test_aliases_point_at_versions_and_move(registry: ModelRegistry, tiny_model_file: Path) -> None:
    publish_tiny(registry, tiny_model_file, aliases=("production",))
    publish_tiny(registry, tiny_model_file, aliases=("staging",))
    assert registry.aliases("tiny") == {"production": "1", "staging": "2"}
    registry.set_alias("tiny", "production", "staging")
    assert registry.resolve("tiny", "production") == "2"
    registry.delete_alias("tiny", "staging")
    with pytest.raises(NotFound, match="no alias 'staging'"):
        registry.resolve("tiny", "staging")


def test_manifest_records_the_contract_and_checksum(
    registry: ModelRegistry, tiny_model_file: Path
) -> None:
    publish_tiny(registry, tiny_model_file, metrics={"accuracy": 0.9})
    manifest = registry.manifest("tiny", "1")
    assert manifest.labels == ["minor", "moderate", "severe"]
    assert manifest.input.height == 32
    assert len(manifest.artifact.sha256) == 64
    assert manifest.card().metrics.model_dump(mode="json") == {"accuracy": 0.9}


@pytest.mark.parametrize(
    ("name", "ref", "message"),
    [
        ("nope", "", "model 'nope' not found"),
        ("tiny", "7", "no version 7"),
        ("tiny", "prod", "no alias 'prod'"),
    ],
)
def test_unknown_models_versions_and_aliases_are_not_found(
    registry: ModelRegistry, tiny_model_file: Path, name: str, ref: str, message: str
) -> None:
    publish_tiny(registry, tiny_model_file)
    with pytest.raises(NotFound, match=message):
        registry.resolve(name, ref)


@pytest.mark.parametrize(
    "ref", ["../1", "1.0", "@1", "-1", "1\x00", "manifest.json", "\u0661", "Prod"]
)
def test_a_version_that_can_be_neither_a_number_nor_an_alias_is_invalid_not_missing(
    registry: ModelRegistry, tiny_model_file: Path, ref: str
) -> None:
    """`tiny@../1` was NOT_FOUND "has no alias": the caller's mistake is named instead."""
    publish_tiny(registry, tiny_model_file)
    with pytest.raises(InvalidArgument) as refused:
        registry.resolve("tiny", ref)
    assert refused.value.field == "version"


@pytest.mark.parametrize("name", ["", "Car Damage", "../etc", "x" * 64])
def test_invalid_names_are_refused(registry: ModelRegistry, name: str) -> None:
    with pytest.raises(InvalidArgument):
        registry.resolve(name)


@pytest.mark.parametrize("alias", ["latest", "3", "Prod"])
def test_reserved_or_malformed_aliases_are_refused(
    registry: ModelRegistry, tiny_model_file: Path, alias: str
) -> None:
    publish_tiny(registry, tiny_model_file)
    with pytest.raises(InvalidArgument):
        registry.set_alias("tiny", alias, "1")


def test_fetch_verifies_and_caches(registry: ModelRegistry, tiny_model_file: Path) -> None:
    publish_tiny(registry, tiny_model_file)
    first = registry.fetch("tiny", "1")
    assert first.path.read_bytes() == tiny_model_file.read_bytes()
    stored = Path(registry.store.description) / "models/tiny/1/model.pt"
    stored.unlink()  # the verified cache copy is still served
    assert registry.fetch("tiny", "1").path == first.path


def test_a_tampered_artifact_is_refused(registry: ModelRegistry, tiny_model_file: Path) -> None:
    publish_tiny(registry, tiny_model_file)
    stored = Path(registry.store.description) / "models/tiny/1/model.pt"
    stored.write_bytes(stored.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ArtifactIntegrityError, match="does not match"):
        registry.fetch("tiny", "1")
    assert not (registry.cache_dir / "tiny" / "1" / "model.pt").exists()


def test_a_tampered_cache_copy_is_fetched_again(
    registry: ModelRegistry, tiny_model_file: Path
) -> None:
    publish_tiny(registry, tiny_model_file)
    cached = registry.fetch("tiny", "1").path
    cached.write_bytes(b"garbage")
    assert registry.fetch("tiny", "1").path.read_bytes() == tiny_model_file.read_bytes()


def test_deleted_versions_stop_resolving(registry: ModelRegistry, tiny_model_file: Path) -> None:
    publish_tiny(registry, tiny_model_file)
    publish_tiny(registry, tiny_model_file)
    registry.delete_version("tiny", "2")
    assert registry.list_versions("tiny") == ["1"]
    assert registry.resolve("tiny") == "1"
    assert publish_tiny(registry, tiny_model_file) == "2"


def test_a_version_without_a_manifest_is_not_published(
    registry: ModelRegistry, tiny_model_file: Path
) -> None:
    # A publisher that died after the model file and before the manifest.
    registry.store.upload_file("models/tiny/1/model.pt", tiny_model_file)
    assert registry.list_versions("tiny") == []
    assert publish_tiny(registry, tiny_model_file) == "1"
