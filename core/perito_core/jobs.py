"""The job store: bulk jobs, their counters and per-item results, in Redis.

Keys, for job `{id}`:

    perito:job:{id}            hash: the job record and its counters
    perito:job:{id}:inputs     list: each item's {"id", "uri"} in input order
    perito:job:{id}:inline     hash: index -> image bytes, for images sent inline
    perito:job:{id}:results    hash: index -> the item's final result (JSON)
    perito:job:{id}:attempts   hash: chunk -> deliveries seen (the redelivery cap)
    perito:jobs                sorted set: job ids by creation time
    perito:dead-letter         list: chunks given up on, with the reason

An item's result is written once: `record_results` sets it only if absent and bumps the
counters in the same Lua script, so a redelivered chunk never double-counts, and
succeeded + failed + cancelled never exceeds total. The call that brings that sum to total is
told so, and finalises the job (results files, terminal state).
"""

from __future__ import annotations

import enum
import functools
import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis

from perito_core.errors import InvalidArgument, NotFound, StorageUnavailable

PREFIX = "perito"
# Jobs per state, moved by the same scripts that move each job.
STATE_COUNTS_KEY = f"{PREFIX}:job-states"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIALLY_SUCCEEDED = "partially_succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


class ItemState(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class ItemInput:
    """One item of a job as submitted: an id, and a URI unless it came inline."""

    id: str
    uri: str = ""


@dataclass
class ItemResult:
    """One item's outcome. `predictions` are (label, class_index, probability)."""

    index: int
    state: ItemState
    id: str = ""
    uri: str = ""
    predictions: list[tuple[str, int, float]] = field(default_factory=list)
    margin: float = 0.0
    normalized_entropy: float = 0.0
    uncertain: bool = False
    error: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "state": self.state.value,
                "predictions": self.predictions,
                "margin": round(self.margin, 6),
                "normalized_entropy": round(self.normalized_entropy, 6),
                "uncertain": self.uncertain,
                "error": self.error,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, index: int, item: ItemInput, raw: str | bytes) -> ItemResult:
        data = json.loads(raw)
        return cls(
            index=index,
            state=ItemState(data["state"]),
            id=item.id,
            uri=item.uri,
            predictions=[(p[0], int(p[1]), float(p[2])) for p in data["predictions"]],
            margin=data["margin"],
            normalized_entropy=data["normalized_entropy"],
            uncertain=data["uncertain"],
            error=data["error"],
        )


@dataclass
class Job:
    id: str
    state: JobState
    model: str
    model_version: str
    total: int
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    output_uri: str = ""
    result_uris: list[str] = field(default_factory=list)
    error: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    top_k: int = 5
    confidence_threshold: float = 0.0
    chunk_size: int = 64
    cancel_requested: bool = False

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.cancelled


# Record results for a chunk. KEYS: job, results. ARGV: pairs of (index, result json, state).
# Returns {newly recorded, succeeded, failed, cancelled, total}.
_RECORD = """
local new = 0
for i = 1, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    new = new + 1
    redis.call('HINCRBY', KEYS[1], ARGV[i + 2], 1)
  end
end
local v = redis.call('HMGET', KEYS[1], 'succeeded', 'failed', 'cancelled', 'total')
return {new, tonumber(v[1]), tonumber(v[2]), tonumber(v[3]), tonumber(v[4])}
"""

# Mark every item without a result with ARGV[1] (a result json) and state ARGV[2], for
# indices 0 .. total-1. KEYS: job, results. Returns the number marked.
_MARK_REST = """
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
local marked = 0
for i = 0, total - 1 do
  if redis.call('HSETNX', KEYS[2], i, ARGV[1]) == 1 then
    marked = marked + 1
    redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
  end
end
return marked
"""

# Move a job from queued to running, once. KEYS: job, state counts. ARGV: now.
_START = """
if redis.call('HGET', KEYS[1], 'state') == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[1])
  redis.call('HINCRBY', KEYS[2], 'queued', -1)
  redis.call('HINCRBY', KEYS[2], 'running', 1)
end
return redis.call('HGET', KEYS[1], 'state')
"""

# Give a job its terminal state, once. KEYS: job, state counts. ARGV: state, now, result URIs.
_FINISH = """
local current = redis.call('HGET', KEYS[1], 'state')
if current == 'queued' or current == 'running' then
  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished_at', ARGV[2], 'result_uris', ARGV[3])
  redis.call('HINCRBY', KEYS[2], current, -1)
  redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
end
return current
"""


def _decode(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


F = TypeVar("F", bound=Callable[..., Any])


def _redis_unavailable(method: F) -> F:
    """Turn an unreachable Redis into `StorageUnavailable`: UNAVAILABLE for callers of the
    server, a retry with backoff for workers; never a bare `redis` exception."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except redis.RedisError as exc:
            raise StorageUnavailable(f"the job store (Redis) is unreachable: {exc}") from None

    return wrapper  # type: ignore[return-value]


class JobStore:
    """Jobs in Redis. Every method is one or a few round trips; safe across processes."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._record = client.register_script(_RECORD)
        self._mark_rest = client.register_script(_MARK_REST)
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)

    @classmethod
    def connect(cls, url: str) -> JobStore:
        return cls(redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=30))

    @staticmethod
    def _key(job_id: str, part: str = "") -> str:
        return f"{PREFIX}:job:{job_id}" + (f":{part}" if part else "")

    # Creating

    @_redis_unavailable
    def create(
        self,
        *,
        model: str,
        model_version: str,
        items: Sequence[ItemInput],
        inline: dict[int, bytes],
        output_uri: str,
        top_k: int,
        confidence_threshold: float,
        chunk_size: int,
        labels: dict[str, str],
        job_id: str | None = None,
    ) -> Job:
        """Record a new queued job and its inputs; returns it."""
        if not items:
            raise InvalidArgument("a job needs at least one image", field="input")
        job_id = job_id or uuid.uuid4().hex[:20]
        now = time.time()
        record: dict[Any, Any] = {
            "id": job_id,
            "state": JobState.QUEUED.value,
            "model": model,
            "model_version": model_version,
            "total": len(items),
            "succeeded": 0,
            "failed": 0,
            "cancelled": 0,
            "created_at": now,
            "output_uri": output_uri,
            "labels": json.dumps(labels),
            "top_k": top_k,
            "confidence_threshold": confidence_threshold,
            "chunk_size": chunk_size,
        }
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(job_id), mapping=record)
            for start in range(0, len(items), 1000):
                pipe.rpush(
                    self._key(job_id, "inputs"),
                    *(json.dumps({"id": i.id, "uri": i.uri}) for i in items[start : start + 1000]),
                )
            if inline:
                pipe.hset(self._key(job_id, "inline"), mapping=inline)  # type: ignore[arg-type]
            pipe.zadd(f"{PREFIX}:jobs", {job_id: now})
            pipe.hincrby(STATE_COUNTS_KEY, JobState.QUEUED.value, 1)
            pipe.execute()
        return self.get(job_id)

    # Reading

    @_redis_unavailable
    def get(self, job_id: str) -> Job:
        raw = self.redis.hgetall(self._key(job_id))
        if not raw:
            raise NotFound(f"job {job_id!r} not found", field="job_id")
        data = {_decode(k): _decode(v) for k, v in raw.items()}
        return Job(
            id=data["id"],
            state=JobState(data["state"]),
            model=data["model"],
            model_version=data["model_version"],
            total=int(data["total"]),
            succeeded=int(data.get("succeeded") or 0),
            failed=int(data.get("failed") or 0),
            cancelled=int(data.get("cancelled") or 0),
            created_at=float(data.get("created_at") or 0),
            started_at=float(data.get("started_at") or 0),
            finished_at=float(data.get("finished_at") or 0),
            output_uri=data.get("output_uri", ""),
            result_uris=json.loads(data.get("result_uris") or "[]"),
            error=data.get("error", ""),
            labels=json.loads(data.get("labels") or "{}"),
            top_k=int(data.get("top_k") or 5),
            confidence_threshold=float(data.get("confidence_threshold") or 0),
            chunk_size=int(data.get("chunk_size") or 64),
            cancel_requested=data.get("cancel_requested") == "1",
        )

    @_redis_unavailable
    def inputs(self, job_id: str, start: int = 0, stop: int = -1) -> list[ItemInput]:
        """Items `start`..`stop` (inclusive; -1 is the last) as submitted."""
        raw = self.redis.lrange(self._key(job_id, "inputs"), start, stop)
        return [ItemInput(**json.loads(item)) for item in raw]

    @_redis_unavailable
    def inline_image(self, job_id: str, index: int) -> bytes | None:
        value = self.redis.hget(self._key(job_id, "inline"), str(index))
        return value if isinstance(value, bytes) else None

    @_redis_unavailable
    def results(self, job_id: str, start: int, count: int) -> list[ItemResult]:
        """Results for items start .. start+count-1, PENDING where none is recorded yet."""
        items = self.inputs(job_id, start, start + count - 1)
        indices = list(range(start, start + len(items)))
        raw = (
            self.redis.hmget(self._key(job_id, "results"), [str(i) for i in indices])
            if items
            else []
        )
        return [
            ItemResult.from_json(index, item, value)
            if value is not None
            else ItemResult(index, ItemState.PENDING, id=item.id, uri=item.uri)
            for index, item, value in zip(indices, items, raw, strict=True)
        ]

    @_redis_unavailable
    def recorded(self, job_id: str, indices: range) -> set[int]:
        """Which of `indices` already have a result."""
        if not len(indices):
            return set()
        raw = self.redis.hmget(self._key(job_id, "results"), [str(i) for i in indices])
        return {i for i, value in zip(indices, raw, strict=True) if value is not None}

    # Progress

    @_redis_unavailable
    def mark_running(self, job_id: str) -> JobState:
        keys = [self._key(job_id), STATE_COUNTS_KEY]
        return JobState(_decode(self._start(keys=keys, args=[time.time()])))

    @_redis_unavailable
    def record_results(self, job_id: str, results: Iterable[ItemResult]) -> tuple[int, bool]:
        """Record results not recorded before; returns (newly recorded, job now complete)."""
        args: list[Any] = []
        for result in results:
            args += [result.index, result.to_json(), result.state.value]
        if not args:
            return 0, False
        new, succeeded, failed, cancelled, total = self._record(
            keys=[self._key(job_id), self._key(job_id, "results")], args=args
        )
        return int(new), int(succeeded) + int(failed) + int(cancelled) >= int(total)

    @_redis_unavailable
    def mark_unrecorded(self, job_id: str, state: ItemState, error: str) -> int:
        """Give every item without a result `state` (cancelled, or failed with `error`)."""
        result = ItemResult(0, state, error=error).to_json()
        marked: int = self._mark_rest(
            keys=[self._key(job_id), self._key(job_id, "results")], args=[result, state.value]
        )
        return marked

    @_redis_unavailable
    def request_cancel(self, job_id: str) -> None:
        self.redis.hset(self._key(job_id), "cancel_requested", "1")

    @_redis_unavailable
    def is_cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self._key(job_id), "cancel_requested") == b"1"

    @_redis_unavailable
    def count_attempt(self, job_id: str, chunk: int) -> int:
        """Count one more delivery of `chunk`; returns how many there have been."""
        return int(self.redis.hincrby(self._key(job_id, "attempts"), str(chunk), 1))

    @_redis_unavailable
    def dead_letter(self, job_id: str, chunk: int, reason: str) -> None:
        record = json.dumps({"job_id": job_id, "chunk": chunk, "reason": reason, "at": time.time()})
        self.redis.rpush(f"{PREFIX}:dead-letter", record)

    @_redis_unavailable
    def set_job_error(self, job_id: str, error: str) -> None:
        self.redis.hsetnx(self._key(job_id), "error", error)

    @_redis_unavailable
    def finish(self, job_id: str, result_uris: list[str]) -> Job:
        """Set the terminal state from the counters; idempotent."""
        job = self.get(job_id)
        if job.state.terminal:
            return job
        if job.done < job.total:
            raise RuntimeError(f"job {job_id} has {job.total - job.done} items unaccounted for")
        if job.cancel_requested and job.cancelled:
            state = JobState.CANCELLED
        elif job.error or job.succeeded == 0:
            state = JobState.FAILED
        elif job.failed or job.cancelled:
            state = JobState.PARTIALLY_SUCCEEDED
        else:
            state = JobState.SUCCEEDED
        self._finish(
            keys=[self._key(job_id), STATE_COUNTS_KEY],
            args=[state.value, time.time(), json.dumps(result_uris)],
        )
        return self.get(job_id)

    @_redis_unavailable
    def state_counts(self) -> dict[JobState, int]:
        """How many jobs are in each state now (kept up to date by every transition)."""
        raw = self.redis.hgetall(STATE_COUNTS_KEY)
        counts = {_decode(k): int(v) for k, v in raw.items()}
        return {state: counts.get(state.value, 0) for state in JobState}
