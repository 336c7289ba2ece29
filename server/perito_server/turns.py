"""Threads that serve several tenants' work in turn, not in order of arrival.

The server decodes every door's images on one pool of threads (`decode_threads`). Served in
order of arrival, one tenant's large images held every other tenant's behind them: two requests
of eight 64-megapixel PNGs made another tenant's 2 KB JPEG wait 13 s. `TakingTurns` keeps a
queue per tenant and hands each free thread the next piece of work of the next tenant in turn
(round robin over the tenants with work waiting, one piece each; each tenant's own work in the
order it came). A tenant's image then waits behind at most one piece of each other tenant's
per thread, whatever the others have queued. Turns are by piece of work (an image), not by its
cost: a 64-megapixel image still holds a thread for its whole decode (the limit on pixels,
`ImageLimits.max_pixels`, bounds it).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# The turn of work submitted with no tenant named (`TakingTurns.submit`).
UNNAMED = ""


class _Work:
    __slots__ = ("args", "fn", "future", "kwargs")

    def __init__(self, future: Future[Any], fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return  # cancelled while it waited (its caller left, or its deadline passed)
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # noqa: BLE001 - the future carries it to its caller
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


class TakingTurns(Executor):
    """A `concurrent.futures.Executor` of `threads` threads whose queue is one per tenant,
    served round robin (module docs).

    Args:
        threads: how many threads run work at once.
        name: the threads' name prefix (`decode` names them `decode_0`, ...).
    """

    def __init__(self, threads: int, name: str) -> None:
        self._ready = threading.Condition()
        # Tenant -> its work waiting, in the order of their turns (a dict keeps insertion
        # order: a tenant served goes to the back; one with nothing left leaves).
        self._waiting: dict[str, deque[_Work]] = {}
        self._closed = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}_{index}", daemon=True)
            for index in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit_as(
        self, tenant: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[T]:
        """Run `fn(*args, **kwargs)` in `tenant`'s turn.

        Raises:
            RuntimeError: after `shutdown`.
        """
        future: Future[T] = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("cannot submit work after shutdown")
            self._waiting.setdefault(tenant, deque()).append(_Work(future, fn, args, kwargs))
            self._ready.notify()
        return future

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """`submit_as` in the turn of work that names no tenant (`UNNAMED`): what
        `loop.run_in_executor` submits."""
        return self.submit_as(UNNAMED, fn, *args, **kwargs)

    def waiting(self) -> dict[str, int]:
        """Each tenant's pieces of work waiting for a thread (none: not listed)."""
        with self._ready:
            return {tenant: len(queue) for tenant, queue in self._waiting.items()}

    def _next(self) -> _Work | None:
        """The next tenant's next piece of work, once there is one (None: shut down)."""
        with self._ready:
            while not self._waiting:
                if self._closed:
                    return None
                self._ready.wait()
            tenant, queue = next(iter(self._waiting.items()))
            work = queue.popleft()
            del self._waiting[tenant]
            if queue:
                self._waiting[tenant] = queue  # to the back of the turns
            return work

    def _serve(self) -> None:
        while (work := self._next()) is not None:
            work.run()
            del work  # drop its arguments (a request's bytes) before waiting again

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more work; with `cancel_futures`, cancel what waits; with `wait`, return
        once the threads have run what is left."""
        with self._ready:
            self._closed = True
            if cancel_futures:
                for queue in self._waiting.values():
                    for work in queue:
                        work.future.cancel()
                self._waiting.clear()
            self._ready.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()
