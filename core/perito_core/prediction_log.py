"""The prediction log: every answer and refusal, as CloudEvents, in the tenant's own storage.

A tenant's log (switched on per tenant in the tenants file, or by `prediction_log_uri` on a
server without one) lives under one prefix, `s3://bucket/prefix/` or a local folder:

    <prefix>/records/YYYY/MM/DD/HH/<batch-uuid>.jsonl      one CloudEvent per line (UTC hour)
    <prefix>/inputs/sha256/ab/abcdef0123...                 each image's bytes, once

Each line is a CloudEvents 1.0 event in structured JSON mode (`specversion`, `id`, `source`,
`type` = `dev.perito.classification.v1`, `time`, `datacontenttype` = `application/json`,
`subject` = the model, `data`). Each image is stored by the sha256 of its bytes, checked for
before it is written, so a photo sent twice is stored once; the record names it in
`data.inputs[i]` (`sha256`, `key`, `bytes`).

Writing is off the request path: `PredictionLog.submit` only appends to a bounded queue
(records and bytes) and never blocks; one background thread takes up to `batch_records` at a
time (or what came within `flush_s`), writes the batch's new inputs, then one records file per
tenant prefix. A full queue, or a batch whose storage fails, is dropped and counted by tenant
and reason (`dropped`), never retried and never seen by a caller. After a prefix's store fails,
it is not contacted again for a back-off (`StoreBackoff`: 1 s, doubling on each failure to
60 s, forgotten on a success): batches for it that come due meanwhile are dropped at once,
counted `storage_error` like the failed one, without their records being built, so that a dead
store costs nothing but the counts.

Retention (`sweep_log`): a records file whose hour ended more than the retention ago is
deleted; an input that no kept record names is deleted on the second sweep that finds it so
(an input is written just before its records file, so one sweep could see it between the two).
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from perito_core.digests import sha256_hex
from perito_core.errors import InvalidArgument, PeritoError
from perito_core.storage import ObjectStore

log = logging.getLogger(__name__)

EVENT_TYPE = "dev.perito.classification.v1"
DATA_CONTENT_TYPE = "application/json"
RECORDS = "records/"
INPUTS = "inputs/sha256/"
_RECORD_KEY = re.compile(r"^records/(\d{4})/(\d{2})/(\d{2})/(\d{2})/[^/]+\.jsonl$")
_FORMAT = JSONFormat()

# Why a record was not written (`perito_prediction_log_dropped_total{reason}`).
QUEUE_FULL = "queue_full"
STORAGE_ERROR = "storage_error"
RECORD_ERROR = "record_error"
SHUTDOWN = "shutdown"
LOCATION_REFUSED = "location_refused"


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str) -> float | None:
    """Seconds of duration text: `90` or `90s` (seconds), `15m`, `24h`, `400d`, in any case,
    spaces around ignored; None if `text` is not one. The value is not bounded here: zero,
    negative, NaN and infinity come back as they are, for the caller to refuse."""
    text = text.strip().lower()
    suffix = text[-1:]
    number, unit = (text[:-1], _DURATION_UNITS[suffix]) if suffix in _DURATION_UNITS else (text, 1)
    try:
        return float(number) * unit
    except ValueError:
        return None


def parse_duration(value: object, what: str) -> float:
    """Seconds of `value`: a number of seconds, or text `90`, `90s`, `15m`, `24h`, `400d`
    (`duration_seconds`).

    Raises:
        InvalidArgument: anything else, or not positive, naming `what`.
    """
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = duration_seconds(value)
    if seconds is None or not seconds > 0:
        raise InvalidArgument(f"{what} must be a positive duration: seconds, or 90s, 15m, 24h, 7d")
    return seconds


@dataclass(frozen=True)
class PredictionLogSetting:
    """Where one tenant's prediction log goes and how long it is kept.

    Attributes:
        uri: the log's prefix, `s3://bucket/prefix/` or an absolute local folder; it lies
            within the tenant's writable storage (checked when the tenants file is read).
        retention_s: seconds a record is kept; None: the server's `prediction_log_retention`.
    """

    uri: str
    retention_s: float | None = None


def input_key(sha256: str) -> str:
    """Where the image whose bytes have this sha256 (hex) is stored, under the log's prefix."""
    return f"{INPUTS}{sha256[:2]}/{sha256}"


def records_key(when: datetime, batch_id: str) -> str:
    """The records file of a batch begun at `when` (UTC hour folders)."""
    return f"{RECORDS}{when.astimezone(UTC):%Y/%m/%d/%H}/{batch_id}.jsonl"


def record_hour(key: str) -> datetime | None:
    """The UTC hour a records file's key names, or None for another key."""
    found = _RECORD_KEY.match(key)
    if found is None:
        return None
    year, month, day, hour = map(int, found.groups())
    try:
        return datetime(year, month, day, hour, tzinfo=UTC)
    except ValueError:
        return None


@dataclass(frozen=True)
class InputRef:
    """One stored image of a record: its sha256 (hex), key under the log's prefix, size."""

    sha256: str
    key: str
    bytes: int

    def as_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "key": self.key, "bytes": self.bytes}


@dataclass
class LogEntry:
    """One answer or refusal waiting to be written.

    Attributes:
        tenant: the tenant's name (its metrics label).
        uri: the tenant's log prefix.
        inputs: the images' bytes, as received (kept until written; counted in `nbytes`);
            a memoryview is read as its bytes (`len` is its size: format `B`, one dimension).
        build: (the stored inputs, in order) -> the event's `data`, called on the writer's
            thread, so that serializing the answer costs the caller nothing.
        subject: the event's `subject` (the model's name).
        source: the event's `source`.
        nbytes: what the entry holds in memory, for the queue's bound.
        input_sha256: each input's sha256 (hex), in order, when the caller already has them
            (provenance's); None: hashed on the writer's thread.
    """

    tenant: str
    uri: str
    inputs: Sequence[bytes | memoryview]
    build: Callable[[list[InputRef]], dict[str, Any]]
    subject: str = ""
    source: str = "/perito"
    nbytes: int = 0
    input_sha256: Sequence[str] | None = None
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


def event_json(entry: LogEntry, data: dict[str, Any]) -> str:
    """The entry as one line of CloudEvents structured JSON (no newline)."""
    attributes: dict[str, Any] = {
        "id": entry.id,
        "source": entry.source,
        "type": EVENT_TYPE,
        "specversion": "1.0",
        "time": entry.time,
        "datacontenttype": DATA_CONTENT_TYPE,
    }
    if entry.subject:
        attributes["subject"] = entry.subject
    return _FORMAT.write(CloudEvent(attributes, data)).decode()


def read_events(text: str) -> Iterator[dict[str, Any]]:
    """The events of a records file's text, each as its JSON object, checked as CloudEvents.

    Raises:
        InvalidArgument: a line that is not JSON or not a valid CloudEvent, naming its number.
    """
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            _FORMAT.read(None, line)  # validates the attributes (the SDK's rules)
            event: dict[str, Any] = json.loads(line)
        except Exception as exc:  # noqa: BLE001 - the SDK raises its own kinds and ValueError
            raise InvalidArgument(f"line {number}: not a CloudEvent: {exc}") from None
        yield event


class StoreBackoff:
    """When a log's store that failed may be contacted again (the writer's thread only).

    After a failure a prefix rests `first_s`; each further failure (a try after the rest that
    failed again) doubles the rest, up to `max_s`; a success forgets the prefix.

    Args:
        first_s: seconds of the first rest.
        max_s: seconds of the longest rest.
        clock: monotonic seconds (`time.monotonic`; tests pass their own).
    """

    def __init__(
        self,
        first_s: float = 1.0,
        max_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self._clock = clock
        self._resting: dict[str, tuple[float, float]] = {}  # uri -> (until, rest seconds)

    def available(self, uri: str) -> bool:
        """Whether `uri`'s store may be contacted now."""
        resting = self._resting.get(uri)
        return resting is None or self._clock() >= resting[0]

    def failed(self, uri: str) -> float:
        """Count a failure of `uri`'s store: the seconds it now rests."""
        previous = self._resting.get(uri)
        rest = self.first_s if previous is None else min(previous[1] * 2, self.max_s)
        self._resting[uri] = (self._clock() + rest, rest)
        return rest

    def succeeded(self, uri: str) -> None:
        """`uri`'s store answered: it is contacted freely again."""
        self._resting.pop(uri, None)


class PredictionLog:
    """The bounded queue and the thread that writes it (see the module docstring).

    Args:
        open_store: a prefix's URI -> its store (S3 options bound); called once per prefix.
        max_records: entries the queue holds at most.
        max_bytes: bytes (images and requests) the queue holds at most.
        batch_records: entries written in one batch at most.
        flush_s: how long the first entry of a batch waits for others.
        sweep_targets: () -> [(prefix URI, retention seconds)] to sweep, or None: no sweeps.
        sweep_interval_s: seconds between sweeps.
        backoff: when a failed store is tried again (`StoreBackoff()`: 1 s doubling to 60 s).
    """

    def __init__(
        self,
        open_store: Callable[[str], ObjectStore],
        *,
        max_records: int = 10_000,
        max_bytes: int = 256 * 1024 * 1024,
        batch_records: int = 1000,
        flush_s: float = 1.0,
        sweep_targets: Callable[[], Iterable[tuple[str, float]]] | None = None,
        sweep_interval_s: float = 3600.0,
        backoff: StoreBackoff | None = None,
    ) -> None:
        self._open_store = open_store
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.batch_records = batch_records
        self.flush_s = flush_s
        self._sweep_targets = sweep_targets
        self.sweep_interval_s = sweep_interval_s
        self.backoff = backoff or StoreBackoff()
        self._queue: collections.deque[LogEntry] = collections.deque()
        self._queued_bytes = 0
        self._lock = threading.Condition()
        self._stores: dict[str, ObjectStore] = {}
        # sha256s known to be stored, per prefix (saves an exists call per repeated photo).
        self._known: dict[str, collections.OrderedDict[str, None]] = {}
        self._suspects: dict[str, set[str]] = {}
        self._stopping = False
        self._busy = False  # a batch is being written
        self._thread: threading.Thread | None = None
        self._next_sweep = time.monotonic() + sweep_interval_s
        # Counters read by the metrics at scrape time: tenant -> n, (tenant, reason) -> n.
        self.written: collections.Counter[str] = collections.Counter()
        self.inputs_written: collections.Counter[str] = collections.Counter()
        self.dropped: collections.Counter[tuple[str, str]] = collections.Counter()

    @property
    def queued(self) -> tuple[int, int]:
        """(entries, bytes) waiting now."""
        with self._lock:
            return len(self._queue), self._queued_bytes

    def counts(
        self,
    ) -> tuple[dict[str, int], dict[str, int], dict[tuple[str, str], int]]:
        """Copies of (records written, inputs stored) by tenant and dropped by (tenant,
        reason), taken together."""
        with self._lock:
            return dict(self.written), dict(self.inputs_written), dict(self.dropped)

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
            self._thread.start()

    def drop(self, tenant: str, reason: str, count: int = 1) -> None:
        """Count `count` records of `tenant` not written, for `reason`."""
        with self._lock:
            self.dropped[(tenant, reason)] += count

    def submit(self, entry: LogEntry) -> bool:
        """Queue `entry` without waiting; False (and counted `queue_full`) when the queue
        has no room for it, or `shutdown` once closing began."""
        with self._lock:
            if self._stopping:
                self.dropped[(entry.tenant, SHUTDOWN)] += 1
                return False
            if (
                len(self._queue) >= self.max_records
                or self._queued_bytes + entry.nbytes > self.max_bytes
            ):
                self.dropped[(entry.tenant, QUEUE_FULL)] += 1
                return False
            self._queue.append(entry)
            self._queued_bytes += entry.nbytes
            # Wake the writer only for a batch's first entry or a full batch (it waits
            # `flush_s` for the rest), not on every call; flush() waiters share the condition.
            if len(self._queue) == 1 or len(self._queue) == self.batch_records:
                self._lock.notify_all()
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, for at most `timeout_s`; what is left then is counted
        `shutdown`. New entries are refused from now on."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._lock:
            for entry in self._queue:
                self.dropped[(entry.tenant, SHUTDOWN)] += 1
            self._queue.clear()
            self._queued_bytes = 0

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the queue is empty and its last batch written; whether it was in time."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.05))
        return True

    def _take(self) -> list[LogEntry]:
        """The next batch: waits for a first entry (or a sweep, or closing), then up to
        `flush_s` for more."""
        with self._lock:
            while not self._queue and not self._stopping:
                if self._sweep_targets is not None and time.monotonic() >= self._next_sweep:
                    return []
                self._lock.wait(0.5)
            first = time.monotonic()
            while (
                len(self._queue) < self.batch_records
                and not self._stopping
                and (left := first + self.flush_s - time.monotonic()) > 0
            ):
                self._lock.wait(left)
            batch = [
                self._queue.popleft() for _ in range(min(self.batch_records, len(self._queue)))
            ]
            self._busy = bool(batch)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch:
                try:
                    self._write(batch)
                finally:
                    with self._lock:
                        self._queued_bytes -= sum(entry.nbytes for entry in batch)
                        self._busy = False
                        self._lock.notify_all()
            elif self._stopping:
                return
            if self._sweep_targets is not None and time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + self.sweep_interval_s
                self.sweep_now()

    def sweep_now(self) -> None:
        """Sweep every target prefix once (`sweep_log`); failures are logged."""
        if self._sweep_targets is None:
            return
        for uri, retention_s in list(self._sweep_targets()):
            try:
                store = self._store(uri)
                suspects = self._suspects.setdefault(uri, set())
                deleted = sweep_log(store, retention_s, suspects)
                if any(deleted):
                    log.info(
                        "prediction log %s: retention deleted %d records files, %d inputs",
                        store.description,
                        *deleted,
                    )
            except (PeritoError, OSError) as exc:
                log.warning("prediction log %s: retention sweep failed: %s", uri, exc)

    def _store(self, uri: str) -> ObjectStore:
        store = self._stores.get(uri)
        if store is None:
            store = self._stores[uri] = self._open_store(uri)
        return store

    def _write(self, batch: list[LogEntry]) -> None:
        by_uri: dict[str, list[LogEntry]] = collections.defaultdict(list)
        for entry in batch:
            by_uri[entry.uri].append(entry)
        for uri, entries in by_uri.items():
            if not self.backoff.available(uri):
                # Its store failed a moment ago: dropped unbuilt, the store left alone.
                self._drop_all(entries, STORAGE_ERROR)
                continue
            try:
                self._write_prefix(uri, entries)
            except (PeritoError, OSError) as exc:
                rest = self.backoff.failed(uri)
                message = exc.message if isinstance(exc, PeritoError) else str(exc)
                log.warning(
                    "prediction log %s: %d records not written: %s; not tried again for %g s",
                    uri,
                    len(entries),
                    message,
                    rest,
                )
                self._drop_all(entries, STORAGE_ERROR)
            else:
                self.backoff.succeeded(uri)

    def _drop_all(self, entries: list[LogEntry], reason: str) -> None:
        with self._lock:
            for entry in entries:
                self.dropped[(entry.tenant, reason)] += 1

    def _write_prefix(self, uri: str, entries: list[LogEntry]) -> None:
        store = self._store(uri)
        known = self._known.setdefault(uri, collections.OrderedDict())
        lines: list[str] = []
        written: collections.Counter[str] = collections.Counter()
        new_inputs: collections.Counter[str] = collections.Counter()
        for entry in entries:
            refs = []
            digests = entry.input_sha256
            if digests is not None and len(digests) != len(entry.inputs):
                digests = None
            for index, content in enumerate(entry.inputs):
                digest = (digests[index] if digests else "") or sha256_hex(content)
                key = input_key(digest)
                if digest in known:
                    known.move_to_end(digest)
                elif store.exists(key):
                    known[digest] = None
                else:
                    store.write_bytes(key, bytes(content))
                    known[digest] = None
                    new_inputs[entry.tenant] += 1
                while len(known) > 100_000:
                    known.popitem(last=False)
                refs.append(InputRef(digest, key, len(content)))
            try:
                lines.append(event_json(entry, entry.build(refs)))
            except Exception:  # a record that cannot be built is a bug: counted, logged
                log.exception("prediction log: record %s could not be built", entry.id)
                with self._lock:
                    self.dropped[(entry.tenant, RECORD_ERROR)] += 1
                continue
            written[entry.tenant] += 1
        if lines:
            key = records_key(entries[0].time, uuid.uuid4().hex)
            store.write_bytes(key, ("\n".join(lines) + "\n").encode())
        with self._lock:
            self.written.update(written)
            self.inputs_written.update(new_inputs)


def sweep_log(
    store: ObjectStore, retention_s: float, suspects: set[str], now: datetime | None = None
) -> tuple[int, int]:
    """Apply retention to one log: delete records files whose hour ended over `retention_s`
    ago, and inputs no kept record names that `suspects` (the previous sweep's unreferenced
    inputs, updated in place) already held. Returns (records files, inputs) deleted.

    Raises:
        PeritoError, OSError: the store failed (nothing more is deleted this sweep).
    """
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=retention_s)
    referenced: set[str] = set()
    deleted_records = 0
    for key in list(store.list_keys(RECORDS)):
        hour = record_hour(key)
        if hour is None:
            continue
        if hour + timedelta(hours=1) <= cutoff:
            store.delete(key)
            deleted_records += 1
            continue
        for event in read_events(store.read_bytes(key).decode()):
            data = event.get("data") or {}
            referenced.update(
                str(ref.get("sha256")) for ref in data.get("inputs") or () if isinstance(ref, dict)
            )
    unreferenced = set()
    deleted_inputs = 0
    for key in list(store.list_keys(INPUTS)):
        digest = key.rpartition("/")[2]
        if digest in referenced:
            continue
        if digest in suspects:
            store.delete(key)
            deleted_inputs += 1
        else:
            unreferenced.add(digest)
    suspects.clear()
    suspects.update(unreferenced)
    return deleted_records, deleted_inputs
