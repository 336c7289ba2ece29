"""Starting and stopping the real processes that the tests and the benchmarks run:
`redis-server`, `perito serve`, `perito worker`, an S3 server. One way, used by both.

Each process runs in its own process group (so stopping or `kill -9` takes a worker's pool
children too), writes to a log file, and counts as ready when a line appears in that log. It is
started as `make demo` starts its own (`scripts.demo.spawn`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from scripts.demo import spawn


class ProcessFailed(RuntimeError):
    """A process exited, or did not get ready in time; the message ends with its log's tail."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 30.0, process: Proc | None = None) -> None:
    """Return once something accepts connections on 127.0.0.1:`port`.

    Raises:
        ProcessFailed: `process` exited first.
        TimeoutError: nothing listened within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive:
            raise ProcessFailed(f"{process.name} exited before opening port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


class Proc:
    """A subprocess in its own process group, its output appended to `log`.

    Args:
        name: for messages.
        args: the command line.
        env: its whole environment.
        log: the file its stdout and stderr are appended to.
        ready: a text its output contains once it is ready ("" : ready when started).
    """

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], log: Path, ready: str = ""
    ) -> None:
        self.name, self.args, self.env, self.log, self.ready = name, args, env, log, ready
        self.popen: subprocess.Popen[bytes] | None = None
        self._mark = 0

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def launch(self) -> Proc:
        """Start it without waiting; a restart appends to the same log."""
        self._mark = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.popen = spawn(self.args, self.env, out)
        return self

    def wait_ready(self, timeout: float = 180) -> Proc:
        """Return once `ready` is in its output since the last start.

        Raises:
            ProcessFailed: it exited first, or `timeout` seconds passed.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready.encode() in self.output():
                return self
            if not self.alive:
                break
            time.sleep(0.05)
        tail = self.output()[-3000:].decode(errors="replace")
        state = "exited" if not self.alive else f"not ready after {timeout:.0f}s"
        raise ProcessFailed(f"{self.name} {state} (see {self.log}):\n{tail}")

    def start(self, timeout: float = 180) -> Proc:
        """`launch`, then `wait_ready`."""
        return self.launch().wait_ready(timeout)

    def output(self) -> bytes:
        """What the process wrote since its last start."""
        if not self.log.exists():
            return b""
        with self.log.open("rb") as log:
            log.seek(self._mark)
            return log.read()

    def text(self) -> str:
        return self.output().decode(errors="replace")

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def send_signal(self, sig: int) -> None:
        """Signal the main process only (as kubelet and Docker do on a stop)."""
        assert self.popen is not None
        self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def kill9(self) -> None:
        """SIGKILL the whole process group: no goodbyes, no cleanup."""
        self.signal_group(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM the group and wait; SIGKILL what is left after `timeout`. Returns the main
        process's exit code (None if it was never started)."""
        if self.popen is None:
            return None
        if self.alive:
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.popen.wait(10)
        self.signal_group(signal.SIGKILL)  # any child left behind
        return self.popen.returncode


def redis_proc(port: int, log: Path, env: dict[str, str], *, data_dir: Path | None = None) -> Proc:
    """`redis-server` on 127.0.0.1:`port`: with `data_dir`, its append-only file there
    (fsync every second, as deploy/ runs it); without, no persistence at all."""
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    if data_dir is None:
        args += ["--appendonly", "no"]
    else:
        args += ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(data_dir)]
    return Proc("redis-server", args, env, log, "Ready to accept")
