"""What a person sees from a one-shot command is its answer and nothing else: no audit record
as a JSON line, no error about a Redis nobody configured, no library warnings (torch's
TorchScript deprecation and CUDA probe, which building compiled forms set off)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TINY_INPUT, free_port, run_perito, subprocess_env, write_pattern_images

pytestmark = pytest.mark.e2e

# What a line for people never holds: an audit record's JSON, a log level or warning class,
# a traceback, the Redis no one asked for, torch's CUDA probe.
NOISE = ('"audit"', "ERROR", "Warning", "Traceback", "Redis", "CUDA")


def noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(word in line for word in NOISE)]


def test_an_import_with_forms_into_a_folder_without_redis_prints_only_its_answer(
    tmp_path: Path, tiny_model_file: Path
) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("minor\nmoderate\nsevere\n")
    calibration = write_pattern_images(
        tmp_path / "calibration",
        per_class=6,
        suffixes={"minor": "a", "moderate": "b", "severe": "c"},
    )
    env = subprocess_env(
        PERITO_REGISTRY=str(tmp_path / "registry"), PERITO_CACHE_DIR=str(tmp_path / "cache")
    )
    env.pop("PERITO_REDIS_URL", None)  # no Redis configured, and none on the default port
    size = str(TINY_INPUT.height)
    imported = run_perito(
        "models", "import", str(tiny_model_file), "--name", "tiny", "--labels", str(labels),
        "--input-size", size, "--resize-size", size, "--resize-mode", "squash",
        "--forms", "fp32,int8", "--calibration", str(calibration), "--alias", "production",
        env=env,
    )  # fmt: skip
    assert "published tiny@1" in imported.stdout and "(aliases: production)" in imported.stdout
    assert "openvino-fp32: top-1 agreement" in imported.stdout  # the forms were built
    assert noise(imported.stdout) == [] and noise(imported.stderr) == [], imported.stderr

    moved = run_perito("models", "alias", "tiny", "staging", "1", env=env)
    assert moved.stdout == "tiny@staging -> 1\n" and moved.stderr == ""


def test_a_configured_redis_that_is_down_is_said_once_in_plain_words(
    tmp_path: Path, tiny_model_file: Path
) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("minor\nmoderate\nsevere\n")
    size = str(TINY_INPUT.height)
    env = subprocess_env(
        PERITO_REGISTRY=str(tmp_path / "registry"),
        PERITO_CACHE_DIR=str(tmp_path / "cache"),
        PERITO_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
    )
    imported = run_perito(
        "models", "import", str(tiny_model_file), "--name", "tiny", "--labels", str(labels),
        "--input-size", size, "--resize-size", size, "--resize-mode", "squash", env=env,
    )  # fmt: skip
    assert imported.stdout == f"published tiny@1 to {tmp_path / 'registry'}\n"
    [said] = imported.stderr.splitlines()
    assert said.startswith("note: the audit log (PERITO_REDIS_URL) did not get a record")
    assert "ERROR" not in said and '"audit"' not in said
