"""The SDK keeps its word when the server does not answer: `wait(timeout=3)` against a
frozen server (SIGSTOP: the connection stays open, nothing comes) blocked for as long as the
server was frozen, a `wait` across a server restart raised UNAVAILABLE although the job ran
on, and so did a `classify` sent while its server restarted. Real `perito serve` processes on
one port, a real redis-server; no worker, so a job waits until it is cancelled."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

import perito
from tests.conftest import tiny_registry
from tests.helpers import perito_proc, red_jpeg, subprocess_env
from tests.processes import Proc, free_port, wait_for_port

pytestmark = pytest.mark.integration


def _serve(work: Path, port: int, redis_url: str, name: str) -> Proc:
    process = perito_proc(
        "perito serve",
        ["serve", "--port", str(port), "--preload", "tiny"],
        subprocess_env(
            PERITO_REGISTRY=str(work / "registry"),
            PERITO_CACHE_DIR=str(work / "cache"),
            PERITO_REDIS_URL=redis_url,
            PERITO_TORCH_THREADS="1",
        ),
        work / f"{name}.log",
        "serving on",
    ).launch()
    wait_for_port(port, timeout=120, process=process)
    return process


def test_wait_keeps_its_timeout_when_the_server_freezes(
    tmp_path: Path, tiny_model_file: Path, redis_url: str
) -> None:
    tiny_registry(tmp_path / "registry", tiny_model_file)
    port = free_port()
    server = _serve(tmp_path, port, redis_url, "serve")
    try:
        with perito.Client(f"127.0.0.1:{port}", timeout=10) as client:
            handle = client.submit_job([red_jpeg()], model="tiny", inline=True)
            os.kill(server.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(perito.JobTimeoutError):
                    handle.wait(timeout=3)
                assert time.monotonic() - started < 6
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert handle.cancel().state is perito.JobState.CANCELLED
    finally:
        server.stop()


def test_wait_goes_on_across_a_server_restart(
    tmp_path: Path, tiny_model_file: Path, redis_url: str
) -> None:
    tiny_registry(tmp_path / "registry", tiny_model_file)
    port = free_port()
    target = f"127.0.0.1:{port}"
    server = _serve(tmp_path, port, redis_url, "serve-1")
    outcome: list[object] = []
    with perito.Client(target, timeout=10) as client:
        handle = client.submit_job([red_jpeg()], model="tiny", inline=True)

        def wait() -> None:
            try:
                outcome.append(handle.wait(timeout=90))
            except Exception as error:  # noqa: BLE001 - the test reads it
                outcome.append(error)

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(1.0)  # the watch is open
        server.kill9()
        time.sleep(2.0)  # the handle finds no server meanwhile
        server = _serve(tmp_path, port, redis_url, "serve-2")
        try:
            with perito.Client(target, timeout=10) as other:
                other.cancel_job(handle.id)
            waiter.join(60)
            assert not waiter.is_alive()
            [job] = outcome
            assert isinstance(job, perito.Job), job
            assert job.state is perito.JobState.CANCELLED
        finally:
            server.stop()


def test_a_classify_sent_while_the_server_restarts_is_answered_once_it_is_back(
    tmp_path: Path, tiny_model_file: Path, redis_url: str
) -> None:
    """A client whose server has answered it waits for that server to come back (within
    the call's timeout) rather than raising UNAVAILABLE after ~0.7 s of retries; one that
    never reached its server still fails at once."""
    tiny_registry(tmp_path / "registry", tiny_model_file)
    port = free_port()
    target = f"127.0.0.1:{port}"
    server = _serve(tmp_path, port, redis_url, "serve-1")
    with perito.Client(target, timeout=60) as client:
        assert client.classify([red_jpeg()], model="tiny")[0].predictions
        server.kill9()
        restarted: list[Proc] = []
        restart = threading.Timer(
            2.0, lambda: restarted.append(_serve(tmp_path, port, redis_url, "serve-2"))
        )
        restart.start()
        try:
            started = time.monotonic()
            [answer] = client.classify([red_jpeg()], model="tiny")
            assert answer.predictions and time.monotonic() - started > 2.0
        finally:
            restart.join()
            for process in restarted:
                process.stop()
    started = time.monotonic()
    with (
        perito.Client(f"127.0.0.1:{free_port()}", timeout=60) as nowhere,
        pytest.raises(perito.UnavailableError),
    ):
        nowhere.classify([red_jpeg()], model="tiny")
    assert time.monotonic() - started < 5
