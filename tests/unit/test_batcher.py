"""The dynamic batcher, driven with a fake model (pure asyncio: no grpc, no torch)."""

from __future__ import annotations

import asyncio
import time

import pytest

from perito_core.errors import DeadlineExceeded, QueueFull, ShuttingDown
from perito_server.batcher import ByteBudget, DynamicBatcher


class FakeModel:
    def __init__(self, seconds: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.seconds = seconds
        self.fail_on = fail_on

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("model exploded")
        return [item * 10 for item in items]


async def classify(
    batcher: DynamicBatcher[int, int], items: list[int], deadline: float | None = None
) -> list[int]:
    with batcher.admit(len(items)) as admission:
        return await admission.run(items, deadline)


def one_at_a_time(model: FakeModel) -> DynamicBatcher[int, int]:
    """A started batcher that runs one image at a time, without waiting for companions."""
    batcher = DynamicBatcher(model, max_batch_size=1, max_queue_delay=0.0, max_queue_size=64)
    batcher.start()
    return batcher


async def test_concurrent_requests_share_batches_up_to_the_limit() -> None:
    model = FakeModel(seconds=0.01)
    batcher = DynamicBatcher(model, max_batch_size=4, max_queue_delay=0.05, max_queue_size=64)
    batcher.start()
    results = await asyncio.gather(*(classify(batcher, [i]) for i in range(10)))
    assert results == [[i * 10] for i in range(10)]
    assert max(len(b) for b in model.batches) == 4
    assert len(model.batches) <= 4
    assert sorted(i for b in model.batches for i in b) == list(range(10))
    await batcher.close()


async def test_a_lone_request_does_not_wait_for_companions_that_are_not_coming() -> None:
    model = FakeModel()
    batcher = DynamicBatcher(model, max_batch_size=8, max_queue_delay=0.5, max_queue_size=64)
    batcher.start()
    started = time.monotonic()
    assert await classify(batcher, [7]) == [70]
    assert time.monotonic() - started < 0.1
    await batcher.close()


async def test_a_batch_waits_for_admitted_requests_still_being_decoded() -> None:
    model = FakeModel()
    batcher = DynamicBatcher(model, max_batch_size=8, max_queue_delay=0.5, max_queue_size=64)
    batcher.start()

    async def slow_decoder() -> list[int]:
        with batcher.admit(1) as admission:
            await asyncio.sleep(0.05)  # decoding
            return await admission.run([2], None)

    started = time.monotonic()
    late = asyncio.ensure_future(slow_decoder())
    await asyncio.sleep(0)
    assert await classify(batcher, [1]) == [10]
    assert await late == [20]
    assert model.batches == [[1, 2]]
    assert 0.04 <= time.monotonic() - started < 0.4
    await batcher.close()


async def test_the_queue_delay_bounds_the_wait_for_late_companions() -> None:
    model = FakeModel()
    batcher = DynamicBatcher(model, max_batch_size=8, max_queue_delay=0.05, max_queue_size=64)
    batcher.start()
    with batcher.admit(1):  # admitted, never sent: the batch must not wait for it forever
        started = time.monotonic()
        assert await classify(batcher, [1]) == [10]
        assert 0.04 <= time.monotonic() - started < 0.3
    await batcher.close()


async def test_results_keep_request_order_within_a_multi_image_request() -> None:
    batcher = DynamicBatcher(FakeModel(), max_batch_size=3, max_queue_delay=0.0, max_queue_size=64)
    batcher.start()
    assert await classify(batcher, [5, 1, 4, 2, 3]) == [50, 10, 40, 20, 30]
    await batcher.close()


async def test_admission_beyond_the_queue_raises_queue_full_with_a_retry_hint() -> None:
    batcher = DynamicBatcher(FakeModel(), max_batch_size=2, max_queue_delay=0.0, max_queue_size=4)
    with batcher.admit(3):
        with pytest.raises(QueueFull) as caught:
            batcher.admit(2)
        assert caught.value.retry_after is not None and caught.value.retry_after > 0
    with batcher.admit(4):  # released on exit: room again
        pass
    assert batcher.stats.rejected == 1


async def test_admitted_counts_callers_images_until_answered_not_the_low_lane() -> None:
    """What a server's `perito_queue_images` reads."""
    batcher = DynamicBatcher(FakeModel(), max_batch_size=2, max_queue_delay=0.0, max_queue_size=4)
    with batcher.admit(3):
        with pytest.raises(QueueFull):
            batcher.admit(2)  # refused: not counted
        with batcher.admit(2, low_priority=True):  # explanations' lane: room of its own
            assert batcher.admitted == 3
    assert batcher.admitted == 0


async def test_a_request_larger_than_the_queue_is_refused_outright() -> None:
    batcher = DynamicBatcher(FakeModel(), max_batch_size=2, max_queue_delay=0.0, max_queue_size=4)
    with pytest.raises(QueueFull, match="exceeds"):
        batcher.admit(5)


async def test_admission_is_bounded_by_bytes_shared_across_batchers() -> None:
    budget = ByteBudget(1000)
    first = DynamicBatcher(FakeModel(), max_batch_size=2, max_queue_delay=0.0, max_queue_size=8)
    second = DynamicBatcher(FakeModel(), max_batch_size=2, max_queue_delay=0.0, max_queue_size=8)
    with first.admit(1, nbytes=700, budget=budget):
        assert budget.in_use == 700
        with pytest.raises(QueueFull, match="bytes waiting") as caught:
            second.admit(1, nbytes=400, budget=budget)  # room for images, not for bytes
        assert caught.value.retry_after is not None and caught.value.retry_after > 0
        assert caught.value.reason == "QUEUE_FULL"
        with second.admit(8, nbytes=300, budget=budget):  # the refusal reserved nothing
            assert budget.in_use == 1000
    assert budget.in_use == 0
    assert (second.stats.rejected, second.stats.rejected_for_bytes) == (1, 1)
    with second.admit(8, nbytes=1000, budget=budget):  # released on exit: room again
        pass


async def test_a_refusal_for_images_reserves_no_bytes() -> None:
    budget = ByteBudget(1000)
    batcher = DynamicBatcher(FakeModel(), max_batch_size=2, max_queue_delay=0.0, max_queue_size=4)
    with batcher.admit(4, nbytes=10, budget=budget):
        with pytest.raises(QueueFull, match="images waiting"):
            batcher.admit(1, nbytes=10, budget=budget)
        assert budget.in_use == 10
    assert budget.in_use == 0


async def test_a_request_larger_than_the_byte_budget_is_refused_outright() -> None:
    batcher = DynamicBatcher(FakeModel(), max_batch_size=2, max_queue_delay=0.0, max_queue_size=4)
    with pytest.raises(QueueFull, match="exceeds") as caught:
        batcher.admit(1, nbytes=1001, budget=ByteBudget(1000))
    assert caught.value.reason == "REQUEST_TOO_LARGE"
    assert caught.value.retry_after is None  # it never fits: retrying would not help


async def test_the_retry_hint_grows_with_the_backlog() -> None:
    model = FakeModel(seconds=0.02)
    batcher = one_at_a_time(model)
    await asyncio.gather(*(classify(batcher, [i]) for i in range(5)))  # learn the pace
    with batcher.admit(60), pytest.raises(QueueFull) as caught:
        batcher.admit(10)
    # 60 images at ~20 ms each: about 1.2 s, not the 50 ms floor.
    assert caught.value.retry_after is not None
    assert 0.3 < caught.value.retry_after < 5
    await batcher.close()


async def test_expired_items_are_dropped_before_they_run() -> None:
    model = FakeModel(seconds=0.05)
    batcher = one_at_a_time(model)
    blocker = asyncio.ensure_future(classify(batcher, [1]))
    await asyncio.sleep(0.01)  # item 1 is running for 50 ms
    with pytest.raises(DeadlineExceeded):
        await classify(batcher, [2], deadline=time.monotonic() + 0.02)
    assert await blocker == [10]
    assert [2] not in model.batches
    assert batcher.stats.dropped_expired == 1
    await batcher.close()


async def test_cancelled_callers_are_dropped_before_they_run() -> None:
    model = FakeModel(seconds=0.05)
    batcher = one_at_a_time(model)
    blocker = asyncio.ensure_future(classify(batcher, [1]))
    await asyncio.sleep(0.01)
    impatient = asyncio.ensure_future(classify(batcher, [2]))
    await asyncio.sleep(0.01)
    impatient.cancel()
    assert await blocker == [10]
    await asyncio.sleep(0.02)
    assert [2] not in model.batches
    assert batcher.stats.dropped_cancelled == 1
    await batcher.close()


async def test_a_failing_batch_fails_only_its_own_items() -> None:
    model = FakeModel(seconds=0.02, fail_on=13)
    batcher = one_at_a_time(model)
    results = await asyncio.gather(
        classify(batcher, [1]),
        classify(batcher, [13]),
        classify(batcher, [2]),
        return_exceptions=True,
    )
    assert results[0] == [10]
    assert isinstance(results[1], RuntimeError)
    assert results[2] == [20]
    assert batcher.stats.failed_batches == 1
    await batcher.close()


async def test_close_finishes_queued_work_then_refuses_new_requests() -> None:
    batcher = DynamicBatcher(
        FakeModel(seconds=0.01), max_batch_size=2, max_queue_delay=0.0, max_queue_size=64
    )
    batcher.start()
    pending = [asyncio.ensure_future(classify(batcher, [i])) for i in range(5)]
    await asyncio.sleep(0)
    await batcher.close()
    assert [await p for p in pending] == [[i * 10] for i in range(5)]
    with pytest.raises(ShuttingDown):
        batcher.admit(1)


async def test_histograms_record_batch_sizes_and_queue_time() -> None:
    batcher = DynamicBatcher(
        FakeModel(seconds=0.01), max_batch_size=4, max_queue_delay=0.02, max_queue_size=64
    )
    batcher.start()
    await asyncio.gather(*(classify(batcher, [i]) for i in range(8)))
    assert batcher.stats.batch_size.count == 2
    assert batcher.stats.batch_size.mean == 4
    assert batcher.stats.queue_seconds.count == 8
    await batcher.close()
