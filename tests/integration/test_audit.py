"""The audit log's Redis stream is bounded by age and by count (real Redis)."""

from __future__ import annotations

import io
import time

import redis

from perito_core.access.audit import AUDIT_KEY, AuditLog, AuditRecord


def _record(audit: AuditLog, tenant: str, method: str, resource: str) -> None:
    """A call that succeeded, written to `audit`."""
    audit.record(AuditRecord.now(tenant=tenant, method=method, resource=resource, outcome="OK"))


def test_a_flood_of_records_keeps_the_stream_bounded(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.delete(AUDIT_KEY)
        audit = AuditLog(client, retention_s=3600, stream=io.StringIO(), max_entries=100)
        for n in range(1000):
            _record(audit, "hammer", "SubmitJob", f"job-{n}")
        # Trimming is approximate (whole stream nodes of up to 100 entries): never far over.
        assert 100 <= client.xlen(AUDIT_KEY) <= 200
        newest = audit.list(limit=1)
        assert [r.resource for r in newest] == ["job-999"]
        client.delete(AUDIT_KEY)


def test_records_older_than_the_retention_are_trimmed_and_recent_ones_kept(
    redis_url: str,
) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.delete(AUDIT_KEY)
        audit = AuditLog(client, retention_s=1.0, stream=io.StringIO(), max_entries=100_000)
        for n in range(1000):
            _record(audit, "early", "SubmitJob", f"old-{n}")
        assert client.xlen(AUDIT_KEY) == 1000  # all within the retention while written
        time.sleep(1.5)
        for n in range(20):
            _record(audit, "late", "CancelJob", f"new-{n}")
        # Trimming by age is approximate too: a stream node is dropped once all of it is older
        # than the retention, so at most one node of old records (up to 100) stays.
        kept = audit.list(limit=2000)
        recent = [r.resource for r in kept if r.tenant == "late"]
        assert recent == [f"new-{n}" for n in reversed(range(20))]
        assert len(kept) - len(recent) < 100
        client.delete(AUDIT_KEY)
