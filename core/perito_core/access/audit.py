"""The audit log: one structured record per state-changing call.

Submit, cancel and delete of jobs, model publishes and alias moves, tenants changes: each
writes one JSON line to stdout (where container platforms ship logs from) and one entry in
the Redis stream `perito:audit`, trimmed to the job retention period and to at most
`max_entries` entries (a flood of refused calls cannot grow it without bound), which
`perito audit` reads. A record says when, who (tenant), what (method), on what (resource),
how it ended (outcome: `OK` or the status code name) and the request id; refused calls are
recorded too.

Writing the Redis entry is best effort: an audit record that cannot be stored is logged as
an error and the call goes on (stdout has the line either way); the job store would be down
too, and the call would fail on its own.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import redis

log = logging.getLogger(__name__)

AUDIT_KEY = "perito:audit"


@dataclass(frozen=True)
class AuditRecord:
    """One state-changing call."""

    time: float
    tenant: str
    method: str
    resource: str
    outcome: str
    request_id: str = ""
    detail: str = ""

    def to_json(self) -> str:
        return json.dumps({"audit": True, **asdict(self)}, separators=(",", ":"))


class AuditLog:
    """Records to stdout as JSON lines and to a Redis stream kept for `retention_s`.

    Args:
        client: the job store's Redis, or None for stdout only (tools run without Redis).
        retention_s: entries older than this are trimmed as new ones are added.
        stream: where the JSON lines go (stdout).
        max_entries: the most entries kept, whatever their age (about 300 bytes each in
            Redis: 100,000 are some 30 MB); the oldest go first.
    """

    def __init__(
        self,
        client: redis.Redis | None,
        retention_s: float,
        stream: TextIO | None = None,
        *,
        max_entries: int = 100_000,
    ) -> None:
        self.redis = client
        self.retention_s = retention_s
        self.max_entries = max_entries
        self._stream = stream

    def record(
        self,
        *,
        tenant: str,
        method: str,
        resource: str,
        outcome: str,
        request_id: str = "",
        detail: str = "",
    ) -> AuditRecord:
        """Write one record (see the module docstring); never raises for storage."""
        entry = AuditRecord(
            time=time.time(),
            tenant=tenant,
            method=method,
            resource=resource[:512],
            outcome=outcome,
            request_id=request_id[:128],
            detail=detail[:512],
        )
        out = self._stream or sys.stdout
        try:
            out.write(entry.to_json() + "\n")
            out.flush()
        except (OSError, ValueError):  # stdout closed: the Redis entry still counts
            pass
        if self.redis is not None:
            oldest_ms = int((entry.time - self.retention_s) * 1000)
            fields: dict[Any, Any] = {k: str(v) for k, v in asdict(entry).items()}
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    pipe.xadd(AUDIT_KEY, fields, minid=max(oldest_ms, 0), approximate=True)
                    pipe.xtrim(AUDIT_KEY, maxlen=self.max_entries, approximate=True)
                    pipe.execute()
            except redis.RedisError as exc:
                log.error("audit record not stored in Redis (its JSON line was written): %s", exc)
        return entry

    def list(
        self,
        *,
        tenant: str | None = None,
        method: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """The newest records first, at most `limit`, filtered by tenant, method and time.

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        assert self.redis is not None
        found: list[AuditRecord] = []
        high = "+"
        low = f"{int(since * 1000)}-0" if since else "-"
        while len(found) < limit:
            batch = self.redis.xrevrange(AUDIT_KEY, max=high, min=low, count=500)
            if not batch:
                break
            for _, raw in batch:
                data = {_text(k): _text(v) for k, v in (raw or {}).items()}
                record = AuditRecord(
                    time=float(data.get("time") or 0),
                    tenant=data.get("tenant", ""),
                    method=data.get("method", ""),
                    resource=data.get("resource", ""),
                    outcome=data.get("outcome", ""),
                    request_id=data.get("request_id", ""),
                    detail=data.get("detail", ""),
                )
                if (tenant is None or record.tenant == tenant) and (
                    method is None or record.method == method
                ):
                    found.append(record)
                    if len(found) == limit:
                        break
            high = "(" + _text(batch[-1][0] or b"")  # exclusive: older than the last one read
        return found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
