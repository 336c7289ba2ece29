"""The audit log's Redis stream is bounded by age and by count (real Redis)."""

from __future__ import annotations

import io

import redis

from perito_core.access.audit import AUDIT_KEY, AuditLog


def test_a_flood_of_records_keeps_the_stream_bounded(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.delete(AUDIT_KEY)
        audit = AuditLog(client, retention_s=3600, stream=io.StringIO(), max_entries=100)
        for n in range(1000):
            audit.record(tenant="hammer", method="SubmitJob", resource=f"job-{n}", outcome="OK")
        # Trimming is approximate (whole stream nodes of up to 100 entries): never far over.
        assert 100 <= client.xlen(AUDIT_KEY) <= 200
        newest = audit.list(limit=1)
        assert [r.resource for r in newest] == ["job-999"]
        client.delete(AUDIT_KEY)
