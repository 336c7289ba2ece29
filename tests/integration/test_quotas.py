"""The images-per-minute limiter against a real Redis: shared budget, exact retry hints, and
refusals answered from memory without a Redis round trip while the tenant is over."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from perito_core.access.quotas import RateLimiter
from perito_core.errors import QuotaExceeded


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as connection:
        yield connection


def _spend_all(limiter: RateLimiter, tenant: str, per_minute: int) -> QuotaExceeded:
    """Take a minute's allowance one image at a time; return the first refusal."""
    for _ in range(per_minute):
        limiter.take(tenant, 1, per_minute)
    with pytest.raises(QuotaExceeded) as refused:
        limiter.take(tenant, 1, per_minute)
    return refused.value


def test_two_replicas_share_one_budget(client: redis.Redis) -> None:
    tenant = uuid.uuid4().hex
    one, two = RateLimiter(client), RateLimiter(client)
    for _ in range(30):
        one.take(tenant, 1, 60)
        two.take(tenant, 1, 60)
    with pytest.raises(QuotaExceeded) as refused:
        two.take(tenant, 1, 60)
    assert refused.value.reason == "QUOTA_IMAGES_PER_MINUTE"
    assert refused.value.retry_after is not None
    assert 0 < refused.value.retry_after <= 1.0  # one image a second refills


def test_a_tenant_over_quota_is_refused_from_memory_until_its_wait_is_over(
    client: redis.Redis,
) -> None:
    tenant, clock = uuid.uuid4().hex, Clock()
    limiter = RateLimiter(client, clock=clock)
    first = _spend_all(limiter, tenant, 60)
    calls = 0
    gcra = limiter._gcra

    def counted(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return gcra(*args, **kwargs)  # type: ignore[arg-type]

    limiter._gcra = counted  # type: ignore[assignment]
    for _ in range(100):
        with pytest.raises(QuotaExceeded) as refused:
            limiter.take(tenant, 1, 60)
        assert refused.value.retry_after is not None
        assert refused.value.retry_after <= first.retry_after + 1e-6  # type: ignore[operator]
    # Four images need three more seconds than one; the check before the body is read
    # (one image) refuses too.
    with pytest.raises(QuotaExceeded) as four:
        limiter.take(tenant, 4, 60)
    assert four.value.retry_after == pytest.approx(first.retry_after + 3, abs=0.01)  # type: ignore[operator]
    with pytest.raises(QuotaExceeded):
        limiter.refuse_if_blocked(tenant, 60)
    assert calls == 0  # not one Redis round trip for 102 refusals

    clock.now += first.retry_after  # type: ignore[operator]
    limiter.refuse_if_blocked(tenant, 60)  # one image fits now: no refusal from memory
    with pytest.raises(QuotaExceeded):
        limiter.refuse_if_blocked(tenant, 60, 4)


def test_memory_never_refuses_what_redis_would_admit(client: redis.Redis) -> None:
    """Refused, a tenant is admitted again as soon as its hint says; a refusal under one
    quota is not remembered against another (after a tenants-file change)."""
    tenant = uuid.uuid4().hex
    limiter = RateLimiter(client)
    refused = _spend_all(limiter, tenant, 60)
    limiter.refuse_if_blocked(tenant, 600)
    time.sleep(refused.retry_after)  # type: ignore[arg-type]
    limiter.take(tenant, 1, 60)
