"""A `redis+sentinel://` URL on a real Sentinel group (a primary, a replica, three
`redis-sentinel`s): the job store's client and Celery's broker follow a failover."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from perito_core.jobs.queue import BULK_QUEUE, CLASSIFY_CHUNK, make_celery
from perito_core.jobs.store import JobStore
from perito_core.redis_connection import redis_client
from tests.sentinels import SentinelGroup

pytestmark = pytest.mark.integration


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    sentinels = SentinelGroup(tmp_path)
    try:
        sentinels.start()
        yield sentinels
    finally:
        sentinels.stop()


def _address(store: JobStore) -> tuple[str, int]:
    pool = store.redis.connection_pool
    return pool.get_master_address()  # type: ignore[attr-defined,no-any-return]


def _wait_blocked(port: int, timeout: float = 20) -> None:
    """Wait until a client of the Redis on `port` waits in a blocking command."""
    deadline = time.monotonic() + timeout
    with redis_client(f"redis://127.0.0.1:{port}/0", socket_timeout=2) as client:
        while client.info("clients")["blocked_clients"] < 1:
            assert time.monotonic() < deadline, f"nobody blocked on port {port}"
            time.sleep(0.05)


def test_the_job_store_and_the_broker_follow_a_failover(group: SentinelGroup) -> None:
    store = JobStore.connect(group.url, outage_retry_s=30)
    app = make_celery(group.url, visibility_timeout_s=60)
    assert store.redis.set("before", "1")
    assert _address(store) == ("127.0.0.1", group.primary_port)
    assert store.redis.wait(1, 5000) == 1  # the replica has it
    app.send_task(CLASSIFY_CHUNK, kwargs={"job_id": "j", "chunk": 0}, queue=BULK_QUEUE)

    # A command in flight when the primary dies, and one sent just after, are retried until
    # the replica is promoted, and then run there.
    popped: list[object] = []
    in_flight = threading.Thread(target=lambda: popped.append(store.redis.blpop(["handed"])))
    in_flight.start()
    _wait_blocked(group.primary_port)
    answered: list[int] = []
    after = threading.Thread(target=lambda: answered.append(int(store.redis.incr("during"))))
    group.primary.kill9()
    killed = time.monotonic()
    after.start()
    promoted = group.wait_promoted(group.primary_port, timeout=30)
    failover_s = time.monotonic() - killed
    after.join(30)
    _wait_blocked(promoted)
    redis_client(group.url).rpush("handed", "x")
    in_flight.join(30)

    assert promoted == group.replica_port
    assert answered == [1], "the call made during the failover did not complete once"
    assert popped == [(b"handed", b"x")], "the call in flight did not move to the new primary"
    assert store.redis.get("before") == b"1"
    assert _address(store) == ("127.0.0.1", group.replica_port)
    assert failover_s < 20
    # Celery's broker (kombu's sentinel:// transport) publishes to the new primary; the
    # message sent before the failover is there too.
    app.send_task(CLASSIFY_CHUNK, kwargs={"job_id": "j", "chunk": 1}, queue=BULK_QUEUE)
    broker = redis_client(group.url, socket_timeout=5)
    assert broker.llen(BULK_QUEUE) == 2


def test_a_demoted_primary_is_left_for_the_new_one(group: SentinelGroup) -> None:
    """The old primary, back from its append-only file, is made a replica by the sentinels;
    a client writes to the new primary throughout."""
    client = redis_client(group.url, socket_timeout=5)
    client.set("k", "old")
    group.primary.kill9()
    group.wait_promoted(group.primary_port, timeout=30)
    group.primary.start(30)
    client.set("k", "new")
    group.wait_replica(group.primary_port, timeout=30)
    client.set("k", "newer")
    assert client.get("k") == b"newer"
    deadline = time.monotonic() + 30
    while client.wait(1, 1000) < 1:  # until the old primary, now its replica, has it
        assert time.monotonic() < deadline, "the old primary never caught up"
    with redis_client(f"redis://127.0.0.1:{group.primary_port}/0") as old:
        assert old.get("k") == b"newer"
