"""Registry names, versions, artifact file names and alias targets are checked when written
and again when read back from storage: a stored record never leads a reader out of its
version's folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from perito_core.errors import InvalidArgument, ModelLoadError
from perito_core.models.manifest import Artifact, FormFile
from perito_core.models.registry import ModelRegistry
from tests.conftest import publish_tiny


@pytest.fixture
def registry(tmp_path: Path, tiny_model_file: Path) -> ModelRegistry:
    registry = ModelRegistry.open(str(tmp_path / "registry"), cache_dir=tmp_path / "cache")
    publish_tiny(registry, tiny_model_file, aliases=("production",))
    return registry


def _root(registry: ModelRegistry) -> Path:
    return Path(registry.store.root)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["../tiny", "a/b", "..", "Tiny", "", "tiny\n"])
def test_bad_names_are_refused_when_written(
    registry: ModelRegistry, tiny_model_file: Path, name: str
) -> None:
    with pytest.raises(InvalidArgument):
        publish_tiny(registry, tiny_model_file, name=name)


@pytest.mark.parametrize("alias", ["../x", "a/b", "latest", "1", "x.json"])
def test_bad_aliases_are_refused_when_written_and_resolved(
    registry: ModelRegistry, alias: str
) -> None:
    with pytest.raises(InvalidArgument):
        registry.set_alias("tiny", alias, "1")
    if alias not in ("latest", "1"):  # the caller's mistake, named: never looked up
        with pytest.raises(InvalidArgument) as refused:
            registry.resolve("tiny", alias)
        assert refused.value.field == "version"


def test_a_name_or_alias_ending_in_a_newline_is_refused_when_written(
    registry: ModelRegistry,
) -> None:
    """A pattern's '$' also matches before a final newline: the whole name must match."""
    with pytest.raises(InvalidArgument):
        registry.set_alias("tiny", "staging\n", "1")


@pytest.mark.parametrize("file", ["../model.pt", "a/model.pt", ".hidden", "..", ""])
def test_artifact_file_names_are_plain(file: str) -> None:
    with pytest.raises(ValidationError):
        Artifact(file=file, sha256="0" * 64, size_bytes=1)


@pytest.mark.parametrize("file", ["../x", "ir/../../x", "ir/./x", "ir//x", "/x"])
def test_form_file_paths_stay_inside_the_form(file: str) -> None:
    with pytest.raises(ValidationError):
        FormFile(file=file, sha256="0" * 64, size_bytes=1)
    assert FormFile(file="ir/model.xml", sha256="0" * 64, size_bytes=1).file == "ir/model.xml"


def test_stored_alias_targets_are_checked_when_read(registry: ModelRegistry) -> None:
    aliases = _root(registry) / "models" / "tiny" / "aliases"
    (aliases / "evil.json").write_text(json.dumps({"version": "../../other/1"}))
    (aliases / "Bad-Name.json").write_text(json.dumps({"version": "1"}))
    assert registry.aliases("tiny") == {"production": "1"}
    with pytest.raises(ModelLoadError, match="valid version"):
        registry.resolve("tiny", "evil")


def test_stored_manifests_are_checked_when_read(registry: ModelRegistry) -> None:
    path = _root(registry) / "models" / "tiny" / "1" / "manifest.json"
    original = json.loads(path.read_text())
    path.write_text(json.dumps({**original, "artifact": {**original["artifact"], "file": "../x"}}))
    with pytest.raises(ModelLoadError, match="invalid"):
        registry.fetch("tiny", "1")
    path.write_text(json.dumps({**original, "name": "other"}))
    with pytest.raises(ModelLoadError, match="names 'other'"):
        registry.manifest("tiny", "1")
    path.write_text(json.dumps(original))
    with pytest.raises(InvalidArgument):
        registry.manifest("tiny", "../1")
    assert registry.fetch("tiny", "1").manifest.version == "1"
