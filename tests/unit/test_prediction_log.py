"""The prediction log's writer and retention (pure logic over a local folder): one CloudEvent
per answer, each photo stored once by its sha256, a bounded queue that drops and counts rather
than waits, a failing store that costs dropped records only, and the tenants file's rule that
a tenant's log lies in its own storage and in no other tenant's."""

from __future__ import annotations

import hashlib
import json
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from perito_core.access.tenancy import hash_token, parse_tenants
from perito_core.errors import InvalidArgument
from perito_core.prediction_log import (
    EVENT_TYPE,
    QUEUE_FULL,
    RECORD_ERROR,
    SHUTDOWN,
    STORAGE_ERROR,
    InputRef,
    LogEntry,
    PredictionLog,
    StoreBackoff,
    input_key,
    parse_duration,
    read_events,
    records_key,
    sweep_log,
)
from perito_core.storage import LocalStore, ObjectStore


def entry(root: Path, *images: bytes, tenant: str = "acme", **fields: Any) -> LogEntry:
    def build(refs: list[InputRef]) -> dict[str, Any]:
        return {"tenant": tenant, "inputs": [ref.as_json() for ref in refs], "outcome": "OK"}

    return LogEntry(
        tenant=tenant,
        uri=str(root),
        inputs=list(images),
        build=build,
        subject="tiny",
        nbytes=sum(map(len, images)),
        **fields,
    )


def records(root: Path) -> list[dict[str, Any]]:
    return [
        event
        for path in sorted((root / "records").rglob("*.jsonl"))
        for event in read_events(path.read_text())
    ]


def inputs(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "inputs").rglob("*") if p.is_file()}


def local_log(**options: Any) -> PredictionLog:
    return PredictionLog(lambda uri: LocalStore(Path(uri)), flush_s=0.05, **options)


def test_a_repeated_photo_is_stored_once_and_every_answer_is_a_cloudevent(tmp_path: Path) -> None:
    red, blue = b"red photo bytes", b"blue photo bytes"
    writer = local_log()
    writer.start()
    for images in ((red,), (red, blue), (blue,)):
        assert writer.submit(entry(tmp_path, *images))
    assert writer.flush(10)
    writer.close()

    stored = inputs(tmp_path)
    digest = {hashlib.sha256(b).hexdigest(): b for b in (red, blue)}
    assert stored == digest  # two files, each named by the sha256 of its bytes
    for sha in digest:
        assert (tmp_path / input_key(sha)).is_file()
        assert input_key(sha) == f"inputs/sha256/{sha[:2]}/{sha}"

    events = records(tmp_path)
    assert len(events) == 3
    assert {e["specversion"] for e in events} == {"1.0"}
    assert {e["type"] for e in events} == {EVENT_TYPE}
    assert {e["subject"] for e in events} == {"tiny"}
    assert len({e["id"] for e in events}) == 3
    named = [[ref["sha256"] for ref in e["data"]["inputs"]] for e in events]
    sha = {b: hashlib.sha256(b).hexdigest() for b in (red, blue)}
    assert named == [[sha[red]], [sha[red], sha[blue]], [sha[blue]]]
    assert writer.counts() == ({"acme": 3}, {"acme": 2}, {})


def test_records_files_are_in_utc_hour_folders(tmp_path: Path) -> None:
    when = datetime(2025, 3, 4, 5, 59, tzinfo=UTC)
    writer = local_log()
    writer.start()
    writer.submit(entry(tmp_path, b"x", time=when))
    assert writer.flush(10)
    writer.close()
    (path,) = (tmp_path / "records").rglob("*.jsonl")
    assert path.parent == tmp_path / "records" / "2025" / "03" / "04" / "05"
    assert records(tmp_path)[0]["time"].startswith("2025-03-04T05:59:00")


class DownStore:
    """A store whose every call fails, as S3 does when its server is stopped."""

    description = "s3://down/log/"

    def __getattr__(self, name: str) -> Any:
        def fail(*args: object, **kwargs: object) -> None:
            raise OSError("connection refused")

        return fail


def test_a_store_that_is_down_drops_and_counts_records_and_never_blocks_a_caller() -> None:
    store: ObjectStore = DownStore()  # type: ignore[assignment]
    writer = PredictionLog(lambda uri: store, flush_s=0.05)
    writer.start()
    started = time.monotonic()
    accepted = [writer.submit(entry(Path("/down"), bytes([n]))) for n in range(50)]
    submitting = time.monotonic() - started
    assert all(accepted)
    assert writer.flush(10)
    writer.close()
    assert writer.counts() == ({}, {}, {("acme", STORAGE_ERROR): 50})
    assert submitting < 1.0  # 50 appends to a queue, whatever the store does


def test_a_failed_store_rests_one_second_doubling_to_a_minute_and_a_success_forgets_it() -> None:
    now = [100.0]
    backoff = StoreBackoff(clock=lambda: now[0])
    assert backoff.available("s3://a/")
    rests = []
    for _ in range(9):
        rests.append(backoff.failed("s3://a/"))
        assert not backoff.available("s3://a/")
        assert backoff.available("s3://b/")  # each prefix rests on its own
        now[0] += rests[-1] - 0.01
        assert not backoff.available("s3://a/")
        now[0] += 0.01
        assert backoff.available("s3://a/")
    assert rests == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    backoff.succeeded("s3://a/")
    assert backoff.available("s3://a/")
    assert backoff.failed("s3://a/") == 1


class FlakyStore(LocalStore):
    """A local folder that fails every call while `down`, counting the calls it gets."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.down = True
        self.calls = 0

    def exists(self, key: str) -> bool:
        self.calls += 1
        if self.down:
            raise OSError("connection refused")
        return super().exists(key)

    def write_bytes(self, key: str, data: bytes) -> None:
        self.calls += 1
        if self.down:
            raise OSError("connection refused")
        super().write_bytes(key, data)


def test_a_dead_store_is_left_alone_while_it_rests_and_its_records_are_never_built(
    tmp_path: Path,
) -> None:
    now = [0.0]
    store = FlakyStore(tmp_path)
    writer = PredictionLog(
        lambda uri: store, flush_s=0.01, backoff=StoreBackoff(clock=lambda: now[0])
    )
    built = [0]

    def counted(*images: bytes) -> LogEntry:
        submitted = entry(tmp_path, *images)
        build = submitted.build

        def counting(refs: list[InputRef]) -> dict[str, Any]:
            built[0] += 1
            return build(refs)

        submitted.build = counting
        return submitted

    writer.start()
    for n in range(6):  # six batches, one at a time: the first fails, the rest come due resting
        writer.submit(counted(bytes([n])))
        assert writer.flush(10)
    assert store.calls == 1
    assert built[0] == 0
    assert writer.counts() == ({}, {}, {("acme", STORAGE_ERROR): 6})

    now[0] += 1.0  # the rest is over and the store is back: written again
    store.down = False
    writer.submit(counted(b"back"))
    assert writer.flush(10)
    writer.close()
    assert writer.counts()[0] == {"acme": 1}
    assert [e["data"]["inputs"][0]["bytes"] for e in records(tmp_path)] == [4]


def test_inputs_given_with_their_sha256_are_stored_under_it_unhashed_again(tmp_path: Path) -> None:
    pixels = memoryview(bytes(range(12)))  # an OIP image's [2, 2, 3] bytes, as a view
    digest = hashlib.sha256(pixels).hexdigest()
    writer = local_log()
    writer.submit(entry(tmp_path, b"photo", input_sha256=["0" * 64]))
    writer.submit(entry(tmp_path, pixels, input_sha256=[digest]))  # type: ignore[arg-type]
    writer.start()  # both in one batch, one records file, in order
    assert writer.flush(10)
    writer.close()
    assert inputs(tmp_path) == {"0" * 64: b"photo", digest: bytes(range(12))}
    refs = [e["data"]["inputs"][0] for e in records(tmp_path)]
    assert refs == [
        {"sha256": "0" * 64, "key": input_key("0" * 64), "bytes": 5},
        {"sha256": digest, "key": input_key(digest), "bytes": 12},
    ]


def test_a_full_queue_refuses_without_waiting_and_counts_by_tenant(tmp_path: Path) -> None:
    writer = local_log(max_records=2)  # not started: nothing leaves the queue
    assert writer.submit(entry(tmp_path, b"1"))
    assert writer.submit(entry(tmp_path, b"2", tenant="globex"))
    assert not writer.submit(entry(tmp_path, b"3"))
    assert not writer.submit(entry(tmp_path, b"4", tenant="globex"))
    assert writer.queued == (2, 2)
    writer.close(0)  # what is still queued at shutdown is counted too
    assert writer.counts()[2] == {
        ("acme", QUEUE_FULL): 1,
        ("globex", QUEUE_FULL): 1,
        ("acme", SHUTDOWN): 1,
        ("globex", SHUTDOWN): 1,
    }
    assert not writer.submit(entry(tmp_path, b"5"))  # closed: refused and counted
    assert writer.counts()[2][("acme", SHUTDOWN)] == 2
    assert not (tmp_path / "records").exists()


def test_the_queue_is_bounded_in_bytes_too(tmp_path: Path) -> None:
    writer = local_log(max_bytes=10)
    assert writer.submit(entry(tmp_path, b"12345678"))
    assert not writer.submit(entry(tmp_path, b"123"))
    assert writer.counts()[2] == {("acme", QUEUE_FULL): 1}


def test_a_record_that_cannot_be_built_is_counted_and_the_batch_written(tmp_path: Path) -> None:
    def broken(refs: list[InputRef]) -> dict[str, Any]:
        raise ValueError("a bug")

    writer = local_log()
    bad = entry(tmp_path, b"bad")
    bad.build = broken
    writer.submit(entry(tmp_path, b"good"))
    writer.submit(bad)
    writer.start()
    assert writer.flush(10)
    writer.close()
    assert len(records(tmp_path)) == 1
    assert writer.counts()[2] == {("acme", RECORD_ERROR): 1}


def write_records(store: LocalStore, when: datetime, *digests: str) -> str:
    key = records_key(when, f"batch-{when:%d%H}")
    lines = [
        json.dumps(
            {
                "specversion": "1.0",
                "id": f"{when:%d%H}-{n}",
                "source": "/perito",
                "type": EVENT_TYPE,
                "data": {"inputs": [{"sha256": d, "key": input_key(d), "bytes": 1}]},
            }
        )
        for n, d in enumerate(digests)
    ]
    store.write_bytes(key, ("\n".join(lines) + "\n").encode())
    for digest in digests:
        store.write_bytes(input_key(digest), b"x")
    return key


def test_retention_deletes_old_records_and_then_the_photos_only_they_named(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    now = datetime(2025, 6, 1, 12, 30, tzinfo=UTC)
    old_only, shared, new_only = "a" * 64, "b" * 64, "c" * 64
    old = write_records(store, now - timedelta(days=10), old_only, shared)
    kept = write_records(store, now - timedelta(hours=2), shared, new_only)
    suspects: set[str] = set()

    assert sweep_log(store, timedelta(days=1).total_seconds(), suspects, now) == (1, 0)
    assert not store.exists(old) and store.exists(kept)
    assert store.exists(input_key(old_only))  # one sweep may see it between its two writes
    assert sweep_log(store, timedelta(days=1).total_seconds(), suspects, now) == (0, 1)
    assert not store.exists(input_key(old_only))
    assert store.exists(input_key(shared)) and store.exists(input_key(new_only))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (90, 90.0),
        ("90", 90.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("24h", 86400.0),
        ("400d", 400 * 86400.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, "retention") == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1d", "0", True, None, "1w"])
def test_bad_durations_are_refused_naming_the_setting(text: object) -> None:
    with pytest.raises(InvalidArgument, match="retention"):
        parse_duration(text, "retention")


def tenants_yaml(acme_log: str, globex: dict[str, Any] | None = None) -> str:
    globex = globex or {"write": ["s3://results/globex/"]}
    return textwrap.dedent(
        f"""\
        tenants:
          - name: acme
            tokens: ["{hash_token("a")}"]
            roles: [classify]
            storage: {{write: ["s3://results/acme/"]}}
            prediction_log: {{uri: "{acme_log}", retention: 400d}}
          - name: globex
            tokens: ["{hash_token("g")}"]
            roles: [classify, jobs]
            storage: {json.dumps(globex)}
        """
    )


def test_a_tenants_log_is_read_from_the_tenants_file() -> None:
    acme, globex = parse_tenants(tenants_yaml("s3://results/acme/prediction-log/"))
    assert acme.prediction_log is not None
    assert acme.prediction_log.uri == "s3://results/acme/prediction-log/"
    assert acme.prediction_log.retention_s == 400 * 86400
    assert globex.prediction_log is None  # off unless switched on


@pytest.mark.parametrize(
    "uri", ["s3://results/globex/log/", "s3://results/", "s3://other/log/", "/var/log/acme"]
)
def test_a_tenant_cannot_point_its_log_outside_its_own_storage(uri: str) -> None:
    with pytest.raises(InvalidArgument, match=r"acme.*prediction_log.uri.*outside"):
        parse_tenants(tenants_yaml(uri))


@pytest.mark.parametrize(
    "globex",
    [
        {"read": ["s3://results/acme/prediction-log/inputs/"]},
        {"read": ["s3://results/"]},
        {"write": ["s3://results/acme/"]},
    ],
)
def test_no_other_tenant_may_read_or_write_where_a_log_is(globex: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument, match="acme's prediction log") as refused:
        parse_tenants(tenants_yaml("s3://results/acme/prediction-log/", globex))
    assert "globex" in refused.value.message
