"""The options several `perito` commands share (`perito_core.cli_options`), as each command
parses them."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from perito_core.cli_options import forms_option
from perito_server.cli import import_model
from perito_training.cli import publish


@forms_option("test images")
@click.command()
def show_forms(forms: tuple[str, ...]) -> None:
    click.echo(repr(forms))


@pytest.mark.parametrize(
    ("given", "parsed"),
    [("", "()"), ("int8", "('int8',)"), (" fp32, int8 ,bf16,", "('fp32', 'int8', 'bf16')")],
)
def test_forms_are_a_tuple_of_precisions(given: str, parsed: str) -> None:
    result = CliRunner().invoke(show_forms, ["--forms", given])
    assert result.exit_code == 0 and result.output.strip() == parsed


@pytest.mark.parametrize("command", [publish, import_model], ids=["publish", "models import"])
def test_an_unknown_form_is_refused_naming_the_option_and_the_known_ones(
    command: click.Command, tmp_path: Path
) -> None:
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / "labels.txt").write_text("a\nb\n")
    arguments = {
        "publish": [str(tmp_path)],
        "import": [
            str(tmp_path / "model.pt"),
            "--name",
            "m",
            "--labels",
            str(tmp_path / "labels.txt"),
        ],
    }
    result = CliRunner().invoke(command, [*arguments[command.name or ""], "--forms", "fp32,fp16"])
    assert result.exit_code == 2
    assert "Invalid value for '--forms': fp16: forms are fp32, bf16, int8" in result.output
