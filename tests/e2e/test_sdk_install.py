"""`pip install perito` with no extras, in a clean virtual environment: the SDK and the client
commands work, and neither torch nor celery is installed or imported."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from perito_core.models.registry import ModelRegistry
from tests.conftest import publish_lite0
from tests.helpers import ROOT, ServerThread

pytestmark = pytest.mark.e2e

LITE0 = "imagenet-efficientnet-lite0"


def run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs
    )  # type: ignore[call-overload]
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with the wheel built from this checkout installed, base dependencies only."""
    work = tmp_path_factory.mktemp("sdk-install")
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--quiet",
        "-w",
        work / "dist",
        ROOT,
    )
    [wheel] = (work / "dist").glob("perito-*.whl")
    run(sys.executable, "-m", "venv", work / "venv")
    python = work / "venv" / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "-c", ROOT / "constraints.txt", wheel)
    return work / "venv" / "bin"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, lite0_dir: Path) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("install-registry")
    registry = ModelRegistry.open(str(root / "registry"), cache_dir=root / "cache")
    publish_lite0(registry, lite0_dir)
    with ServerThread.serving(root / "registry", root / "c2") as running:
        yield running


def test_the_sdk_installs_without_torch_or_celery(clean_venv: Path) -> None:
    probe = run(
        clean_venv / "python",
        "-c",
        "import importlib.util, json, sys, perito; "
        "print(json.dumps({"
        "'version': perito.__version__, "
        "'installed': {m: importlib.util.find_spec(m) is not None "
        "for m in ('torch', 'celery', 'numpy', 'boto3', 'pydantic', 'grpc_status')}, "
        "'imported': sorted(m for m in sys.modules if m.startswith(('perito_', 'torch'))), "
        "'typed': (importlib.util.find_spec('perito').submodule_search_locations[0] + '/py.typed'),"
        "'async': hasattr(perito, 'AsyncClient')}))",
    )
    found = json.loads(probe.stdout)
    assert found["installed"] == {
        "torch": False,
        "celery": False,
        "numpy": False,
        "boto3": False,
        "pydantic": False,  # the SDK never imported it
        "grpc_status": False,
    }
    assert found["imported"] == []  # the SDK imports no server-side package
    assert Path(found["typed"]).exists() and found["async"]
    help_text = run(clean_venv / "perito", "--help").stdout
    for command in ("classify", "submit", "job", "models"):
        assert command in help_text
    for server_side in ("serve", "worker", "train", "web"):
        assert f"  {server_side} " not in help_text


def test_the_installed_sdk_classifies_against_a_real_server(
    clean_venv: Path, server: ServerThread, photos: dict[str, Path]
) -> None:
    result = run(
        clean_venv / "perito",
        "classify",
        photos["coffee"],
        "--model",
        LITE0,
        "--json",
        "--server",
        server.target,
    )
    [answer] = json.loads(result.stdout)
    assert answer["predictions"][0]["label"] == "espresso"
    script = (
        "import asyncio, perito\n"
        "async def main():\n"
        f"    async with perito.AsyncClient({server.target!r}) as client:\n"
        f"        [r] = await client.classify([{str(photos['coffee'])!r}], model={LITE0!r})\n"
        "        print(r.label)\n"
        "asyncio.run(main())\n"
    )
    assert run(clean_venv / "python", "-c", script).stdout.strip() == "espresso"
