"""The batcher's low-priority lane (explanations' forward passes), driven with a fake model:
normal requests are never queued behind it."""

from __future__ import annotations

import asyncio
import time

import pytest

from perito_core.errors import DeadlineExceeded, QueueFull
from perito_server.batcher import DynamicBatcher

BATCH_SECONDS = 0.05


class FakeModel:
    """Answers item * 10, taking `BATCH_SECONDS` per batch; records each batch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(BATCH_SECONDS)
        return [item * 10 for item in items]


def started(model: FakeModel, max_queue_size: int = 256) -> DynamicBatcher[int, int]:
    batcher = DynamicBatcher(
        model, max_batch_size=2, max_queue_delay=0.0, max_queue_size=max_queue_size
    )
    batcher.start()
    return batcher


async def run(
    batcher: DynamicBatcher[int, int],
    items: list[int],
    *,
    low: bool = False,
    deadline: float | None = None,
) -> list[int]:
    with batcher.admit(len(items), low_priority=low) as admission:
        return await admission.run(items, deadline)


async def test_a_normal_request_waits_for_one_low_batch_at_most() -> None:
    model = FakeModel()
    batcher = started(model)
    low = asyncio.create_task(run(batcher, list(range(100, 120)), low=True))
    await asyncio.sleep(BATCH_SECONDS * 2.5)  # the low lane is running its third batch
    began = time.monotonic()
    assert await run(batcher, [1]) == [10]
    waited = time.monotonic() - began
    assert await low == [item * 10 for item in range(100, 120)]
    await batcher.close()
    normal = model.batches.index([1])
    # It ran right after the low batch that was running when it came, alone.
    assert normal == 3, model.batches
    assert waited < BATCH_SECONDS * 2.5
    assert all(item >= 100 for batch in model.batches if batch != [1] for item in batch)
    assert batcher.stats.low_priority_batches == 10


async def test_the_low_lane_runs_only_when_the_normal_one_is_empty() -> None:
    model = FakeModel()
    batcher = started(model)
    low = asyncio.create_task(run(batcher, [100, 101], low=True))
    normal = [asyncio.create_task(run(batcher, [i])) for i in range(6)]
    await asyncio.gather(low, *normal)
    await batcher.close()
    ran = [item for batch in model.batches for item in batch]
    assert ran[-2:] == [100, 101], model.batches
    assert sorted(ran[:-2]) == list(range(6))


async def test_the_low_lane_has_its_own_room() -> None:
    model = FakeModel()
    batcher = started(model, max_queue_size=4)
    with batcher.admit(4, low_priority=True):
        with batcher.admit(4):  # the normal lane's room is untouched
            pass
        with pytest.raises(QueueFull):
            batcher.admit(1, low_priority=True)
    with batcher.admit(4, low_priority=True):  # given back on leaving the block
        pass
    await batcher.close()


async def test_low_items_past_their_deadline_fail_deadline_exceeded() -> None:
    model = FakeModel()
    batcher = started(model)
    # A stream of normal requests keeps the low lane waiting past its deadline.
    busy = asyncio.create_task(run(batcher, list(range(8))))
    await asyncio.sleep(0)
    with pytest.raises(DeadlineExceeded):
        await run(batcher, [100, 101], low=True, deadline=time.monotonic() + BATCH_SECONDS)
    await busy
    await batcher.close()
    assert not any(item >= 100 for batch in model.batches for item in batch)
