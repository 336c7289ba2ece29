"""The commands that read and change the registry themselves (`perito models alias`,
`shadow`, `drift`), as a user meets them: exit codes as the server-backed commands have them
(3 not found, 2 a value out of range), the registry read named when a model is not there, and
an alias never moved to a version whose file is damaged (the servers would keep the old
version answering while the alias said otherwise)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import publish_tiny, tiny_registry

pytestmark = pytest.mark.integration


@pytest.fixture
def registry(tmp_path: Path, tiny_model_file: Path) -> Path:
    from perito_core.models.registry import ModelRegistry

    root = tiny_registry(tmp_path / "registry", tiny_model_file, aliases=("production",))
    publish_tiny(ModelRegistry.open(str(root), cache_dir=tmp_path / "publish"), tiny_model_file)
    return root


def _perito(registry: Path, *args: str) -> tuple[int, str]:
    from perito._cli import cli

    result = CliRunner().invoke(cli, list(args), env={"PERITO_REGISTRY": str(registry)})
    return result.exit_code, result.output


def test_not_found_is_exit_3_naming_the_registry_read(registry: Path) -> None:
    for args in (
        ("models", "alias", "nosuch", "production", "1"),
        ("models", "alias", "tiny", "production", "9"),
        ("models", "shadow", "tiny", "2", "--of", "nosuch"),
        ("models", "drift", "nosuch"),
    ):
        code, output = _perito(registry, *args)
        assert code == 3, (args, output)
        assert f"in the registry at {registry}" in output, output
        assert "--registry or PERITO_REGISTRY" in output


@pytest.mark.parametrize(
    "args",
    [
        ("models", "alias", "tiny", "production", "2", "--canary", "150"),
        ("models", "alias", "tiny", "production", "2", "--canary", "0"),
        ("models", "alias", "tiny", "production", "2", "--canary", "nan"),
        ("models", "shadow", "tiny", "2", "--of", "production", "--sample", "1.5"),
        ("models", "shadow", "tiny", "2", "--of", "production", "--sample", "0"),
    ],
)
def test_a_value_out_of_range_is_a_usage_error(registry: Path, args: tuple[str, ...]) -> None:
    code, output = _perito(registry, *args)
    assert code == 2, output
    assert "give a number above 0" in output


def test_an_alias_is_not_moved_to_a_version_whose_file_is_damaged(registry: Path) -> None:
    model_file = registry / "models" / "tiny" / "2" / "model.pt"
    damaged = bytearray(model_file.read_bytes())
    damaged[-200:-193] = bytes(byte ^ 0xFF for byte in damaged[-200:-193])
    model_file.write_bytes(bytes(damaged))
    for args in (
        ("models", "alias", "tiny", "production", "2"),
        ("models", "alias", "tiny", "production", "latest"),
        ("models", "alias", "tiny", "production", "2", "--canary", "50"),
    ):
        code, output = _perito(registry, *args)
        assert code == 1, (args, output)
        assert "sha256" in output, output
    code, output = _perito(registry, "models", "alias", "tiny", "staging", "1")
    assert code == 0 and "tiny@staging -> 1" in output
    from perito_core.models.registry import ModelRegistry

    opened = ModelRegistry.open(str(registry), cache_dir=registry.parent / "check")
    assert opened.aliases("tiny")["production"] == "1"


def test_moving_an_alias_says_the_shadow_it_keeps(registry: Path) -> None:
    code, output = _perito(registry, "models", "shadow", "tiny", "2", "--of", "production")
    assert code == 0, output
    code, output = _perito(registry, "models", "alias", "tiny", "production", "1")
    assert code == 0
    assert output.strip() == "tiny@production -> 1, shadow 2 on 100% of requests"


def test_moving_an_alias_says_the_shadow_and_canary_it_ends(registry: Path) -> None:
    code, output = _perito(registry, "models", "shadow", "tiny", "2", "--of", "production")
    assert code == 0, output
    code, output = _perito(registry, "models", "alias", "tiny", "production", "2")
    assert code == 0, output
    assert output.splitlines() == [
        "tiny@production -> 2",
        "shadow 2 ended: the alias serves that version now",
    ]
    code, output = _perito(registry, "models", "alias", "tiny", "production", "1", "--canary", "5")
    assert code == 0, output
    code, output = _perito(registry, "models", "alias", "tiny", "production", "2")
    assert code == 0, output
    assert output.splitlines() == [
        "tiny@production -> 2",
        "canary 1 at 5% ended: a move ends the alias's canary",
    ]
