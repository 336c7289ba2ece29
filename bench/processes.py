"""Starting the processes a benchmark measures: free ports, wait-until-ready."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(args: list[str], log: Path, env: dict[str, str], ready: str) -> subprocess.Popen[bytes]:
    """Start `args` with output to `log`; return once `ready` appears there (exit if it dies)."""
    process = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if ready.encode() in log.read_bytes():
            return process
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit(log.read_text())
