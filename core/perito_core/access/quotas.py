"""Per-tenant rate limits kept in Redis, so every server replica counts against one budget.

`RateLimiter` is GCRA (the generic cell rate algorithm, the token bucket written as one
timestamp per key: ATM Forum TM 4.1; the same as `redis-cell`): a tenant allowed `rate`
images a minute may spend a full minute's worth at once, then `rate / 60` a second. One key
per tenant holds the "theoretical arrival time"; one Lua script checks and moves it, with
Redis's own clock, so replicas need not agree on time and two calls never both take the last
images. A refusal says exactly when the request would fit (`retry_after`).

A refusal is also remembered in the replica that made it: until even one image would fit,
that tenant's calls are refused from memory (`refuse_if_blocked`), with no Redis round trip
and, in the gRPC interceptor, before the request body is read. This never refuses what Redis
would admit: other replicas only ever move the arrival time later, so the wait Redis reported
is a lower bound on the real one. A caller that ignores the retry hint and hammers the
server thus costs it almost nothing per refused call, and cannot slow other tenants.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import redis

from perito_core.errors import QuotaExceeded, StorageUnavailable

PREFIX = "perito:quota"

# KEYS: the tenant's key. ARGV: emission interval (ms per image), burst (ms), cost (images).
# Returns {allowed (1/0), ms to wait}.
_GCRA = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3]) * interval
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + cost
local allow_at = new_tat - burst
if allow_at > now then return {0, allow_at - now} end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now) + 1000)
return {1, 0}
"""


class RateLimiter:
    """Images per minute per tenant, shared by every replica through Redis."""

    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = client
        self._gcra = client.register_script(_GCRA)
        self._clock = clock
        # (tenant, per_minute) -> clock time at which one image fits (again), as last refused;
        # entries a minute old are dropped when next looked at. Bounded by
        # the number of tenants (and quotas they have had), each entry a few dozen bytes.
        self._blocked_until: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()

    def refuse_if_blocked(self, tenant: str, per_minute: int, images: int = 1) -> None:
        """Refuse at once, from memory, if a recent refusal showed `images` cannot fit yet.

        Raises:
            QuotaExceeded: with `retry_after`, the seconds until they could fit.
        """
        with self._lock:
            one_fits_at = self._blocked_until.get((tenant, per_minute))
        if one_fits_at is None:
            return
        now = self._clock()
        # Each image past the first needs one more emission interval (60 / per_minute s).
        fits_at = one_fits_at + (images - 1) * 60 / per_minute
        if fits_at > now:
            raise _over_quota(tenant, per_minute, fits_at - now)
        if one_fits_at + 60 <= now:  # past any request's wait: forget it
            with self._lock:
                if self._blocked_until.get((tenant, per_minute)) == one_fits_at:
                    del self._blocked_until[(tenant, per_minute)]

    def take(self, tenant: str, images: int, per_minute: int) -> None:
        """Spend `images` of `tenant`'s allowance of `per_minute`, or refuse them all.

        A request larger than a minute's allowance can never pass and is refused without
        a retry hint.

        Raises:
            QuotaExceeded: not enough allowance now; `retry_after` says when there will be.
            StorageUnavailable: Redis is unreachable.
        """
        interval_ms = 60_000 / per_minute
        burst_ms = 60_000.0  # a minute's worth at once
        self.refuse_if_blocked(tenant, per_minute, images)
        if images > per_minute:
            raise QuotaExceeded(
                f"tenant {tenant!r}: {images} images in one request, more than its quota of "
                f"{per_minute} a minute",
                reason="QUOTA_IMAGES_PER_MINUTE",
            )
        asked_at = self._clock()  # before Redis's clock read: the wait below is not overstated
        try:
            allowed, wait_ms = self._gcra(
                keys=[f"{PREFIX}:{tenant}:classify"], args=[interval_ms, burst_ms, images]
            )
        except redis.RedisError as exc:
            raise StorageUnavailable(f"the quota store (Redis) is unreachable: {exc}") from None
        if not int(allowed):
            # The wait for one image is shorter than for `images` by the other images' cells.
            one_fits_at = asked_at + (float(wait_ms) - (images - 1) * interval_ms) / 1000
            with self._lock:
                self._blocked_until[(tenant, per_minute)] = one_fits_at
            raise _over_quota(tenant, per_minute, float(wait_ms) / 1000)


class InProgress:
    """How many of one kind of thing (calls, watch streams) each tenant has in progress in
    this process, each share bounded: the same count for every kind, so that none is
    written twice.

    Args:
        reason: the refusal's machine-readable reason (`QUOTA_CONCURRENT_CALLS`, ...).
        retry_after: the refusal's retry hint, in seconds.
    """

    def __init__(self, reason: str, retry_after: float) -> None:
        self.reason = reason
        self.retry_after = retry_after
        self.held: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def hold(self, key: str, most: int, refusal: str) -> Iterator[None]:
        """One of `key`'s (a tenant's) `most` for the block.

        Raises:
            QuotaExceeded: `key` holds `most` already; `refusal` is its message.
        """
        if self.held[key] >= most:
            raise QuotaExceeded(refusal, reason=self.reason, retry_after=self.retry_after)
        self.held[key] += 1
        try:
            yield
        finally:
            self.held[key] -= 1
            if not self.held[key]:
                del self.held[key]


def _over_quota(tenant: str, per_minute: int, retry_after: float) -> QuotaExceeded:
    return QuotaExceeded(
        f"tenant {tenant!r} is over its quota of {per_minute} images a minute (images "
        "classified on request, by any door; bulk jobs are not counted)",
        reason="QUOTA_IMAGES_PER_MINUTE",
        retry_after=max(retry_after, 0.001),
    )
