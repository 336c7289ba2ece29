"""The few things `AsyncClient` and `Client` do differently, each written twice, side by side:
`async_<name>` for the async source (`perito._async`), and `<name>`, blocking, which
`scripts/gen_sync_client.py` puts in its place in the generated `perito._client`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

R = TypeVar("R")
T = TypeVar("T")


async def async_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def async_loop_key() -> int:
    """Which event loop runs this code (an `AsyncClient`'s channel belongs to one)."""
    return id(asyncio.get_running_loop())


def loop_key() -> int:
    """0: a blocking client's channel belongs to no event loop."""
    return 0


async def async_run_blocking(func: Callable[..., R], *args: Any) -> R:
    """`func(*args)` in a worker thread, the event loop free meanwhile."""
    return await asyncio.to_thread(func, *args)


def run_blocking(func: Callable[..., R], *args: Any) -> R:
    """`func(*args)`, here and now."""
    return func(*args)


async def async_map_all(
    func: Callable[[T], Awaitable[R]], items: Iterable[T], concurrency: int
) -> list[R]:
    """`func(item)` for every item, `concurrency` of them at once; the results in order.
    When one fails, the others are cancelled (and awaited, so none is left running or with
    an unread error) and its error is raised."""
    gate = asyncio.Semaphore(concurrency)

    async def one(item: T) -> R:
        async with gate:
            return await func(item)

    tasks = [asyncio.ensure_future(one(item)) for item in items]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def map_all(func: Callable[[T], R], items: Iterable[T], concurrency: int) -> list[R]:
    """`func(item)` for every item, one after the other (`concurrency` is for the async
    twin); the first error is raised."""
    return [func(item) for item in items]


async def async_time_limit(work: Awaitable[R], seconds: float | None) -> R:
    """`work`'s result; TimeoutError (and `work` cancelled) once `seconds` have passed."""
    return await asyncio.wait_for(work, seconds)


def time_limit(result: R, seconds: float | None) -> R:
    """`result`: blocking work is done before it gets here, so it keeps its own time and
    raises TimeoutError itself."""
    return result
