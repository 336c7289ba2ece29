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


def test_a_command_with_no_server_at_its_address_says_where_the_address_comes_from() -> None:
    """`perito job results JOB` right after `perito submit`, with no PERITO_SERVER: gRPC's
    "failed to connect to all addresses" alone does not tell a user what to change."""
    nobody = f"127.0.0.1:{free_port()}"
    down = run_perito(
        "job", "results", "0123456789abcdef", "--timeout", "5",
        env=subprocess_env(PERITO_SERVER=nobody), check=False,
    )  # fmt: skip
    assert down.returncode == 5  # unavailable: worth retrying
    assert nobody in down.stderr
    assert "--server HOST:PORT or PERITO_SERVER" in down.stderr
