"""Claims first across processes: what a server marks, a worker on the same host sees."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from perito_core.scheduling import BUSY_LEASE_S, InteractiveActivity
from tests.helpers import logged


def test_a_worker_waits_while_a_call_is_in_hand_and_no_longer(tmp_path: Path) -> None:
    path = tmp_path / "activity"
    server, worker = InteractiveActivity(path), InteractiveActivity(path)
    assert worker.wait_until_quiet(0.01, 1.0) < 0.01  # nothing marked yet: no wait

    server.begin()
    server.begin()  # two calls in hand
    assert worker.busy_until() > time.monotonic() + BUSY_LEASE_S / 2
    waited = worker.wait_until_quiet(0.01, 0.05)
    assert 0.05 <= waited < 0.5  # waits its bound, no longer

    server.end()  # one call still in hand
    assert worker.busy_until() > time.monotonic()
    server.end()
    ended = time.monotonic()
    assert worker.busy_until() <= time.monotonic()
    worker.wait_until_quiet(0.05, 1.0)
    assert time.monotonic() - ended >= 0.05  # the quiet time after the last call
    assert worker.wait_until_quiet(0.0, 1.0) < 0.01


def test_another_process_sees_the_mark(tmp_path: Path) -> None:
    path = tmp_path / "activity"
    worker = InteractiveActivity(path)
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from perito_core.scheduling import InteractiveActivity\n"
        "a = InteractiveActivity(Path(sys.argv[1])); a.begin(); print('in hand', flush=True)\n"
        "sys.stdin.readline(); a.end(); print('done', flush=True)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as server:
        assert server.stdout is not None and server.stdin is not None
        assert server.stdout.readline().strip() == "in hand"
        assert worker.busy_until() > time.monotonic()
        server.stdin.write("\n")
        server.stdin.flush()
        assert server.stdout.readline().strip() == "done"
        assert worker.busy_until() <= time.monotonic()  # the same clock in both processes


def test_a_mark_never_ended_lapses_by_itself(tmp_path: Path) -> None:
    path = tmp_path / "activity"
    InteractiveActivity(path).begin()  # and never ends, as a server killed mid-call
    worker = InteractiveActivity(path)
    lapses = worker.busy_until()
    assert time.monotonic() < lapses <= time.monotonic() + BUSY_LEASE_S


def test_a_file_another_could_have_made_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"precious data")
    link = tmp_path / "activity-link"
    link.symlink_to(target)
    with pytest.raises(OSError, match="symbolic links"):  # ELOOP: never followed, written through
        InteractiveActivity(link)
    assert target.read_bytes() == b"precious data"
    open_to_all = tmp_path / "activity-0666"
    open_to_all.write_bytes(b"")
    open_to_all.chmod(0o666)
    with pytest.raises(PermissionError, match="mode 0600"):
        InteractiveActivity(open_to_all)


def test_a_truncated_file_reads_as_quiet(tmp_path: Path) -> None:
    path = tmp_path / "activity"
    server, worker = InteractiveActivity(path), InteractiveActivity(path)
    server.begin()
    os.truncate(path, 0)  # by another process, under both
    assert worker.busy_until() == 0.0
    server.end()  # writes again, no crash
    assert worker.busy_until() <= time.monotonic()


def test_settings_that_cannot_open_the_file_turn_claims_first_off(tmp_path: Path) -> None:
    from perito_core.settings import CommonSettings

    link = tmp_path / "activity"
    link.symlink_to(tmp_path / "elsewhere")
    with logged("perito_core.settings", logging.WARNING) as warnings:
        assert CommonSettings(activity_file=link).open_activity() is None
    assert any("claims first across processes is off" in w for w in warnings)
