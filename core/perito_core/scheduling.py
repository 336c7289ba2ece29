"""Putting a thread's CPU work behind everyone else's: Linux's `SCHED_IDLE` class.

A bulk-job worker sharing cores with `perito serve` must leave interactive calls their latency
while it soaks up whatever CPU is left (Triton's request priorities do this inside one server;
here the two are separate processes). A nice value only weights the share: the worker still
takes cores while a call is decoding or running. A thread in `SCHED_IDLE` (sched(7): "for
running very low priority background jobs") runs only when no thread of a normal class
wants the core, and is preempted as soon as one does.

The class is set per thread and inherited by the threads a thread creates: an engine's
thread pool (OpenMP for torch, TBB for OpenVINO, ONNX Runtime's own) made from a lowered
thread is lowered too. A thread can lower itself without privileges.

SCHED_IDLE shares the cores, not the caches: `InteractiveActivity` also keeps a worker from
starting a forward pass while a server on the same host has a call in hand.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import struct
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def run_when_idle() -> bool:
    """Move the calling thread (and the threads it creates from now on) to `SCHED_IDLE`.

    Returns:
        True once it is in that class; False where the platform has no such class or refuses
        (logged once per thread at debug level; the thread keeps its class).
    """
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None:
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))  # 0: the calling thread (Linux)
    except OSError as error:
        log.debug("SCHED_IDLE refused: %s", error)
        return False
    return True


def is_idle_class() -> bool:
    """Whether the calling thread is in `SCHED_IDLE` (False where there is no such class)."""
    policy = getattr(os, "SCHED_IDLE", None)
    return policy is not None and os.sched_getscheduler(0) == policy


DEFAULT_ACTIVITY_FILE = "perito-interactive"
"""The file's name in `/dev/shm` (else the temporary folder) when no path is set."""


def default_activity_path() -> Path:
    """Where this host's servers and workers meet by default: `/dev/shm/perito-interactive-UID`
    (shared memory), else the same name in the temporary folder."""
    folder = Path("/dev/shm")
    if not folder.is_dir():
        folder = Path(tempfile.gettempdir())
    return folder / f"{DEFAULT_ACTIVITY_FILE}-{os.getuid()}"


class InteractiveActivity:
    """When the `perito serve` processes on this host last had a caller's images in hand,
    shared with the bulk workers on the same host through one small file in shared memory.

    Claims first, bulk second, across processes: SCHED_IDLE (`run_when_idle`) keeps a worker's
    threads off a core a server thread wants, but a worker's forward pass that runs between two
    calls still takes the caches and memory bandwidth the next call needs. So a server marks
    each call (`begin` / `end`), and a worker starts no forward pass while a call is in hand or
    until `quiet_s` after the last one ended (`wait_until_quiet`), waiting at most `max_wait_s`
    each time, so that bulk work keeps moving under any load.

    The file holds one float64 (read and written whole with pread / pwrite, so a file
    truncated under it reads as quiet, never crashes a server): the `time.monotonic()`
    (CLOCK_MONOTONIC, the same clock in every process of a host) until which a server is
    busy. A call in hand holds a lease of `BUSY_LEASE_S`, renewed by each call that begins;
    the last call to end sets it to now.
    Several servers on one host write the same word: one that finishes first may end
    another's lease early (a worker then starts a batch sooner, never later). A server killed
    mid-call leaves a lease that lapses by itself.
    """

    def __init__(self, path: Path) -> None:
        """Open (creating it, mode 0600) the shared file at `path`.

        Raises:
            OSError: the file cannot be created or opened; `path` is a symbolic link; or
                (PermissionError) it is not a regular file owned by this user with no group
                or other permissions: in a shared folder such as /dev/shm another user could
                have made it first, to slow this host's workers or read its traffic.
        """
        self.path = path
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o600)
        try:
            status = os.fstat(self._fd)
            if (
                not stat.S_ISREG(status.st_mode)
                or status.st_uid != os.geteuid()
                or status.st_mode & 0o077
            ):
                raise PermissionError(
                    f"{path}: not a regular file of this user's with mode 0600 "
                    f"(uid {status.st_uid}, mode {stat.filemode(status.st_mode)})"
                )
        except BaseException:
            os.close(self._fd)
            raise
        self._in_hand = 0

    def busy_until(self) -> float:
        """The monotonic time until which a server is busy (a past time, or 0.0: quiet; also
        0.0 for a file shorter than its word, as another process may have left it)."""
        data = os.pread(self._fd, _WORD.size, 0)
        if len(data) < _WORD.size:
            return 0.0
        value: float = _WORD.unpack(data)[0]
        return 0.0 if math.isnan(value) else value

    def _write(self, value: float) -> None:
        os.pwrite(self._fd, _WORD.pack(value), 0)

    def begin(self) -> None:
        """A call's images are in hand (from admission to its answer). Event-loop thread only."""
        self._in_hand += 1
        self._write(time.monotonic() + BUSY_LEASE_S)

    def end(self) -> None:
        """A call marked by `begin` is answered or refused."""
        self._in_hand = max(0, self._in_hand - 1)
        if not self._in_hand:
            self._write(time.monotonic())

    def wait_until_quiet(self, quiet_s: float, max_wait_s: float) -> float:
        """Block until no call is in hand and `quiet_s` have passed since the last one ended,
        or `max_wait_s` have passed. Returns the seconds waited (0.0 when already quiet)."""
        start = time.monotonic()
        now = start
        while now - start < max_wait_s and now < self.busy_until() + quiet_s:
            time.sleep(_POLL_S)
            now = time.monotonic()
        return now - start

    def close(self) -> None:
        os.close(self._fd)


BUSY_LEASE_S = 5.0
"""How long a call's mark holds unless the call ends first (a server killed mid-call)."""

_WORD = struct.Struct("=d")
# How often a waiting worker looks at the file again (a read of one mapped word).
_POLL_S = 0.002
