"""SCHED_IDLE for the threads that do a worker's CPU work, and only for them."""

from __future__ import annotations

import os
import threading

import pytest

from perito_core.scheduling import is_idle_class, run_when_idle

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux only")


def test_a_lowered_thread_and_the_threads_it_makes_are_idle_class_and_no_other() -> None:
    seen: dict[str, bool] = {}

    def child() -> None:
        seen["child"] = is_idle_class()

    def lowered() -> None:
        seen["lowered"] = run_when_idle() and is_idle_class()
        thread = threading.Thread(target=child)
        thread.start()
        thread.join()

    def sibling() -> None:
        seen["sibling"] = is_idle_class()

    first = threading.Thread(target=lowered)
    first.start()
    first.join()
    second = threading.Thread(target=sibling)
    second.start()
    second.join()
    assert seen == {"lowered": True, "child": True, "sibling": False}
    assert not is_idle_class()  # the calling thread is untouched
