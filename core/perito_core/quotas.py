"""Per-tenant rate limits kept in Redis, so every server replica counts against one budget.

`RateLimiter` is GCRA (the generic cell rate algorithm, the token bucket written as one
timestamp per key: ATM Forum TM 4.1; the same as `redis-cell`): a tenant allowed `rate`
images a minute may spend a full minute's worth at once, then `rate / 60` a second. One key
per tenant holds the "theoretical arrival time"; one Lua script checks and moves it, with
Redis's own clock, so replicas need not agree on time and two calls never both take the last
images. A refusal says exactly when the request would fit (`retry_after`).
"""

from __future__ import annotations

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

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._gcra = client.register_script(_GCRA)

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
        if images > per_minute:
            raise QuotaExceeded(
                f"tenant {tenant!r}: {images} images in one request, more than its quota of "
                f"{per_minute} a minute",
                reason="QUOTA_IMAGES_PER_MINUTE",
            )
        try:
            allowed, wait_ms = self._gcra(
                keys=[f"{PREFIX}:{tenant}:classify"], args=[interval_ms, burst_ms, images]
            )
        except redis.RedisError as exc:
            raise StorageUnavailable(f"the quota store (Redis) is unreachable: {exc}") from None
        if not int(allowed):
            raise QuotaExceeded(
                f"tenant {tenant!r} is over its quota of {per_minute} Classify images a minute",
                reason="QUOTA_IMAGES_PER_MINUTE",
                retry_after=max(float(wait_ms) / 1000, 0.001),
            )
