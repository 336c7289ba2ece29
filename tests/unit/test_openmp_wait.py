"""OpenMP's idle threads sleep instead of spinning in every process that imports perito_core
before torch (`perito serve`, `perito worker`, the benchmarks), and an operator's own setting
is kept. libgomp prints the settings it started with when OMP_DISPLAY_ENV is set."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def openmp_settings(code: str, **env: str) -> dict[str, str]:
    """The OpenMP settings libgomp reports in a fresh interpreter that runs `code`."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dict(re.findall(r"^\s+(\w+) = '([^']*)'", result.stderr, re.MULTILINE))


def test_threads_do_not_spin_once_perito_core_is_imported_first() -> None:
    bare = openmp_settings("import torch; torch.ones(64).sum()")
    served = openmp_settings("import perito_core, torch; torch.ones(64).sum()")
    if "GOMP_SPINCOUNT" not in bare:
        pytest.skip("torch here is not built with GNU OpenMP")
    assert bare["GOMP_SPINCOUNT"] != "0"  # what torch alone does: spin at every barrier
    assert served["GOMP_SPINCOUNT"] == "0"


def test_an_operators_wait_policy_is_kept() -> None:
    settings = openmp_settings("import perito_core, torch", OMP_WAIT_POLICY="ACTIVE")
    if "GOMP_SPINCOUNT" not in settings:
        pytest.skip("torch here is not built with GNU OpenMP")
    assert settings["OMP_WAIT_POLICY"] == "ACTIVE"
    assert settings["GOMP_SPINCOUNT"] != "0"
