"""The job store in Redis Cluster terms, on real redis-servers: every Lua script it runs touches
the keys of one hash slot, and the global indexes that follow a job's script are repaired by
the watchdog when the process that should have written them dies first."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.commands.core import Script
from redis.crc import key_slot

from perito import ItemState, JobState
from perito_core.errors import NotFound
from perito_core.jobs.queue import make_celery
from perito_core.jobs.store import (
    ACTIVE_JOBS_KEY,
    JOBS_KEY,
    PURGE_KEY,
    ItemInput,
    JobStore,
    job_key,
    job_keys_pattern,
)
from perito_core.jobs.watchdog import Watchdog
from perito_core.storage import S3Options
from tests.helpers import create_job, record_chunks, redis_server
from tests.processes import Proc, free_port

pytestmark = pytest.mark.integration

TENANT = "acme"


@contextlib.contextmanager
def cluster_node() -> Iterator[str]:
    """A real redis-server in cluster mode, one node holding all 16,384 slots: like any Redis
    Cluster it refuses a script, MULTI or multi-key command whose keys are in more than one
    slot (CROSSSLOT). Yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="perito-cluster-") as folder:
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", folder, "--cluster-enabled", "yes"]
        args += ["--cluster-port", str(free_port())]  # the bus: else port + 10,000
        server = Proc("redis-server", args, dict(os.environ), Path(folder) / "redis.log")
        server.ready = "Ready to accept"
        server.start(30)
        try:
            client = redis.Redis(port=port)
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            deadline = time.monotonic() + 30
            while client.cluster("INFO")["cluster_state"] != "ok":  # type: ignore[no-untyped-call]
                assert time.monotonic() < deadline, "the one-node cluster did not come up"
                time.sleep(0.1)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.stop(10)


class ScriptCalls:
    """Every call of the store's Lua scripts, with the keys it passed (KEYS)."""

    def __init__(self, store: JobStore) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        for attribute, script in list(vars(store).items()):
            if isinstance(script, Script):
                setattr(store, attribute, self._observed(attribute.removeprefix("_"), script))

    def _observed(self, name: str, script: Script) -> Callable[..., Any]:
        def call(keys: list[str], args: list[Any] | None = None) -> Any:
            self.calls.append((name, list(keys)))
            return script(keys=keys, args=args)

        return call


def _watchdog(store: JobStore, broker_url: str, **kwargs: float) -> Watchdog:
    return Watchdog(
        store,
        make_celery(broker_url),
        redis.Redis.from_url(broker_url),
        S3Options(),
        retention_s=kwargs.get("retention_s", 3600.0),
        item_time_limit_s=1.0,
        interval_s=0.1,
        finalize_grace_s=0.0,
    )


def _items(n: int) -> Iterator[ItemInput]:
    return (ItemInput(id=str(i), uri=f"s3://b/{i}.jpg") for i in range(n))


def test_every_script_the_store_runs_touches_one_slot(tmp_path: Path) -> None:
    """A job's whole life (quota, claims, submission, chunks, cancel, finish, the watchdog,
    delete, purge, a refused submission) through the real store on a cluster-mode
    redis-server: the keys of every script call are in one slot (by redis-py's CRC16 of
    the Redis Cluster spec, hash tags included), every script is run, and no command, MULTI
    or script is refused CROSSSLOT by the server."""
    with cluster_node() as url, redis_server() as broker_url:
        store = JobStore.connect(url)
        observed = ScriptCalls(store)
        watchdog = _watchdog(store, broker_url, retention_s=0.0)
        # A submission that died an hour ago holds a quota slot: reserving drops it.
        store.redis.zadd(f"perito:tenant:{TENANT}:active", {"died": time.time() - 7200})
        assert store.reserve_slot(TENANT, "job-a", limit=1)
        assert store.claim_request("req-a", "job-a", TENANT) == "job-a"
        assert store.claim_output("job-a", ["/out/a", "/out"], 60)
        job, created = store.create(
            model="m",
            model_version="1",
            items=[ItemInput(id=str(i)) for i in range(3)],
            inline={i: b"image %d" % i for i in range(3)},
            output_uri=str(tmp_path / "a"),
            top_k=1,
            confidence_threshold=0,
            chunk_size=2,
            labels={},
            data_root=str(tmp_path / "data" / "a"),
            job_id="job-a",
            request_id="req-a",
            tenant=TENANT,
        )
        assert created and job.indexed is False and store.get(job.id).indexed
        store.release_slot(TENANT, job.id)  # a made job keeps its slot
        assert not store.reserve_slot(TENANT, "job-b", limit=1)
        assert store.mark_running(job.id) is JobState.RUNNING
        lease = store.acquire_chunk(job.id, 1, "w", ttl_s=60)
        assert store.renew_chunk(job.id, 1, "w", ttl_s=60)
        assert store.unleased_chunks(job.id) == [0]
        store.release_chunk(job.id, 1, "w", error="stopped")
        assert lease.outcome == "acquired" and store.chunk_error(job.id, 1) == "stopped"
        record_chunks(store, job.id, chunks=[0])
        store.request_cancel(job.id)
        assert store.mark_unrecorded(job.id, ItemState.CANCELLED, "") == 1
        assert store.stalled_seconds()[JobState.RUNNING] >= 0
        ended = store.finish(job.id, [])
        assert ended.state is JobState.CANCELLED
        assert store.state_counts()[JobState.CANCELLED] == 1
        assert [j.id for j in store.list_jobs(TENANT, page_size=5)[0]] == [job.id]
        # A second job, never run: the watchdog resends its chunks (two sweeps) and expires
        # the first (retention 0), whose data it then purges.
        other, _ = create_job(
            store, _items(4), output_uri=str(tmp_path / "b"), chunk_size=2, data_root=str(tmp_path)
        )
        first, second = watchdog.sweep(), watchdog.sweep()
        assert (first.deleted, first.purged, first.errors) == (1, 3, []), first  # 2 inputs, 1 part
        assert (second.resent, second.errors) == (2, []), second
        with pytest.raises(NotFound):
            store.get(job.id)
        assert store.expired_jobs(0.0) == []
        # A refused submission's claims are released.
        store.claim_request("req-c", "job-c", TENANT)
        store.claim_output("job-c", ["/out/c", "/out"], 60)
        store.release_claims("job-c", request_id="req-c", tenant=TENANT, output_location="/out/c")
        assert store.claim_request("req-c", "job-d", TENANT) == "job-d"
        assert store.delete(other.id) is False  # not terminal: nothing deleted

    called = {name for name, _ in observed.calls}
    lua = resources.files("perito_core.jobs").joinpath("lua")
    scripts = {entry.name.removesuffix(".lua") for entry in lua.iterdir()}
    assert called == scripts, scripts ^ called
    for name, keys in observed.calls:
        assert keys, name
        slots = {key_slot(key.encode()) for key in keys}
        assert len(slots) == 1, (name, keys)


def test_every_key_of_a_job_hashes_to_its_slot() -> None:
    parts = ("", "chunks", "open", "inline", "leases", "attempts", "chunk-errors")
    parts += ("chunk-failures",)
    for job_id in ("0f3a9c1e5b7d2a4c6e8f", "job-a", "x"):
        assert {key_slot(job_key(job_id, part).encode()) for part in parts} == {
            key_slot(job_id.encode())
        }
    assert job_key("abc", "open") == "perito:job:{abc}:open"


def _killed_at(url: str, step: str, operation: Callable[[JobStore], object]) -> None:
    """Run `operation` on a store of its own in a child process that is SIGKILLed the moment
    it calls `JobStore.<step>`: what a process dying between a job's script and the global
    indexes that follow it leaves in Redis."""

    def child() -> None:
        def die(*args: object, **kwargs: object) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        setattr(JobStore, step, die)
        operation(JobStore.connect(url))

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    assert process.exitcode == -signal.SIGKILL, process.exitcode


def test_the_watchdog_writes_the_indexes_a_dying_process_left_undone(tmp_path: Path) -> None:
    with redis_server() as url:
        store = JobStore.connect(url)
        watchdog = _watchdog(store, url)
        data_root = str(tmp_path / "data")

        # Recorded, then killed before its indexes: queued, but in no list, holding no slot.
        def submit(s: JobStore) -> None:
            create_job(
                s,
                _items(4),
                output_uri=str(tmp_path),
                chunk_size=2,
                data_root=data_root,
                job_id="made",
                tenant=TENANT,
            )

        _killed_at(url, "_index", submit)
        job = store.get("made")
        assert job.state is JobState.QUEUED and not job.indexed
        assert store.active_jobs() == ["made"]  # joined before its record was written
        assert store.list_jobs(TENANT, page_size=5)[0] == []
        assert store.state_counts()[JobState.QUEUED] == 1
        # Its submission's purge is still queued: when due, the job's inputs are kept.
        store.redis.zadd(PURGE_KEY, {member: 0 for member in store.redis.zrange(PURGE_KEY, 0, -1)})
        assert store.purge_job_data(100) == (0, 0)
        assert store.chunk_inputs(job, 1)[0].id == "2"
        assert watchdog.sweep().repaired == 1
        assert [j.id for j in store.list_jobs(TENANT, page_size=5)[0]] == ["made"]
        assert store.get("made").indexed and store.redis.zrange(JOBS_KEY, 0, -1) == [b"made"]
        assert store.redis.zcard(PURGE_KEY) == 0
        assert store.reserve_slot(TENANT, "next", limit=2)
        assert not store.reserve_slot(TENANT, "after", limit=2)  # "made" holds one
        store.release_slot(TENANT, "next")
        assert watchdog.sweep().repaired == 0  # nothing more to do

        # Ended, then killed before its indexes: it still holds the tenant's slot.
        record_chunks(store, "made")
        _killed_at(url, "_index", lambda s: s.finish("made", []))
        assert store.get("made").state is JobState.SUCCEEDED
        assert not store.reserve_slot(TENANT, "next", limit=1)
        assert store.state_counts()[JobState.SUCCEEDED] == 0  # not in its state's list yet
        assert watchdog.sweep().repaired == 1
        assert store.active_jobs() == []
        assert store.state_counts()[JobState.SUCCEEDED] == 1
        assert store.reserve_slot(TENANT, "next", limit=1)
        store.release_slot(TENANT, "next")

        # Deleted, killed once its keys were gone: the retention sweep finishes the deletion.
        _killed_at(url, "_unindex", lambda s: s.delete("made"))
        assert not store.exists("made")
        assert store.state_counts()[JobState.SUCCEEDED] == 1  # still listed as ended
        watchdog.retention_s = 0.0
        watchdog.sweep()
        assert store.state_counts()[JobState.SUCCEEDED] == 0
        left = {b"perito:watchdog-lock", b"perito:legacy-adopted", PURGE_KEY.encode()}
        assert set(store.redis.keys("perito:*")) == left  # nothing of it left but ...
        [again] = store.redis.zrange(PURGE_KEY, 0, -1)
        assert json.loads(again)[2] == "again"  # ... its prefix's second look, a while on
        assert not list((tmp_path / "data").rglob("*.jsonl"))  # its inputs purged


def test_a_submission_that_died_just_before_recording_its_job_is_dropped_an_hour_on(
    tmp_path: Path,
) -> None:
    with redis_server() as url:
        store = JobStore.connect(url)
        store.redis.zadd(ACTIVE_JOBS_KEY, {"never": time.time() - 3700, "just-now": time.time()})
        assert _watchdog(store, url).sweep().repaired == 1
        assert store.active_jobs() == ["just-now"]  # it may still be recorded


def test_jobs_under_an_earlier_versions_keys_are_moved_to_this_ones(tmp_path: Path) -> None:
    """Keys without the hash tag (`perito:job:<id>`), listed by key: an ended job stays
    readable and expires with its retention, with what versions before that kept items in
    Redis left; one still queued is indexed and runs on."""
    with redis_server() as url:
        store = JobStore.connect(url)
        record = {"model": "m", "model_version": "1", "total": 2, "chunk_size": 2}
        store.redis.hset("perito:job:old", mapping={**record, "id": "old", "state": "succeeded"})
        store.redis.set("perito:job:old:chunks", b"\x00\x01\x00\x00")
        store.redis.rpush("perito:job:old:results", "an item's result, as versions before kept")
        store.redis.zadd("perito:finished-jobs", {"perito:job:old": time.time()})
        store.redis.hset("perito:job:live", mapping={**record, "id": "live", "state": "queued"})
        store.redis.hset("perito:job:live:open", mapping={"0": 2})
        store.redis.zadd("perito:active-jobs", {"perito:job:live": time.time()})
        store.redis.hset("perito:job-states", mapping={"succeeded": 1, "queued": 1})
        watchdog = _watchdog(store, url)
        assert watchdog.sweep().repaired == 1  # "live": indexed once moved
        assert store.get("old").state is JobState.SUCCEEDED
        assert store.unleased_chunks("live") == [0] and store.get("live").indexed
        assert store.state_counts()[JobState.SUCCEEDED] == 1
        assert store.state_counts()[JobState.QUEUED] == 1
        assert not store.redis.keys("perito:job:old*") and not store.redis.keys("perito:job:live*")
        watchdog.sweep()  # none left: the earlier version's state counts go
        assert not store.redis.exists("perito:finished-jobs", "perito:job-states")
        watchdog.retention_s = 0.0
        assert watchdog.sweep().deleted == 1
        assert store.redis.keys(job_keys_pattern("old")) == []  # its earlier keys too


def test_a_running_job_under_earlier_keys_is_moved_before_ended_ones_and_never_dropped(
    tmp_path: Path,
) -> None:
    """With more ended jobs under an earlier version's keys than one sweep moves, a running
    one is moved first, and its entry is never taken for a dead submission's meanwhile."""
    with redis_server() as url:
        store = JobStore.connect(url)
        record = {"model": "m", "model_version": "1", "total": 2, "chunk_size": 2}
        long_ago = time.time() - 7200  # older than a dead submission's hour
        for n in range(150):
            store.redis.hset(f"perito:job:old{n}", mapping={**record, "id": f"old{n}"})
            store.redis.hset(f"perito:job:old{n}", "state", "succeeded")
            store.redis.zadd("perito:finished-jobs", {f"perito:job:old{n}": time.time()})
        store.redis.hset("perito:job:live", mapping={**record, "id": "live", "state": "running"})
        store.redis.hset("perito:job:live:open", mapping={"0": 2})
        store.redis.zadd(ACTIVE_JOBS_KEY, {"perito:job:live": long_ago})
        watchdog = _watchdog(store, url)
        watchdog.sweep()
        assert store.get("live").state is JobState.RUNNING
        assert store.unleased_chunks("live") == [0] and store.get("live").indexed
        assert not store.redis.exists("perito:job:live")
        watchdog.sweep()  # the last 50 ended ones
        assert store.state_counts()[JobState.SUCCEEDED] == 150
        assert store.adopt_legacy_jobs() == 0
        assert store.redis.exists("perito:legacy-adopted")  # later sweeps read that key alone
        store.redis.zadd(ACTIVE_JOBS_KEY, {"perito:job:late": long_ago})
        assert store.adopt_legacy_jobs() == 0


def test_a_legacy_entry_not_moved_yet_is_passed_over_by_the_sweep(tmp_path: Path) -> None:
    with redis_server() as url:
        store = JobStore.connect(url)
        store.redis.zadd(ACTIVE_JOBS_KEY, {"perito:job:live": time.time() - 7200})
        assert not store.forget_unrecorded("perito:job:live")
        assert store.active_jobs() == ["perito:job:live"]
