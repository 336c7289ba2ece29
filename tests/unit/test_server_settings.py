"""The server's settings as an operator gives them."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from perito_core.cli_options import load_settings
from perito_server.settings import ServerSettings


def test_a_relative_results_folder_is_made_absolute_so_jobs_without_an_output_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job given no output is written under `results_uri`, and a job's output must be an
    absolute path: the default `./var/results` (or a relative PERITO_RESULTS_URI) is resolved
    against the server's working directory; an object-store URI is kept as given."""
    monkeypatch.chdir(tmp_path)
    assert ServerSettings().results_uri == str(tmp_path / "var" / "results")
    monkeypatch.setenv("PERITO_RESULTS_URI", "out/jobs")
    assert ServerSettings().results_uri == str(tmp_path / "out" / "jobs")
    monkeypatch.setenv("PERITO_RESULTS_URI", "s3://results/jobs")
    assert ServerSettings().results_uri == "s3://results/jobs"


@pytest.mark.parametrize(
    ("value", "folders"),
    [
        ("/data/claims", ["/data/claims"]),
        ("/data/claims:/data/inspections", ["/data/claims", "/data/inspections"]),
        ('["/data/claims", "/data/with:colon"]', ["/data/claims", "/data/with:colon"]),
        ("", []),
    ],
)
def test_local_roots_are_read_as_path_spells_folders_or_as_a_json_list(
    value: str, folders: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PERITO_LOCAL_ROOTS=/data/claims (one folder, as an operator first writes it) used to
    stop `perito serve` with a pydantic traceback: it wanted a JSON list."""
    monkeypatch.setenv("PERITO_LOCAL_ROOTS", value)
    assert ServerSettings().local_roots == [Path(f) for f in folders]


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("PERITO_DECODE_THREADS", "-1", "PERITO_DECODE_THREADS: Input should be greater than"),
        ("PERITO_PRECISION", "fast", "PERITO_PRECISION: Input should be 'auto', 'fp32'"),
        ("PERITO_LOCAL_ROOTS", '["/data', "PERITO_LOCAL_ROOTS: Value error, Unterminated string"),
        ("PERITO_AUTH_TOKENS", "s3cret-token", "PERITO_AUTH_TOKENS: not valid JSON"),
        ("PERITO_S3_SECRET_ACCESS_KEY", "", ""),  # empty is allowed: no error
    ],
)
def test_a_setting_that_is_not_valid_is_one_line_naming_its_variable_never_its_value(
    variable: str, value: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `perito serve` and `perito worker` print for a bad PERITO_* value: the variable
    and pydantic's reason on one line, not a traceback, and not the value (a token)."""
    monkeypatch.setenv(variable, value)
    if not expected:
        load_settings(ServerSettings)
        return
    with pytest.raises(click.ClickException) as raised:
        load_settings(ServerSettings, registry="/tmp/registry", port=None)
    message = raised.value.message
    assert message.startswith(expected), message
    assert "\n" not in message
    assert value not in message


def test_flags_given_win_over_the_environment_and_unset_flags_do_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PERITO_DECODE_THREADS", "3")
    assert load_settings(ServerSettings, decode_threads=None).decode_threads == 3
    assert load_settings(ServerSettings, decode_threads=1).decode_threads == 1
    assert load_settings(ServerSettings, local_roots=()).local_roots == []
