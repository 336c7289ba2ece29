"""The fault suite's `sentinel-failover` scenario: the Redis primary killed, a replica promoted.

A Redis Sentinel group on loopback (`tests.sentinels.SentinelGroup`): a primary with its
append-only file on (fsync every second), one replica of it, three `redis-sentinel`s
monitoring it as `perito` with a quorum of 2 (down after 1 s). `perito serve` and one
`perito worker` are started as `Stack` starts them, with `PERITO_REDIS_URL` the group's
`redis+sentinel://` URL: job store and Celery broker alike (kombu's sentinel transport).

What it does: a 5,000-image job (chunks of 100) runs; at 1,500 items done the primary is
killed with SIGKILL. The sentinels agree it is down and promote the replica; the server, the
worker, its Celery consumer and the watchdog reconnect to the new primary through the
sentinels (the job store waits a failover out as it waits out a restart). Then the old
primary is started again from its append-only file, and the sentinels make it a replica of
the new one. Expected: the job succeeds with every item exactly once (`expect_all_succeeded`:
0 lost, 0 duplicated), the server and the worker never restarted. Printed: the time from the
kill to the promotion (every sentinel naming the replica), to the job's next progress, and to
the old primary's return as a replica; items done at the kill.

Writes the old primary acknowledged but had not yet sent to the replica (replication is
asynchronous) are lost with it, as with `kill-redis`'s append-only file: the chunks they
belonged to are found open once their lease lapses, and are run again.
"""

from __future__ import annotations

import time

import perito
from bench.faults import (
    Config,
    Failure,
    Lab,
    Outcome,
    Sampler,
    Stack,
    expect_all_succeeded,
    wait_done,
)
from perito_core.redis_connection import redis_client
from tests.sentinels import SentinelGroup

ITEMS, CHUNK = 5000, 100
KILL_AT = 1500  # items done when the primary is killed


def sentinel_stack(lab: Lab, group: SentinelGroup) -> Stack:
    """The fault suite's stack (one worker, the server) on `group`'s Sentinel URL, not
    started; its Redis is the group's primary, its checks read through the sentinels."""
    if lab.current is not None:
        lab.current.close()
        lab.current = None
    lab.publish("tiny")
    env = (("PERITO_REDIS_URL", group.url),)
    stack = Stack(lab, "sentinel-failover", Config(worker_env=env, server_env=env))
    stack.redis = group.primary
    stack.redis_url = group.url
    stack.r = redis_client(group.url, socket_connect_timeout=2, socket_timeout=10)
    return stack


def _wait_progress(client: perito.Client, job_id: str, past: int, timeout: float) -> float:
    """Seconds until job `job_id` has more than `past` items done (GetJob answering again)."""
    started = time.monotonic()
    wait_done(client, job_id, past + 1, timeout)
    return time.monotonic() - started


def scenario_sentinel_failover(lab: Lab, out: Outcome, sampler: Sampler) -> None:
    group = SentinelGroup(lab.work / "stacks" / "sentinel-group")
    stack = sentinel_stack(lab, group)
    try:
        group.start()  # the sentinels first: the server and the worker ask them
        for proc in [*stack.workers, stack.server]:
            proc.launch()
        for proc in [*stack.workers, stack.server]:
            proc.wait_ready()
        _failover(lab, stack, group, out, sampler)
    finally:
        stack.close()
        group.stop()


def _failover(lab: Lab, stack: Stack, group: SentinelGroup, out: Outcome, sampler: Sampler) -> None:
    sampler.reset(stack)
    client = stack.client()
    handle = client.submit_job(str(lab.photos(ITEMS)), model="tiny", chunk_size=CHUNK)
    job = wait_done(client, handle.id, KILL_AT, timeout=120)
    if job.terminal:
        raise Failure("the job ended before the primary was killed: nothing was tested")
    pids = [proc.pid for proc in (stack.server, *stack.workers)]
    group.primary.kill9()
    killed = time.monotonic()
    done_at_kill = job.done
    new_port = group.wait_promoted(group.primary_port, timeout=60)
    promoted_s = time.monotonic() - killed
    resumed_s = _wait_progress(client, handle.id, done_at_kill, timeout=120) + promoted_s
    group.primary.start(60)  # the old primary, from its append-only file
    rejoined_s = group.wait_replica(group.primary_port, timeout=60)
    expect_all_succeeded(stack, client, handle.id, ITEMS, out)
    alive = all(proc.alive for proc in (stack.server, *stack.workers))
    same = pids == [proc.pid for proc in (stack.server, *stack.workers)]
    out.expect(alive and same, "the server or the worker exited during the failover")
    out.expect(new_port == group.replica_port, f"port {new_port} promoted, not the replica's")
    warnings = stack.server.text().count("watchdog sweep failed")
    out.notes.append(
        f"primary SIGKILLed at {done_at_kill} items done; replica promoted "
        f"{promoted_s:.1f}s later (every sentinel naming it), the job moving again "
        f"{resumed_s:.1f}s after the kill; the old primary back from its append-only file "
        f"and a replica {rejoined_s:.1f}s after its restart; server and worker never "
        f"restarted ({warnings} watchdog sweeps failed during the switch)"
    )
    out.figures.update(
        done_at_kill=done_at_kill,
        failover_s=round(promoted_s, 2),
        resumed_s=round(resumed_s, 2),
        rejoined_s=round(rejoined_s, 2),
        failed_sweeps=warnings,
    )
