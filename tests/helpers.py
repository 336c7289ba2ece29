"""Helpers shared by the test suites: real servers started and stopped for a test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from perito_core.manifest import InputContract

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

TINY_INPUT = InputContract(
    height=32, width=32, resize_size=32, resize_mode="squash", mean=(0.5,) * 3, std=(0.25,) * 3
)


def tiny_network(num_classes: int = 3) -> nn.Module:
    """A small CNN for tests that need a model but not a good one."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    ).eval()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(
    port: int, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before opening {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """A local S3-compatible HTTP server (moto) in its own process; yields its endpoint URL."""
    port = free_port()
    process = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process=process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class ServerThread:
    """`create_server` on its own event loop in a thread: a real server on a real socket."""

    def __init__(self, settings: object) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.running: object = None

    def __enter__(self) -> ServerThread:
        from perito_server.app import create_server

        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(create_server(self.settings), self.loop)  # type: ignore[arg-type]
        self.running = future.result(120)
        return self

    @property
    def port(self) -> int:
        return self.running.port  # type: ignore[attr-defined,no-any-return]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coroutine: object, timeout: float = 60) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)  # type: ignore[arg-type]

    def __exit__(self, *exc: object) -> None:
        self.call(self.running.stop(0))  # type: ignore[attr-defined]
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def stop_process(process: subprocess.Popen[str], timeout: float = 30) -> int:
    """SIGTERM, then wait; returns the exit code (kills if it does not stop in time)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def perito_command() -> list[str]:
    return [str(VENV_BIN / "perito")]


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
