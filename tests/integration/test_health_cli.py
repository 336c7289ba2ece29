"""`perito health`: the container health check, in the SDK's CLI (no server extras needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import ServerThread, run_perito, subprocess_env
from tests.processes import free_port

pytestmark = pytest.mark.integration


def test_health_says_serving_and_exits_0_else_1(tmp_path: Path) -> None:
    with ServerThread.serving(tmp_path / "registry", tmp_path / "cache") as server:
        up = run_perito("health", "--server", server.target, env=subprocess_env())
    assert up.stdout.strip() == f"{server.target}: SERVING"
    nobody = f"127.0.0.1:{free_port()}"
    down = run_perito(
        "health", "--server", nobody, "--timeout", "1", env=subprocess_env(), check=False
    )
    assert down.returncode != 0
    assert "UNAVAILABLE" in down.stderr or "DEADLINE_EXCEEDED" in down.stderr
