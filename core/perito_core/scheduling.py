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
"""

from __future__ import annotations

import logging
import os

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
