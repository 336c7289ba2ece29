"""The server's settings as an operator gives them."""

from __future__ import annotations

from pathlib import Path

import pytest

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
