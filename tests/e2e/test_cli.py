"""The `perito` CLI against `perito serve` running as its own process."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from perito_core.models.registry import ModelRegistry
from tests.helpers import (
    ROOT,
    free_port,
    perito_proc,
    run_perito,
    subprocess_env,
    wait_for_port,
)

pytestmark = pytest.mark.e2e

LITE0 = "imagenet-efficientnet-lite0"


perito = run_perito


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, lite0_dir: Path) -> Iterator[dict[str, str]]:
    """A registry with Lite0 imported through the CLI, and `perito serve` running on it."""
    work = tmp_path_factory.mktemp("cli")
    port = free_port()
    environment = subprocess_env(
        PERITO_REGISTRY=str(work / "registry"),
        PERITO_CACHE_DIR=str(work / "cache"),
        PERITO_SERVER=f"127.0.0.1:{port}",
    )
    imported = perito(
        "models",
        "import",
        str(lite0_dir / "model.pt"),
        "--labels",
        str(lite0_dir / "labels.txt"),
        "--name",
        LITE0,
        "--resize-size",
        "256",
        "--interpolation",
        "bicubic",
        "--alias",
        "production",
        "--confidence-threshold",
        "0.5",
        env=environment,
    )
    assert f"published {LITE0}@1" in imported.stdout
    server = perito_proc(
        "perito serve", ["serve", "--port", str(port)], environment, work / "serve.log", ""
    ).launch()
    wait_for_port(port, timeout=120, process=server)
    environment["SERVE_LOG"] = str(work / "serve.log")
    yield environment
    assert server.stop() == 0, "perito serve did not exit cleanly on SIGTERM"
    assert "perito: stopped" in (work / "serve.log").read_text()


def test_classify_prints_top_k_for_people_and_json_for_scripts(
    env: dict[str, str], photos: dict[str, Path]
) -> None:
    readable = perito("classify", str(photos["coffee"]), "--model", LITE0, "--top-k", "2", env=env)
    assert "1. espresso" in readable.stdout and "2. " in readable.stdout
    parsed = json.loads(
        perito(
            "classify",
            str(photos["coffee"]),
            str(photos["chelsea"]),
            "--model",
            f"{LITE0}@production",
            "--json",
            env=env,
        ).stdout
    )
    assert [r["image_id"] for r in parsed] == [str(photos["coffee"]), str(photos["chelsea"])]
    assert parsed[0]["predictions"][0]["label"] == "espresso"
    assert len(parsed[0]["predictions"]) == 3
    # The model's recommended threshold (0.5, from import) applies when none is given.
    assert parsed[0]["uncertain"] is False and parsed[1]["uncertain"] is True


def test_models_list_and_show(env: dict[str, str]) -> None:
    listed = json.loads(perito("models", "list", "--json", env=env).stdout)
    assert [m["name"] for m in listed] == [LITE0]
    assert listed[0]["aliases"] == {"production": "1"}
    shown = json.loads(perito("models", "show", LITE0, "--json", env=env).stdout)
    card = shown["versions"][0]["card"]
    assert card["confidence_threshold"] == 0.5
    assert card["input"]["height"] == 224
    assert "v1 [production]" in perito("models", "show", LITE0, env=env).stdout


def test_exit_codes_tell_scripts_what_went_wrong(
    env: dict[str, str], photos: dict[str, Path], tmp_path: Path
) -> None:
    missing = perito(
        "classify", str(photos["coffee"]), "--model", "car-damage", env=env, check=False
    )
    assert missing.returncode == 3
    assert "model 'car-damage' not found" in missing.stderr
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photos["coffee"].read_bytes()[:500])
    bad = perito("classify", str(broken), "--model", LITE0, env=env, check=False)
    assert bad.returncode == 4
    assert "images[0]" in bad.stderr and "damaged" in bad.stderr
    # With --skip-invalid the good photo is answered beside the refused one, still exit 4.
    both = (str(photos["coffee"]), str(broken))
    skipped = perito("classify", *both, "--model", LITE0, "--skip-invalid", env=env, check=False)
    assert skipped.returncode == 4, skipped.stderr
    assert "1. espresso" in skipped.stdout
    assert f"{broken}  rejected: images[1]" in skipped.stdout and "damaged" in skipped.stdout
    rows = json.loads(
        perito(
            "classify", *both, "--model", LITE0, "--skip-invalid", "--json", env=env, check=False
        ).stdout
    )
    assert rows[0]["predictions"][0]["label"] == "espresso"
    assert rows[1]["index"] == 1 and rows[1]["error"]["message"].startswith("images[1]")
    down = perito(
        "classify",
        str(photos["coffee"]),
        "--model",
        LITE0,
        "--timeout",
        "2",
        env={**env, "PERITO_SERVER": f"127.0.0.1:{free_port()}"},
        check=False,
    )
    assert down.returncode == 5
    assert "Traceback" not in down.stderr


def test_import_refuses_a_file_that_breaks_the_contract(
    env: dict[str, str], lite0_dir: Path, tmp_path: Path
) -> None:
    too_few = tmp_path / "labels.txt"
    too_few.write_text("cat\ndog\n")
    result = perito(
        "models",
        "import",
        str(lite0_dir / "model.pt"),
        "--labels",
        str(too_few),
        "--name",
        "wrong-labels",
        env=env,
        check=False,
    )
    assert result.returncode != 0
    assert "2 labels" in result.stderr and "Traceback" not in result.stderr
    registry = ModelRegistry.open(env["PERITO_REGISTRY"], cache_dir=tmp_path)
    assert "wrong-labels" not in registry.list_models()


def test_alias_moves_through_the_cli(env: dict[str, str]) -> None:
    result = perito("models", "alias", LITE0, "staging", "production", env=env)
    assert result.stdout.strip() == f"{LITE0}@staging -> 1"


def test_the_demo_runs_start_to_finish(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(ROOT / ".venv/bin/python"), str(ROOT / "scripts/demo.py"), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=subprocess_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1. espresso" in result.stdout
    assert "demo finished: every process stopped, the server cleanly" in result.stdout
    assert (
        "succeeded  imagenet-efficientnet-lite0@1  60/60 done: 60 succeeded, 0 failed"
        in result.stdout
    )
    assert "espresso" in result.stdout.split("a bulk job")[1]
