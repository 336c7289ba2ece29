"""`perito health`: the container health check, in the SDK's CLI (no server extras needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scripts.processes import free_port
from tests.helpers import ServerThread

pytestmark = pytest.mark.integration

PERITO = [sys.executable, "-m", "perito._cli"]


def test_health_says_serving_and_exits_0_else_1(tmp_path: Path) -> None:
    with ServerThread.serving(tmp_path / "registry", tmp_path / "cache") as server:
        up = subprocess.run(
            [*PERITO, "health", "--server", server.target], capture_output=True, text=True
        )
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == f"{server.target}: SERVING"
    nobody = f"127.0.0.1:{free_port()}"
    down = subprocess.run(
        [*PERITO, "health", "--server", nobody, "--timeout", "1"], capture_output=True, text=True
    )
    assert down.returncode != 0
    assert "UNAVAILABLE" in down.stderr or "DEADLINE_EXCEEDED" in down.stderr
