"""The audit log: one structured record per state-changing call.

Submit, cancel and delete of jobs, model publishes and alias moves, tenants changes: each
writes one entry in the Redis stream `perito:audit`, trimmed to the job retention period and
to at most `max_entries` entries (a flood of refused calls cannot grow it without bound),
which `perito audit` reads. A record says when, who (tenant), what (method), on what
(resource), how it ended (outcome: `OK` or the status code name) and the request id; refused
calls are recorded too.

`perito serve` also writes each record as one JSON line to stdout, where container platforms
ship a server's logs from. A one-shot command (`perito models import`, `models alias`,
`tenants add`, `perito publish`) prints none: its output is for the person who ran it
(`record_command`).

Writing the Redis entry is best effort: in the server, an audit record that cannot be stored
is logged as an error and the call goes on (stdout has the line either way); the job store
would be down too, and the call would fail on its own.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TextIO

import redis

if TYPE_CHECKING:
    from perito_core.settings import CommonSettings

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

    @classmethod
    def now(
        cls,
        *,
        tenant: str,
        method: str,
        resource: str,
        outcome: str,
        request_id: str = "",
        detail: str = "",
    ) -> AuditRecord:
        """A record of a call ending now, its free-text fields cut to a bounded length."""
        return cls(
            time=time.time(),
            tenant=tenant,
            method=method,
            resource=resource[:512],
            outcome=outcome,
            request_id=request_id[:128],
            detail=detail[:512],
        )

    def to_json(self) -> str:
        return json.dumps({"audit": True, **asdict(self)}, separators=(",", ":"))


class AuditLog:
    """Records to a Redis stream kept for `retention_s`, and as JSON lines to `stream`.

    Args:
        client: the job store's Redis, or None for the JSON lines only.
        retention_s: entries older than this are trimmed as new ones are added.
        stream: where the JSON lines go (default: stdout, read when a record is written).
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

    def record(self, entry: AuditRecord) -> None:
        """Write `entry` (made by `AuditRecord.now`; see the module docstring); never raises
        for storage."""
        out = self._stream or sys.stdout
        try:
            out.write(entry.to_json() + "\n")
            out.flush()
        except (OSError, ValueError):  # stdout closed: the Redis entry still counts
            pass
        if self.redis is not None:
            try:
                self.store(entry)
            except redis.RedisError as exc:
                log.error("audit record not stored in Redis (its JSON line was written): %s", exc)

    def store(self, entry: AuditRecord) -> None:
        """Append `entry` to the Redis stream, trimming it by age and by count.

        Raises:
            redis.RedisError: Redis is unreachable or refused the write.
        """
        assert self.redis is not None
        oldest_ms = int((entry.time - self.retention_s) * 1000)
        fields: dict[Any, Any] = {k: str(v) for k, v in asdict(entry).items()}
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(AUDIT_KEY, fields, minid=max(oldest_ms, 0), approximate=True)
            pipe.xtrim(AUDIT_KEY, maxlen=self.max_entries, approximate=True)
            pipe.execute()

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


def record_command(
    settings: CommonSettings,
    *,
    tenant: str,
    method: str,
    resource: str,
    outcome: str,
    detail: str = "",
) -> str | None:
    """Store the audit record of a one-shot command's change in the audit log of `settings`
    (the Redis at `settings.redis_url`, kept for `settings.audit_retention_s`); print nothing.

    Returns:
        None when stored, or when it could not be and the user set no Redis URL
        (PERITO_REDIS_URL): a command run without Redis, publishing to a folder registry,
        has no audit log to write to and nothing to say about it. Else a sentence for the
        command to print once: the configured Redis could not be reached.
    """
    entry = AuditRecord.now(
        tenant=tenant, method=method, resource=resource, outcome=outcome, detail=detail
    )
    audit = settings.open_audit()
    try:
        audit.store(entry)
    except redis.RedisError as exc:
        if "redis_url" not in settings.model_fields_set:
            return None
        return f"note: the audit log (PERITO_REDIS_URL) did not get a record of this change: {exc}"
    finally:
        assert audit.redis is not None
        audit.redis.close()
    return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
