"""A bulk job's data in object storage: its inputs a chunk at a time, each chunk's results as
one part. The job store (Redis) keeps only which part counts, per chunk (`ChunkSlot`).

Under the job's data prefix (`Job.data_uri`, `{root}/{tenant}/{job_id}/{submission}`: the
server derives it from `PERITO_JOB_DATA_URI`, never from a caller):

    inputs/{chunk:08d}.jsonl            the chunk's items as submitted, in input order, one
                                        `ItemInput.as_record` (JSON) per line
    parts/{chunk:08d}-{attempt}.jsonl   the chunk's results, one `ItemResult.as_record` per item
                                        in index order (JSON Lines), written by the worker whose
                                        attempt (`JobStore.acquire_chunk`) it was

Each object is written whole or not at all (`LocalStore` writes a temporary file and renames
it; S3 stores a PUT whole) and never written again once the job store refers to it. A chunk's
part is referred to by the Lua script that closes the chunk (`complete.lua`), and only for the
worker still holding its lease: the part of an attempt that lost its lease, or ran while the
job was cancelled, is never read, and goes when the prefix is purged.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from perito.v1.vocabulary import ItemState
from perito_core.errors import NotFound, PeritoError
from perito_core.jobs.items import ItemInput, ItemResult
from perito_core.storage import LocalStore, ObjectStore

# A chunk's slot in the job store: two big-endian unsigned 16-bit fields (Redis BITFIELD
# `u16 #2c` and `u16 #2c+1`, chunk c), 0 until the chunk is closed.
SLOT_BYTES = 4
CANCELLED_MARK = 0xFFFF  # closed without a part: every item cancelled
# Closed without a part: every item failed, with its chunk's reason (`JobStore.fail_chunk`)
# or else the job's `rest_error`.
FAILED_MARK = 0xFFFE
MAX_ATTEMPT = 0xFFFD
# A part holds at most max_job_chunk_size (10,000) results of a few hundred bytes each.
PART_MAX_BYTES = 64 * 1024 * 1024


class JobDataMissing(PeritoError, reason="JOB_DATA_MISSING"):
    """A file the job store refers to is missing from the job's data, or malformed (INTERNAL:
    the operator's storage lost it, or someone changed it)."""


@dataclass(frozen=True)
class ChunkSlot:
    """What the job store says of one chunk (4 bytes; see `SLOT_BYTES`).

    Attributes:
        mark: 0 while the chunk is open; the attempt whose part holds its results once it is
            recorded (1 to `MAX_ATTEMPT`); `CANCELLED_MARK` or `FAILED_MARK` for a chunk
            closed without a part (cancelled, or failed with its chunk's reason or else the
            job's `rest_error`).
        failed: how many of a recorded part's items failed (the others succeeded).
    """

    mark: int = 0
    failed: int = 0

    @classmethod
    def parse(cls, raw: bytes, count: int) -> list[ChunkSlot]:
        """`count` slots from `raw` (GETRANGE of the slots' string); slots past its end are
        open (Redis leaves a string no longer than its last write)."""
        raw = raw.ljust(count * SLOT_BYTES, b"\0")
        return [
            cls(
                int.from_bytes(raw[i * SLOT_BYTES : i * SLOT_BYTES + 2], "big"),
                int.from_bytes(raw[i * SLOT_BYTES + 2 : (i + 1) * SLOT_BYTES], "big"),
            )
            for i in range(count)
        ]

    @property
    def open(self) -> bool:
        return self.mark == 0

    def count(self, state: ItemState, items: int) -> int:
        """How many of the chunk's `items` are in `state` now."""
        if self.mark == 0:
            return items if state is ItemState.PENDING else 0
        if self.mark == CANCELLED_MARK:
            return items if state is ItemState.CANCELLED else 0
        if self.mark == FAILED_MARK:
            return items if state is ItemState.FAILED else 0
        if state is ItemState.FAILED:
            return self.failed
        return items - self.failed if state is ItemState.SUCCEEDED else 0


def data_location(root: str, tenant: str, job_id: str) -> str:
    """Where a job's data goes under the job data root: `{root}/{tenant}/{job_id}` (tenant
    `_` for a job without one; a tenant name never starts with `_`). Each submission of the
    job adds a folder of its own below (`JobStore.create`)."""
    return f"{root.rstrip('/')}/{tenant or '_'}/{job_id}"


def input_key(chunk: int) -> str:
    return f"inputs/{chunk:08d}.jsonl"


def part_key(chunk: int, attempt: int) -> str:
    return f"parts/{chunk:08d}-{attempt}.jsonl"


# Strict JSON (RFC 8259): a NaN or infinity raises ValueError, never a line other parsers
# refuse. One encoder for every line (`json.dumps` with options builds one per call).
_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _lines(records: Iterable[dict[str, Any]]) -> bytes:
    return "".join(_ENCODE(r) + "\n" for r in records).encode()


def _refuse_constant(name: str) -> Any:
    """`json.loads`' `parse_constant`: NaN, Infinity and -Infinity are not JSON (RFC 8259)."""
    raise ValueError(f"{name} is not a JSON number")


class JobData:
    """One job's data prefix (see the module docstring). Safe to share between threads.

    Args:
        uri: the prefix, as recorded in the job (`Job.data_uri`).
        store: the object store at `uri` (`perito_core.storage.open_store`).
    """

    def __init__(self, uri: str, store: ObjectStore) -> None:
        self.uri = uri
        self.store = store

    def write_inputs(self, chunk: int, items: Sequence[ItemInput]) -> None:
        """Write `chunk`'s inputs file.

        Raises:
            StorageUnavailable, OSError: the write failed (nothing is left half-written).
        """
        self.store.write_bytes(input_key(chunk), _lines(item.as_record() for item in items))

    def read_inputs(self, chunk: int, first: int, items: int) -> list[ItemInput]:
        """`chunk`'s `items` items as submitted; `first` is the index of its first item.

        Raises:
            JobDataMissing: no such file, or it does not hold `items` items.
            StorageUnavailable: object storage cannot be reached.
        """
        key = input_key(chunk)
        rows = self._read(key)
        try:
            inputs = [ItemInput.from_record(r) for r in rows]
        except (KeyError, TypeError) as exc:
            raise JobDataMissing(f"{key} of the job's data is malformed: {exc!r}") from None
        if len(inputs) != items:
            raise JobDataMissing(
                f"{key} of the job's data holds {len(inputs)} items; its chunk has {items} "
                f"(from item {first})"
            )
        return inputs

    def write_part(self, chunk: int, attempt: int, results: Sequence[ItemResult]) -> None:
        """Write `results` (every item of `chunk`, in index order) as the part of `attempt`.

        Raises:
            ValueError: a NaN or infinity in a result (strict JSON); nothing is written.
            StorageUnavailable, OSError: the write failed (nothing is left half-written).
        """
        self.store.write_bytes(part_key(chunk, attempt), _lines(r.as_record() for r in results))

    def read_part(self, chunk: int, attempt: int, first: int, items: int) -> list[ItemResult]:
        """The results of `chunk` in the part of `attempt`, checked: `items` results, indices
        `first` .. `first + items - 1` in order.

        Raises:
            JobDataMissing: no such part, or it is not the chunk's results.
            StorageUnavailable: object storage cannot be reached.
        """
        key = part_key(chunk, attempt)
        try:
            results = [ItemResult.from_record(row) for row in self._read(key)]
        except (KeyError, TypeError, ValueError) as exc:
            raise JobDataMissing(f"{key} of the job's data is malformed: {exc!r}") from None
        if [r.index for r in results] != list(range(first, first + items)):
            raise JobDataMissing(
                f"{key} of the job's data does not hold items {first} to {first + items - 1} "
                "in order"
            )
        return results

    def _read(self, key: str) -> list[dict[str, Any]]:
        try:
            raw = self.store.read_bytes(key, PART_MAX_BYTES)
        except NotFound:
            raise JobDataMissing(f"{key} is missing from the job's data") from None
        # One parse of the lines joined as an array (a parse per line costs half as much again);
        # a line holding more than one value shows as more records than lines.
        lines = [line for line in raw.splitlines() if line]
        try:
            rows: list[dict[str, Any]] = json.loads(
                b"[" + b",".join(lines) + b"]", parse_constant=_refuse_constant
            )
        except ValueError as exc:
            raise JobDataMissing(f"{key} of the job's data is malformed: {exc}") from None
        if len(rows) != len(lines) or not all(type(row) is dict for row in rows):
            raise JobDataMissing(f"{key} of the job's data is malformed: not one object a line")
        return rows

    def purge(self, budget: int) -> tuple[int, bool]:
        """Delete up to `budget` of the prefix's objects; returns (deleted, whether none is
        left). A local prefix's emptied folders go too, and the job's folder above it
        (`data_location`) if no other submission of the job left files there.

        Raises:
            StorageUnavailable, OSError: listing or deleting failed.
        """
        if isinstance(self.store, LocalStore):
            return _purge_folder(self.store.root, budget)
        deleted = 0
        for key in self.store.list_keys(""):
            if deleted == budget:
                return deleted, False
            self.store.delete(key)
            deleted += 1
        return deleted, True


def _purge_folder(root: Path, budget: int) -> tuple[int, bool]:
    """`JobData.purge` of a local folder: its files (temporary ones of a write cut short
    too), then its folders, and the job's folder above it when empty."""
    deleted = 0
    for walked, subfolders, files in os.walk(root, topdown=False):
        for name in files:
            if deleted == budget:
                return deleted, False
            Path(walked, name).unlink(missing_ok=True)
            deleted += 1
        for name in subfolders:
            _remove_empty(Path(walked, name))
    if _remove_empty(root):
        _remove_empty(root.parent)
    return deleted, True


def _remove_empty(folder: Path) -> bool:
    """Remove `folder` if it is empty (or gone); whether it is gone."""
    try:
        folder.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


class InputsWriter:
    """Writes a job's items as its chunks' inputs files while they are listed: each chunk's
    file as soon as the chunk is full, on a few threads (object storage takes a PUT at a time
    per connection), with at most `2 * threads` files in hand.

    Use as a context manager; `add` each item, then `close` (which waits for every file, and
    raises the first failure). Leaving by an exception waits for the files under way.
    """

    def __init__(self, data: JobData, chunk_size: int, threads: int = 8) -> None:
        self.data = data
        self.chunk_size = chunk_size
        self.chunks = 0  # files started
        self._page: list[ItemInput] = []
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="job-inputs")
        self._pending: list[Future[None]] = []
        self._limit = 2 * threads

    def __enter__(self) -> InputsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def add(self, item: ItemInput) -> None:
        self._page.append(item)
        if len(self._page) == self.chunk_size:
            self._flush()

    def close(self) -> int:
        """Write the last chunk's file, wait for all; returns how many files were written.

        Raises:
            StorageUnavailable, OSError: a write failed.
        """
        if self._page:
            self._flush()
        for future in self._pending:
            future.result()
        self._pending = []
        return self.chunks

    def _flush(self) -> None:
        for future in self._pending:
            if future.done():
                future.result()  # a failed write raises now, not at `close`
        self._pending = [f for f in self._pending if not f.done()]
        while len(self._pending) >= self._limit:
            self._pending.pop(0).result()
        page, self._page = self._page, []
        self._pending.append(self._pool.submit(self.data.write_inputs, self.chunks, page))
        self.chunks += 1


K = TypeVar("K")
V = TypeVar("V")


class LruCache:
    """A small least-recently-used cache for immutable things (parts, inputs files, opened
    stores), safe between threads. A value is computed outside the lock, so two threads may
    both compute one that is missing; the first stored wins.

    Args:
        capacity: the most the values may weigh together (the newest is kept whatever it
            weighs).
        weight: a value's weight (default: 1 each, so `capacity` counts values).
    """

    def __init__(self, capacity: int, weight: Callable[[Any], int] = lambda _: 1) -> None:
        self.capacity = capacity
        self._weight = weight
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def get(self, key: K, make: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                value: V = self._items[key][0]
                return value
        made = make()
        weight = self._weight(made)
        with self._lock:
            if key not in self._items:
                self._items[key] = (made, weight)
                self._held += weight
            self._items.move_to_end(key)
            while self._held > self.capacity and len(self._items) > 1:
                _, (_, dropped) = self._items.popitem(last=False)
                self._held -= dropped
            kept: V = self._items[key][0]
            return kept
