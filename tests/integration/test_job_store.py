"""The job store and the watchdog on a real redis-server: leases, resends, retention."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import redis

from perito import ItemState, JobState
from perito_core.errors import InvalidArgument, NotFound
from perito_core.jobs import store as store_module
from perito_core.jobs.parts import ChunkSlot, JobDataMissing
from perito_core.jobs.queue import BULK_QUEUE, make_celery, queued_chunks
from perito_core.jobs.store import (
    PURGE_KEY,
    ItemInput,
    ItemResult,
    Job,
    JobStore,
    job_key,
    job_keys_pattern,
)
from perito_core.jobs.watchdog import Watchdog
from perito_core.storage import S3Options
from tests.helpers import create_job, record_chunks, redis_server, succeeded_result

pytestmark = pytest.mark.integration


@pytest.fixture
def store() -> Iterator[JobStore]:
    with redis_server() as url:
        yield JobStore.connect(url)


def _submit(
    store: JobStore, items: Iterable[ItemInput], chunk_size: int, output: Path, **kwargs: object
) -> tuple[Job, bool]:
    """`create_job` for model m@1, top 1, results to `output`, its data in `output`'s
    folder `job-data`."""
    return create_job(
        store,
        items,
        output_uri=str(output),
        chunk_size=chunk_size,
        data_root=str(output / "job-data"),
        **kwargs,
    )


def _create(store: JobStore, n: int, chunk_size: int, output: Path, **kwargs: object) -> str:
    items = (ItemInput(id=str(i), uri=f"s3://b/{i}.jpg") for i in range(n))
    job, created = _submit(store, items, chunk_size, output, **kwargs)
    assert created
    return job.id


_ok = succeeded_result


def _memory(store: JobStore, keys: set[bytes]) -> int:
    """The bytes Redis holds for `keys` (MEMORY USAGE, every element counted)."""
    return sum(store.redis.memory_usage(key, samples=0) or 0 for key in keys)


def _watchdog(store: JobStore, **kwargs: object) -> Watchdog:
    url = store.redis.connection_pool.connection_kwargs
    broker_url = f"redis://{url['host']}:{url['port']}/0"
    options: dict[str, object] = {
        "retention_s": 3600.0,
        "item_time_limit_s": 1.0,
        "finalize_grace_s": 0.0,
    }
    options.update(kwargs)
    return Watchdog(
        store,
        make_celery(broker_url),
        redis.Redis.from_url(broker_url),
        S3Options(),
        interval_s=0.1,
        **options,  # type: ignore[arg-type]
    )


def test_a_job_over_the_item_cap_is_refused_while_listing_and_leaves_nothing(
    store: JobStore, tmp_path: Path
) -> None:
    listed: list[int] = []

    def endless() -> Iterator[ItemInput]:
        n = 0
        while True:
            listed.append(n)
            yield ItemInput(id=str(n), uri=f"s3://b/{n}")
            n += 1

    with pytest.raises(InvalidArgument, match="limit per job is 2,500") as caught:
        _submit(store, endless(), 10, tmp_path, max_items=2500)
    assert caught.value.field == "input"
    assert len(listed) == 2501  # stopped at the first item over the cap
    assert store.redis.keys(job_keys_pattern()) == []


def test_creating_the_same_job_id_twice_gives_the_first_job(
    store: JobStore, tmp_path: Path
) -> None:
    job_id = store.claim_request("req-1", "first")
    assert job_id == "first" and store.claim_request("req-1", "second") == "first"
    _create(store, 5, 2, tmp_path, job_id=job_id)
    again, created = _submit(store, [ItemInput(id="x")], 2, tmp_path, job_id=job_id)
    assert not created and again.total == 5
    assert store.state_counts()[JobState.QUEUED] == 1


def test_a_chunk_runs_under_one_live_lease_and_a_dead_holder_loses_it(
    store: JobStore, tmp_path: Path
) -> None:
    job_id = _create(store, 10, 4, tmp_path)  # chunks 0..2 (4, 4, 2)
    assert store.unleased_chunks(job_id) == [0, 1, 2]
    first = store.acquire_chunk(job_id, 1, "worker-a", ttl_s=0.3)
    assert (first.outcome, first.attempts) == ("acquired", 1)
    assert store.acquire_chunk(job_id, 1, "worker-b", ttl_s=5).outcome == "busy"
    assert store.unleased_chunks(job_id) == [0, 2]
    assert store.renew_chunk(job_id, 1, "worker-a", ttl_s=0.3)
    time.sleep(0.4)  # worker-a died: its lease lapses
    assert store.unleased_chunks(job_id) == [0, 1, 2]
    second = store.acquire_chunk(job_id, 1, "worker-b", ttl_s=5)
    assert (second.outcome, second.attempts) == ("acquired", 2)
    assert not store.renew_chunk(job_id, 1, "worker-a", ttl_s=5)  # the old holder is told
    job = store.get(job_id)
    late = store.record_chunk(job, 1, "worker-a", 1, [_ok(i) for i in range(4, 8)])
    assert late.outcome == "lost"  # fenced: its part is never read
    assert store.get(job_id).done == 0
    assert store.record_chunk(job, 1, "worker-b", 2, [_ok(i) for i in range(4, 8)]).outcome == (
        "recorded"
    )
    store.release_chunk(job_id, 1, "worker-b")
    assert store.acquire_chunk(job_id, 1, "worker-c", ttl_s=5).outcome == "done"
    assert store.unleased_chunks(job_id) == [0, 2]


def test_a_finished_job_is_deleted_after_retention_and_redis_returns_to_baseline(
    store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "_PURGE_AGAIN_S", 0.0)  # a purged prefix's second look
    watchdog = _watchdog(store, retention_s=2.0)
    warm_up = _create(store, 1, 1, tmp_path / "warm-up")  # loads the scripts, opens connections
    record_chunks(store, warm_up)
    store.finish(warm_up, [])
    store.delete(warm_up)
    watchdog.sweep()
    # Bytes by MEMORY USAGE over the keys: Redis's used_memory moves by tens of kilobytes
    # with its clients' buffers and allocator, more than these jobs' records weigh.
    keys_before = set(store.redis.keys("*"))
    baseline = _memory(store, keys_before)
    job_ids = [_create(store, 300, 64, tmp_path / str(n)) for n in range(20)]
    for job_id in job_ids:
        record_chunks(store, job_id)
        store.finish(job_id, [])
    assert store.state_counts()[JobState.SUCCEEDED] == 20
    grown = _memory(store, set(store.redis.keys("*"))) - baseline
    assert watchdog.sweep().deleted == 0
    time.sleep(2.1)
    report = watchdog.sweep()
    assert report.deleted == 20, report
    assert store.state_counts()[JobState.SUCCEEDED] == 0
    assert watchdog.sweep().purged == 0  # their prefixes' second look: nothing written since
    left = {k for k in store.redis.keys("*") if not k.startswith(b"perito:watchdog")}
    assert left <= keys_before
    left_over = _memory(store, left) - baseline
    assert grown > 20 * 500 and left_over <= 0, (grown, left_over)
    with pytest.raises(NotFound):
        store.get(job_ids[0])
    # Their inputs and parts are purged by the same sweeps: nothing left of their data.
    assert report.purged == 20 * 2 * 5  # 5 chunks each: 5 inputs files, 5 parts
    assert not any(list((tmp_path / str(n) / "job-data" / "_").iterdir()) for n in range(20))


def test_the_watchdog_resends_only_chunks_nobody_runs_or_has_queued(
    store: JobStore, tmp_path: Path
) -> None:
    job_id = _create(store, 10, 4, tmp_path)  # chunks 0, 1, 2; none was ever enqueued
    watchdog = _watchdog(store)
    watchdog.celery.send_task(
        "perito.classify_chunk",
        kwargs={"job_id": job_id, "chunk": 0, "start": 0, "stop": 4},
        queue=BULK_QUEUE,
    )
    store.acquire_chunk(job_id, 1, "live-worker", ttl_s=60)
    assert queued_chunks(watchdog.broker) == {(job_id, 0)}
    first = watchdog.sweep()
    assert (first.resent, first.suspects) == (0, 1)  # seen once: a suspect, not yet lost
    second = watchdog.sweep()
    assert second.resent == 1  # chunk 2 only: 0 is queued, 1 is running
    assert queued_chunks(watchdog.broker) == {(job_id, 0), (job_id, 2)}
    assert watchdog.sweep().resent == 0


def test_the_watchdog_finishes_a_complete_job_nobody_finalised(
    store: JobStore, tmp_path: Path
) -> None:
    job_id = _create(store, 6, 4, tmp_path / "out")
    record_chunks(store, job_id)  # the worker died before finalising
    assert store.get(job_id).state is JobState.QUEUED
    watchdog = _watchdog(store, finalize_grace_s=60)
    assert watchdog.sweep().finalized == 0  # the worker that recorded the last item finalises
    watchdog.finalize_grace_s = 0  # ... unless it died: then the watchdog does
    assert watchdog.sweep().finalized == 1
    job = store.get(job_id)
    assert job.state is JobState.SUCCEEDED
    assert (tmp_path / "out" / "results.jsonl").read_text().count("\n") == 6


def test_results_that_cannot_be_written_end_the_job_failed_with_the_reason(
    store: JobStore, tmp_path: Path
) -> None:
    from perito_core.errors import StorageUnavailable
    from perito_core.jobs.results import finalize_job
    from tests.helpers import free_port

    def complete(n: int, output_uri: str) -> str:
        items = (ItemInput(id=str(i), uri=f"s3://b/{i}.jpg") for i in range(n))
        data_root = str(tmp_path / "job-data")
        job, _ = create_job(store, items, output_uri=output_uri, chunk_size=4, data_root=data_root)
        record_chunks(store, job.id)
        return job.id

    nobody = S3Options(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1)
    job_id = complete(3, "s3://results/x")  # an S3 server nobody runs: it may come back
    for _ in range(2):  # an outage is retried, within the time allowed
        with pytest.raises(StorageUnavailable, match="object storage is unreachable"):
            finalize_job(store, job_id, nobody, give_up_after_s=60)
    assert store.get(job_id).state is JobState.QUEUED
    job = finalize_job(store, job_id, nobody, give_up_after_s=0)  # third try, time is up
    assert job.state is JobState.FAILED
    assert job.error.startswith("results could not be written: object storage is unreachable")
    assert "3 tries" in job.error
    assert [r.state for r in store.results(job_id, 0, 3)] == [ItemState.SUCCEEDED] * 3
    watchdog = _watchdog(store)  # and a failing write is not retried at every sweep
    watchdog.s3 = nobody
    other = complete(1, "s3://results/other")
    assert watchdog.sweep().finalized == 0  # first try failed (counted as an error)
    assert store.get(other).finalize_attempts == 1
    watchdog.sweep()
    assert store.get(other).finalize_attempts == 1  # backing off


def test_a_redis_that_evicts_keys_is_refused_unless_allowed(store: JobStore) -> None:
    from perito_server.jobs import check_no_eviction

    check_no_eviction(store.redis, "job store", allowed=False)  # noeviction: fine
    store.redis.config_set("maxmemory-policy", "allkeys-lru")
    with pytest.raises(RuntimeError, match=r"allkeys-lru.*noeviction"):
        check_no_eviction(store.redis, "job store", allowed=False)
    check_no_eviction(store.redis, "job store", allowed=True)  # logged, not refused


def test_one_watchdog_sweeps_at_a_time_and_another_takes_over_when_it_stops(
    store: JobStore,
) -> None:
    first, second = _watchdog(store), _watchdog(store)  # two servers' watchdogs, 0.1 s apart
    assert first.sweep().ran
    assert not second.sweep().ran  # the lock is the first's (two intervals, 1 s at least)
    assert first.sweep().ran  # renewed by its holder
    time.sleep(1.1)  # the first server stopped sweeping: its lock lapses (1 s at least)
    assert second.sweep().ran
    assert not first.sweep().ran


def _failed_every_third(index: int) -> ItemResult:
    if index % 3:
        return _ok(index)
    return ItemResult(index, ItemState.FAILED, error="NOT_FOUND: gone")


def test_closing_a_chunk_records_its_part_once_and_only_for_the_lease_holder(
    store: JobStore, tmp_path: Path
) -> None:
    job_id = _create(store, 10, 4, tmp_path)  # chunks 0..2 (4, 4, 2)
    job = store.get(job_id)
    results = [_failed_every_third(i) for i in range(4, 8)]
    assert store.record_chunk(job, 1, "nobody", 1, results).outcome == "lost"  # no lease
    lease = store.acquire_chunk(job_id, 1, "worker-a", ttl_s=60)
    with pytest.raises(InvalidArgument, match="must be its items 4 to 7"):
        store.record_chunk(job, 1, "worker-a", lease.attempts, results[:3])
    record = store.record_chunk(job, 1, "worker-a", lease.attempts, results)
    assert (record.outcome, record.complete) == ("recorded", False)
    after = store.get(job_id)
    assert (after.succeeded, after.failed, after.done) == (3, 1, 4)
    assert store.redis.hget(job_key(job_id), "progress_at")  # the stuck-jobs metric
    assert store.chunk_slots(job_id, 0, 2) == [ChunkSlot(), ChunkSlot(1, 1), ChunkSlot()]
    # The same close again (redis-py's retry of a script whose first run closed the chunk,
    # its answer lost) reads as recorded; another attempt's (a redelivery that got as far)
    # as done. Neither changes anything.
    again = store.record_chunk(job, 1, "worker-a", lease.attempts, results)
    assert again.outcome == "recorded" and store.get(job_id).done == 4
    other = store.record_chunk(job, 1, "worker-a", lease.attempts + 1, results)
    assert other.outcome == "done" and store.get(job_id).done == 4
    assert store.acquire_chunk(job_id, 1, "worker-b", ttl_s=60).outcome == "done"
    # What a running chunk kept in Redis goes with it: lease, attempts, error.
    for part in ("leases", "attempts", "chunk-errors"):
        assert not store.redis.hexists(job_key(job_id, part), "1")
    assert [r.state for r in store.results(job_id, 3, 6)] == [
        ItemState.PENDING,
        ItemState.SUCCEEDED,
        ItemState.SUCCEEDED,
        ItemState.FAILED,
        ItemState.SUCCEEDED,
        ItemState.PENDING,
    ]
    assert store.results(job_id, 6, 1)[0].error == "NOT_FOUND: gone"
    assert record_chunks(store, job_id, _failed_every_third, chunks=[0, 2])  # now complete
    store.finish(job_id, [])
    assert store.record_chunk(job, 0, "worker-z", 1, [_ok(i) for i in range(4)]).outcome == (
        "terminal"
    )


def test_pages_of_one_state_pass_over_chunks_without_it_by_their_tallies(
    store: JobStore, tmp_path: Path
) -> None:
    job_id = _create(store, 1000, 10, tmp_path)  # 100 chunks
    failing = {15, 16, 17, 950}
    record_chunks(
        store,
        job_id,
        lambda i: ItemResult(i, ItemState.FAILED, error="x") if i in failing else _ok(i),
    )
    job = store.get(job_id)
    store._files = type(store._files)(16)  # an empty cache: count what is read
    read: list[int] = []
    real = store.chunk_results

    def counted(job: Job, chunk: int, slot: ChunkSlot) -> list[ItemResult]:
        read.append(chunk)
        return real(job, chunk, slot)

    store.chunk_results = counted  # type: ignore[method-assign]
    page, position = store.page_results(job, 0, 2, ItemState.FAILED)
    assert ([r.index for r in page], position) == ([15, 16], 17)
    page, position = store.page_results(job, position, 2, ItemState.FAILED)
    assert ([r.index for r in page], position) == ([17, 950], 951)
    page, position = store.page_results(job, position, 2, ItemState.FAILED)
    assert (page, position) == ([], 1000)
    assert read == [1, 1, 95, 95]  # the parts holding failures; none of the other 98
    page, position = store.page_results(job, 995, 10)
    assert ([r.index for r in page], position) == ([995, 996, 997, 998, 999], 1000)


def test_a_cancel_closes_open_chunks_per_chunk_and_a_late_part_is_refused(
    store: JobStore, tmp_path: Path
) -> None:
    job_id = _create(store, 10, 4, tmp_path)
    record_chunks(store, job_id, chunks=[0])
    job = store.get(job_id)
    running = store.acquire_chunk(job_id, 1, "worker-a", ttl_s=60)
    store.request_cancel(job_id)
    assert store.mark_unrecorded(job_id, ItemState.CANCELLED, "") == 6
    late = store.record_chunk(job, 1, "worker-a", running.attempts, [_ok(i) for i in range(4, 8)])
    assert (late.outcome, late.complete) == ("done", True)  # refused; every item accounted for
    after = store.get(job_id)
    assert (after.succeeded, after.cancelled) == (4, 6)
    assert [r.state for r in store.results(job_id, 0, 10)] == [ItemState.SUCCEEDED] * 4 + [
        ItemState.CANCELLED
    ] * 6
    assert store.recorded_items(after) == 10
    assert store.mark_unrecorded(job_id, ItemState.FAILED, "too late") == 0  # nothing open


def test_a_model_that_cannot_load_fails_every_open_chunk_with_its_reason(
    store: JobStore, tmp_path: Path
) -> None:
    job_id = _create(store, 10, 4, tmp_path)
    store.set_job_error(job_id, "model m@1 cannot be used: gone")
    assert store.mark_unrecorded(job_id, ItemState.FAILED, "model m@1 cannot be used: gone") == 10
    results = store.results(job_id, 0, 10)
    assert {(r.state, r.error) for r in results} == {
        (ItemState.FAILED, "model m@1 cannot be used: gone")
    }
    assert [r.uri for r in results] == [f"s3://b/{i}.jpg" for i in range(10)]


def test_inline_images_stay_in_redis_only_until_their_chunk_is_closed(
    store: JobStore, tmp_path: Path
) -> None:
    items = [ItemInput(id=str(i)) for i in range(6)]
    job, _ = store.create(
        model="m",
        model_version="1",
        items=items,
        inline={i: b"image %d" % i for i in range(6)},
        output_uri=str(tmp_path / "out"),
        top_k=1,
        confidence_threshold=0,
        chunk_size=4,
        labels={},
        data_root=str(tmp_path / "job-data" / "_" / "inline"),
    )
    assert store.inline_image(job.id, 5) == b"image 5"
    record_chunks(store, job.id, chunks=[0])
    assert [store.inline_image(job.id, i) for i in range(6)] == [None] * 4 + [
        b"image 4",
        b"image 5",
    ]


def test_a_refused_submission_leaves_no_inputs_files_nor_a_purge_to_do(
    store: JobStore, tmp_path: Path
) -> None:
    def listed_then_refused() -> Iterator[ItemInput]:
        for n in range(25):
            yield ItemInput(id=str(n), uri=f"s3://b/{n}")
        raise InvalidArgument("manifest line 26: not a URI", field="manifest_uri")

    with pytest.raises(InvalidArgument, match="line 26"):
        _submit(store, listed_then_refused(), 10, tmp_path)  # two inputs files written
    assert list((tmp_path / "job-data" / "_").iterdir()) == []
    assert store.redis.keys("*") == []


def test_redis_holds_at_most_16_bytes_per_item_once_chunks_are_done(
    store: JobStore, tmp_path: Path
) -> None:
    """MEMORY USAGE over every key of a 20,000-item job, each item's result as a worker
    writes it (predictions, quality, sha256): 578 bytes an item when Redis held the inputs
    list and every result; now the record and 4 bytes a chunk."""
    from perito_core.quality import Quality, QualityMeasures

    quality = Quality(QualityMeasures(812.3, 0.012, 0.004, 121.7, 48.2, 4032, 3024, 12.6), ())

    def answered(index: int) -> ItemResult:
        return ItemResult(
            index,
            ItemState.SUCCEEDED,
            predictions=[("moderate", 1, 0.71234), ("minor", 0, 0.2012), ("severe", 2, 0.0864)],
            margin=0.511,
            normalized_entropy=0.6712,
            form="openvino-int8",
            input_sha256=f"{index:064x}",
            quality=quality,
        )

    total = 20_000
    items = (
        ItemInput(f"IMG_{i:06d}.jpg", f"s3://inspections/2024/site-{i // 500:04d}/IMG_{i:06d}.jpg")
        for i in range(total)
    )
    job, _ = _submit(store, items, 64, tmp_path)

    def per_item() -> float:
        keys = set(store.redis.keys(job_keys_pattern(job.id)))
        return _memory(store, keys) / total

    queued = per_item()
    record_chunks(store, job.id, answered)
    done = per_item()
    print(f"Redis bytes per item: {queued:.2f} queued, {done:.2f} with every chunk done")
    assert store.get(job.id).succeeded == total
    assert done <= 16, done
    assert store.results(job.id, 12_345, 1)[0].quality == quality


def test_a_listing_slower_than_the_hour_keeps_its_inputs_and_its_quota_slot(
    store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submission's purge and its tenant's slot are pushed on with each inputs file, so a
    listing longer than their hour (here 1 s) loses neither while it runs."""
    monkeypatch.setattr(store_module, "_BUILDING_TTL_S", 1.0)
    job_id = "slow-listing"
    assert store.reserve_slot("acme", job_id, 1)

    def slow() -> Iterator[ItemInput]:
        started = time.monotonic()
        for i in range(12):
            time.sleep(0.25)  # a file every 0.5 s, the listing 3 s: three of those hours
            if time.monotonic() - started > 1.5:
                assert store.purge_job_data(100) == (0, 0)  # not due: the listing goes on
                assert not store.reserve_slot("acme", "another", 1)  # its slot still held
            yield ItemInput(id=str(i), uri=f"s3://b/{i}.jpg")

    job, created = _submit(store, slow(), 2, tmp_path, job_id=job_id, tenant="acme")
    assert created
    assert [item.id for item in store.chunk_inputs(job, 0)] == ["0", "1"]


def test_a_prefix_that_cannot_be_purged_is_put_off_and_the_others_are_purged(
    store: JobStore, tmp_path: Path
) -> None:
    unpurgeable = json.dumps(["elsewhere", "nope://bucket/elsewhere"])  # no such storage
    store.redis.zadd(PURGE_KEY, {unpurgeable: time.time() - 10})  # due first
    job_id = _create(store, 4, 2, tmp_path)
    record_chunks(store, job_id)
    store.finish(job_id, [])
    assert store.delete(job_id)
    assert store.purge_job_data(100) == (4, 1)  # 2 inputs files and 2 parts
    assert (store.redis.zscore(PURGE_KEY, unpurgeable) or 0) > time.time() + 60  # tried later


def test_a_part_written_after_its_job_was_deleted_is_purged_by_a_second_look(
    store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose lease was renewed just before the job's deletion may write its part
    after the purge: the prefix is purged once more a while later."""
    job_id = _create(store, 4, 2, tmp_path)
    record_chunks(store, job_id)
    job = store.finish(job_id, [])
    assert store.delete(job_id)
    assert store.purge_job_data(100) == (4, 1)
    store.job_data(job).write_part(0, 2, [_ok(0), _ok(1)])  # the late worker's part
    assert store.purge_job_data(100) == (0, 0)  # the second look is not due yet
    monkeypatch.setattr(store_module, "_PURGE_AGAIN_S", 0.0)
    [again] = store.redis.zrange(PURGE_KEY, 0, -1)
    store.redis.zadd(PURGE_KEY, {again: 0}, xx=True)
    assert store.purge_job_data(100) == (1, 1)
    assert not list(tmp_path.rglob("*.jsonl")) and not store.redis.exists(PURGE_KEY)


def test_a_chunk_given_up_on_closes_failed_without_a_part_with_its_own_reason(
    store: JobStore, tmp_path: Path
) -> None:
    """Its last attempt used, a chunk closes in Redis alone (object storage may refuse every
    write): each of its items FAILED with the chunk's reason, for the lease holder only."""
    job_id = _create(store, 6, 2, tmp_path)
    job = store.get(job_id)
    lease = store.acquire_chunk(job_id, 1, "worker-a", ttl_s=60)
    assert lease.outcome == "acquired"
    assert store.fail_chunk(job, 1, "worker-b", "given up").outcome == "lost"
    record = store.fail_chunk(job, 1, "worker-a", "chunk 1: given up")
    assert (record.outcome, record.complete) == ("recorded", False)
    assert store.fail_chunk(job, 1, "worker-a", "chunk 1: given up").outcome == "recorded"
    assert (store.get(job_id).failed, store.get(job_id).done) == (2, 2)  # counted once
    assert not list(tmp_path.rglob("parts/*"))  # no part written
    assert store.chunk_slots(job_id, 1, 1)[0].count(ItemState.FAILED, 2) == 2
    assert store.chunk_failure(job_id, 1) == "chunk 1: given up"
    # Another chunk failed by the job's error keeps that one.
    store.mark_unrecorded(job_id, ItemState.FAILED, "the model cannot be used")
    results = store.results(job_id, 0, 6)
    assert [r.state for r in results] == [ItemState.FAILED] * 6
    assert [r.error for r in results] == ["the model cannot be used"] * 2 + [
        "chunk 1: given up"
    ] * 2 + ["the model cannot be used"] * 2
    assert [r.id for r in results[2:4]] == ["2", "3"]
    assert store.recorded_items(store.get(job_id)) == 6


def test_a_close_whose_tallies_are_not_the_chunks_items_changes_nothing(
    store: JobStore, tmp_path: Path
) -> None:
    job_id = _create(store, 4, 2, tmp_path)
    store.acquire_chunk(job_id, 0, "worker-a", ttl_s=60)
    record = store._close_chunk(job_id, 0, "worker-a", 1, 2, 1, 0)  # 3 of a chunk of 2
    assert record.outcome == "mismatch"
    assert store.get(job_id).done == 0 and store.chunk_slots(job_id, 0, 0) == [ChunkSlot()]


def test_a_cancel_whose_server_died_before_closing_the_chunks_ends_cancelled(
    store: JobStore, tmp_path: Path
) -> None:
    job_id = _create(store, 6, 2, tmp_path / "out")
    record_chunks(store, job_id, chunks=[0])
    store.request_cancel(job_id)  # ... and the server died before `mark_unrecorded`
    watchdog = _watchdog(store)
    report = watchdog.sweep()  # closes its open chunks, their items cancelled
    assert report.errors == [] and report.resent == 0 and store.get(job_id).done == 6
    assert watchdog.sweep().finalized == 1
    job = store.get(job_id)
    assert (job.state, job.succeeded, job.cancelled) == (JobState.CANCELLED, 2, 4)


def test_a_part_replaced_by_another_writer_of_its_attempt_is_never_served(
    store: JobStore, tmp_path: Path
) -> None:
    """Two holders of one attempt number (a failover that lost an acquire) write one key: a
    part whose failures are not what the store recorded is refused, naming it."""
    job_id = _create(store, 4, 2, tmp_path)
    record_chunks(store, job_id, chunks=[0])
    job = store.get(job_id)
    [slot] = store.chunk_slots(job_id, 0, 0)
    store.job_data(job).write_part(0, slot.mark, [_failed_every_third(0), _ok(1)])
    with pytest.raises(JobDataMissing, match=r"parts/00000000-1\.jsonl .* 1 failed items"):
        store.results(job_id, 0, 2)
