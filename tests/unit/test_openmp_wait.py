"""OpenMP's idle threads spin only briefly before they sleep in every process that imports
perito_core before torch (`perito serve`, `perito worker`, the benchmarks), and an operator's
own setting is kept. libgomp prints the settings it started with when OMP_DISPLAY_ENV is set."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

OPENMP_WAIT = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def openmp_settings(code: str, **env: str) -> dict[str, str]:
    """The OpenMP settings libgomp reports in a fresh interpreter that runs `code`."""
    clean = {k: v for k, v in os.environ.items() if k not in OPENMP_WAIT}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    settings = dict(re.findall(r"^\s+(\w+) = '([^']*)'", result.stderr, re.MULTILINE))
    if "GOMP_SPINCOUNT" not in settings:
        pytest.skip("torch here is not built with GNU OpenMP")
    return settings


def test_threads_spin_briefly_once_perito_core_is_imported_first() -> None:
    bare = int(openmp_settings("import torch")["GOMP_SPINCOUNT"])
    served = int(openmp_settings("import perito_core, torch")["GOMP_SPINCOUNT"])
    assert 0 < served <= bare // 10  # still spins between regions, sleeps long before bare


@pytest.mark.parametrize(
    ("env", "reported"),
    [
        ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}),
        ({"GOMP_SPINCOUNT": "500000"}, {"GOMP_SPINCOUNT": "500000"}),
    ],
)
def test_an_operators_setting_is_kept(env: dict[str, str], reported: dict[str, str]) -> None:
    settings = openmp_settings("import perito_core, torch", **env)
    assert {key: settings[key] for key in reported} == reported
