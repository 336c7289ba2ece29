"""Dynamic batching: coalesce concurrent requests into one forward pass.

Pure asyncio (no grpc, no torch), in the vocabulary of Triton's dynamic batcher and in the
manner of `ray/serve/batching.py`:

- a batch is dispatched when it holds `max_batch_size` items, or `max_queue_delay` after its
  first item arrived, or as soon as no admitted item is still on its way (being decoded),
  whichever comes first. So a lone request never waits for companions that are not coming,
  and under load, while a batch runs, the next one fills greedily;
- admission is bounded by images and by bytes: `admit(n, nbytes=..., budget=...)` reserves
  room for a request's n items in this batcher and its bytes in a `ByteBudget` (shared by
  every batcher of a server) up front, before decoding, and raises `QueueFull` with a retry
  hint when either has none, so the server sheds load instead of queueing without end;
- an item whose caller gave up (cancelled) or whose deadline passed is dropped before it runs;
- two lanes: work admitted with `low_priority` (explanations' forward passes) runs only in
  batches of its own, started only while no item of the normal lane is queued or on its way,
  so a normal request waits at most for one low-priority batch already running, never for a
  queue of them; the low lane has its own room (`max_queue_size` items) and counts nothing
  against the normal lane's, nor in its queue-time statistics or retry hint;
- a batch that raises fails its own items only; the loop goes on.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, NoReturn, TypeVar

from perito_core.errors import DeadlineExceeded, QueueFull, ShuttingDown

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass
class Histogram:
    """Cumulative counts over fixed upper bounds, Prometheus-style."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


@dataclass
class BatcherStats:
    queue_seconds: Histogram = field(
        default_factory=lambda: Histogram((0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
    )
    batch_size: Histogram = field(default_factory=lambda: Histogram((1, 2, 4, 8, 16, 32, 64)))
    compute_seconds: Histogram = field(
        default_factory=lambda: Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
    )
    dropped_expired: int = 0
    dropped_cancelled: int = 0
    failed_batches: int = 0
    rejected: int = 0  # requests refused for want of room (images or bytes), with a retry hint
    rejected_for_bytes: int = 0  # of those, refused because the byte budget was spent
    low_priority_batches: int = 0  # batches of the low-priority lane run


# The retry hint's bounds, in seconds: never "now" (callers would spin), never absurdly late.
MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 30.0


class ByteBudget:
    """Bytes admitted and not yet answered, shared by every batcher that is given it.

    The server counts the encoded size of each admitted request (see
    `ServerSettings.max_queue_bytes`), one budget for the whole process: memory is spent per
    process, not per model.

    Args:
        max_bytes: the most bytes admitted at once; a request larger than this alone is
            refused outright.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self.in_use = 0

    def fits(self, nbytes: int) -> bool:
        return self.in_use + nbytes <= self.max_bytes


@dataclass
class _Pending(Generic[ItemT, ResultT]):
    item: ItemT
    future: asyncio.Future[ResultT]
    enqueued: float
    deadline: float | None


class Admission(Generic[ItemT, ResultT]):
    """Room reserved in a batcher for one request's items; release it by leaving the block."""

    def __init__(
        self,
        batcher: DynamicBatcher[ItemT, ResultT],
        size: int,
        nbytes: int = 0,
        budget: ByteBudget | None = None,
        low_priority: bool = False,
    ) -> None:
        self._batcher = batcher
        self._low = low_priority
        self._size = size
        self._enqueued = 0
        self._nbytes = nbytes
        self._budget = budget
        self._admitted_at = time.monotonic()

    def __enter__(self) -> Admission[ItemT, ResultT]:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._budget is not None:
            self._budget.in_use -= self._nbytes
            self._budget = None
        self._batcher._release(
            self._size, self._size - self._enqueued, self._admitted_at, low_priority=self._low
        )
        self._size = self._enqueued = 0

    async def run(self, items: Sequence[ItemT], deadline: float | None) -> list[ResultT]:
        """Queue the items, wait for every result (in order); `deadline` is monotonic time."""
        if len(items) > self._size:
            raise ValueError(f"admitted {self._size} items, got {len(items)}")
        futures = [self._batcher._enqueue(item, deadline, self._low) for item in items]
        self._enqueued += len(futures)
        try:
            return list(await asyncio.gather(*futures))
        finally:
            for future in futures:
                future.cancel()


class DynamicBatcher(Generic[ItemT, ResultT]):
    """Runs `run_batch` on lists of items gathered from concurrent callers.

    Args:
        run_batch: computes results for a batch, in order; one call at a time.
        max_batch_size: the most items per call.
        max_queue_delay: seconds a batch waits for more items after its first arrived.
        max_queue_size: the most items admitted and not yet answered.
    """

    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], Awaitable[Sequence[ResultT]]],
        *,
        max_batch_size: int = 8,
        max_queue_delay: float = 0.002,
        max_queue_size: int = 256,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1 or max_queue_size < max_batch_size or max_queue_delay < 0:
            raise ValueError(
                "need max_batch_size >= 1, max_queue_size >= max_batch_size, delay >= 0"
            )
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_queue_size = max_queue_size
        self.name = name
        self.stats = BatcherStats()
        self._queue: collections.deque[_Pending[ItemT, ResultT]] = collections.deque()
        # The low-priority lane: its queue and its items admitted and not yet answered.
        self._low_queue: collections.deque[_Pending[ItemT, ResultT]] = collections.deque()
        self._low_admitted = 0
        self._wakeup = asyncio.Event()
        self._admitted = 0
        self._on_the_way = 0  # admitted items not queued yet (still being decoded)
        self._closing = False
        # Moving average of busy seconds per item answered (decode, queue and compute: the
        # whole admission), so that admitted / rate is how long the backlog takes to drain.
        self._seconds_per_item = 0.0
        self._last_release = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def admitted(self) -> int:
        """Images of the normal lane admitted and not yet answered (at most `max_queue_size`)."""
        return self._admitted

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.name)

    def admit(
        self,
        size: int,
        *,
        nbytes: int = 0,
        budget: ByteBudget | None = None,
        low_priority: bool = False,
    ) -> Admission[ItemT, ResultT]:
        """Reserve room for `size` items here and `nbytes` in `budget`, both or neither.

        Leave the returned `Admission`'s block to give both back.

        Args:
            size: the request's items (images).
            nbytes: the request's bytes, counted against `budget` (none: not counted).
            budget: the byte budget shared with other batchers, if any.
            low_priority: admit to the low-priority lane (its own `max_queue_size` items):
                its items run only when the normal lane has none queued or on its way.

        Raises:
            QueueFull: no room now (`retry_after` says when to try again, in seconds), or
                the request alone exceeds the queue or the budget (reason
                REQUEST_TOO_LARGE, no retry hint: it never fits).
            ShuttingDown: the batcher is closing.
        """
        if self._closing:
            raise ShuttingDown(f"{self.name} is shutting down")
        if size > self.max_queue_size:
            raise QueueFull(
                f"a request of {size} items exceeds {self.name}'s queue of {self.max_queue_size}",
                reason="REQUEST_TOO_LARGE",
            )
        if budget is not None and nbytes > budget.max_bytes:
            raise QueueFull(
                f"a request of {nbytes} bytes exceeds the server's queue of "
                f"{budget.max_bytes} bytes (send fewer or smaller images per call)",
                reason="REQUEST_TOO_LARGE",
            )
        admitted = self._low_admitted if low_priority else self._admitted
        if admitted + size > self.max_queue_size:
            self._queue_full(f"{admitted} of {self.max_queue_size} images")
        if budget is not None and not budget.fits(nbytes):
            self.stats.rejected_for_bytes += 1
            self._queue_full(f"{budget.in_use} of {budget.max_bytes} bytes")
        if low_priority:
            self._low_admitted += size
        else:
            self._admitted += size
            self._on_the_way += size
        if budget is not None:
            budget.in_use += nbytes
        return Admission(self, size, nbytes, budget, low_priority)

    def _queue_full(self, waiting: str) -> NoReturn:
        """Count a refusal and raise it, with the retry hint (`waiting`: what fills the queue).

        Raises:
            QueueFull: always.
        """
        self.stats.rejected += 1
        retry_after = self.retry_after()
        raise QueueFull(
            f"{self.name}: queue full ({waiting} waiting); retry in {retry_after:.2f}s",
            retry_after=retry_after,
        )

    def retry_after(self) -> float:
        """Seconds until the items admitted now are likely answered: the retry hint.

        The items admitted times the recent pace of answers (seconds per item, measured from
        admission to release while busy, so decoding counts as well as the forward pass); at
        least `MIN_RETRY_AFTER_S`, at most `MAX_RETRY_AFTER_S`.
        """
        estimate = self._admitted * self._seconds_per_item
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, estimate))

    def _release(
        self, size: int, never_queued: int, admitted_at: float, *, low_priority: bool = False
    ) -> None:
        if low_priority:
            self._low_admitted -= size
            self._wakeup.set()
            return
        self._admitted -= size
        self._on_the_way -= never_queued
        if size:
            # Time since the previous answer, or since this request came in if that was
            # later (the batcher may have been idle between): the busy time of these items.
            now = time.monotonic()
            per_item = (now - max(self._last_release, admitted_at)) / size
            self._last_release = now
            self._seconds_per_item = (
                0.8 * self._seconds_per_item + 0.2 * per_item
                if self._seconds_per_item
                else per_item
            )
        # The loop may be waiting for these items, or to see the last request out.
        self._wakeup.set()

    def _enqueue(
        self, item: ItemT, deadline: float | None, low_priority: bool = False
    ) -> asyncio.Future[ResultT]:
        if self._task is None or self._task.done():
            raise ShuttingDown(f"{self.name} is not running")
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        pending = _Pending(item, future, time.monotonic(), deadline)
        if low_priority:
            self._low_queue.append(pending)
        else:
            self._on_the_way -= 1
            self._queue.append(pending)
        self._wakeup.set()
        return future

    async def close(self) -> None:
        """Refuse new requests, answer every admitted one, then stop the loop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def _next_batch(self) -> tuple[list[_Pending[ItemT, ResultT]], bool]:
        """The next batch to run and whether it is the low-priority lane's; empty once
        closing and every admitted request is answered.

        A low-priority batch is taken only while no normal item is queued or on its way (being
        decoded), and at once: its items are all queued together, none is on its way.
        """
        while not self._queue:
            if self._low_queue and self._on_the_way == 0:
                size = min(self.max_batch_size, len(self._low_queue))
                return [self._low_queue.popleft() for _ in range(size)], True
            if self._closing and self._admitted == 0 and self._low_admitted == 0:
                return [], False
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = [self._queue.popleft()]
        dispatch_at = batch[0].enqueued + self.max_queue_delay
        while len(batch) < self.max_batch_size:
            if self._queue:
                batch.append(self._queue.popleft())
                continue
            remaining = dispatch_at - time.monotonic()
            if remaining <= 0 or self._on_the_way == 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        return batch, False

    def _live(
        self, batch: list[_Pending[ItemT, ResultT]], low_priority: bool = False
    ) -> list[_Pending[ItemT, ResultT]]:
        now = time.monotonic()
        live = []
        for pending in batch:
            if pending.future.done():
                self.stats.dropped_cancelled += 1
            elif pending.deadline is not None and now >= pending.deadline:
                self.stats.dropped_expired += 1
                pending.future.set_exception(
                    DeadlineExceeded("the deadline passed while the image waited in the queue")
                )
            else:
                if not low_priority:
                    self.stats.queue_seconds.observe(now - pending.enqueued)
                live.append(pending)
        return live

    async def _loop(self) -> None:
        while True:
            batch, low_priority = await self._next_batch()
            if not batch:
                return
            live = self._live(batch, low_priority)
            if not live:
                continue
            if low_priority:
                self.stats.low_priority_batches += 1
            self.stats.batch_size.observe(len(live))
            started = time.monotonic()
            try:
                results = await self.run_batch([p.item for p in live])
                if len(results) != len(live):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)}")
            except Exception as exc:  # noqa: BLE001 - the batch's callers get the error
                self.stats.failed_batches += 1
                for pending in live:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            elapsed = time.monotonic() - started
            self.stats.compute_seconds.observe(elapsed)
            for pending, result in zip(live, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
