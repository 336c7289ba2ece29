"""The fault suite's own checks (bench/faults.py) can fail: a duplicate in a results file, a
counter past the items settled, and a memory sample that cannot be taken are each seen."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from bench.faults import Sampler, _group_memory_mb, _running, duplicates_in_results


def _rows(*indices: int, state: str = "succeeded") -> list[dict[str, Any]]:
    return [{"index": i, "state": state} for i in indices]


def test_a_clean_results_file_has_no_duplicates() -> None:
    assert duplicates_in_results(_rows(0, 1, 2), done=3) == 0


def test_an_index_listed_twice_is_a_duplicate() -> None:
    assert duplicates_in_results(_rows(0, 1, 1, 2), done=3) == 1


def test_counters_past_the_items_settled_are_duplicates() -> None:
    assert duplicates_in_results(_rows(0, 1, 2), done=5) == 2
    # The same item, twice in the file and counted twice: one duplicate, not two.
    assert duplicates_in_results(_rows(0, 1, 1, 2), done=4) == 1


class _Stack:
    """Stands in for a running stack: its memory figures, or the error reading them raises."""

    def __init__(self, figures: tuple[float, float] | Exception) -> None:
        self.figures = figures

    def rss(self) -> tuple[float, float]:
        if isinstance(self.figures, Exception):
            raise self.figures
        return self.figures


@pytest.fixture
def sampler() -> Any:
    sampler = Sampler()
    yield sampler
    sampler.close()


def test_peaks_are_the_largest_samples(sampler: Sampler) -> None:
    stack = _Stack((120.0, 300.0))
    sampler.reset(stack)  # type: ignore[arg-type]
    sampler.sample()
    stack.figures = (150.0, 250.0)
    sampler.sample()
    assert (sampler.peak_server, sampler.peak_workers) == (150.0, 300.0)
    assert sampler.error == ""


def test_a_failed_sample_leaves_the_peaks_missing_not_zero(sampler: Sampler) -> None:
    stack = _Stack((120.0, 300.0))
    sampler.reset(stack)  # type: ignore[arg-type]
    sampler.sample()
    stack.figures = PermissionError("/proc/42/smaps_rollup")
    sampler.sample()
    assert sampler.peak_server is None and sampler.peak_workers is None
    assert "PermissionError" in sampler.error
    sampler.reset(_Stack((1.0, 1.0)))  # type: ignore[arg-type]
    assert sampler.peak_server is None  # no sample yet: missing too
    assert sampler.error == ""


def test_this_process_group_s_memory_is_read_from_proc() -> None:
    group = os.getpgid(0)
    rss, pss = _group_memory_mb({group})[group]
    assert rss > 10 and 0 < pss <= rss


def test_a_killed_process_stops_counting_as_running_before_it_is_reaped() -> None:
    """The sampler asks whether a process whose memory it could not read still runs: a killed
    one does not, from its exit on, though nobody has reaped it yet."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert _running(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        stat = Path(f"/proc/{child.pid}/stat")
        deadline = time.monotonic() + 5
        while " Z " not in stat.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _running(child.pid)  # a zombie: exited, not reaped
    finally:
        child.kill()
        child.wait()
    assert not _running(child.pid)  # reaped: no such process
