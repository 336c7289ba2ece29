"""The decode threads serve tenants in turns (`perito_server.turns.TakingTurns`)."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError
from typing import Any

import pytest

from perito_server.turns import TakingTurns


def _hold(pool: TakingTurns, tenant: str, gate: threading.Event) -> object:
    """Work of `tenant` that holds a thread until `gate`, once a thread runs it."""
    started = threading.Event()

    def held() -> bool:
        started.set()
        return gate.wait(10)

    future = pool.submit_as(tenant, held)
    assert started.wait(10)
    return future


def test_a_tenant_arriving_behind_anothers_queue_is_served_next() -> None:
    pool = TakingTurns(1, "test")
    gate, ran = threading.Event(), []
    try:
        _hold(pool, "globex", gate)  # the one thread
        futures = [pool.submit_as("globex", ran.append, f"globex-{i}") for i in range(4)]
        futures += [pool.submit_as("acme", ran.append, "acme-0")]
        futures += [pool.submit_as("acme", ran.append, "acme-1")]
        futures += [pool.submit(ran.append, "unnamed-0")]
        assert pool.waiting() == {"globex": 4, "acme": 2, "": 1}
        gate.set()
        for future in futures:
            future.result(10)
    finally:
        pool.shutdown()
    # Round robin over the tenants with work waiting; each tenant's own work in order.
    assert ran == [
        "globex-0",
        "acme-0",
        "unnamed-0",
        "globex-1",
        "acme-1",
        "globex-2",
        "globex-3",
    ]


def test_errors_reach_their_caller_and_cancelled_work_never_runs() -> None:
    pool = TakingTurns(1, "test")
    gate, ran = threading.Event(), []
    try:
        _hold(pool, "a", gate)
        failing = pool.submit_as("a", int, "not a number")
        left = pool.submit_as("a", ran.append, "cancelled")
        assert left.cancel()
        gate.set()
        with pytest.raises(ValueError, match="not a number"):
            failing.result(10)
        assert pool.submit_as("b", lambda: 7).result(10) == 7
    finally:
        pool.shutdown()
    assert ran == []


def test_shutdown_cancels_what_waits_and_refuses_more() -> None:
    pool = TakingTurns(1, "test")
    gate = threading.Event()
    running: Any = _hold(pool, "a", gate)
    waiting = pool.submit_as("b", gate.wait, 10)
    pool.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(CancelledError):
        waiting.result(1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit_as("a", print)
    gate.set()
    assert running.result(10) is True
