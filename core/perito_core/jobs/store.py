"""The job store: bulk jobs, their counters and per-item results, in Redis.

Keys, for job `{id}`:

    perito:job:{id}              hash: the job record and its counters (`progress_at`: when
                                  its last result was recorded, for `stalled_seconds`)
    perito:job:{id}:inputs       list: each item's {"id", "uri"} in input order
    perito:job:{id}:inline       hash: index -> image bytes, for images sent inline
    perito:job:{id}:results      hash: index -> the item's final result (JSON)
    perito:job:{id}:open         hash: chunk -> items of it not recorded yet (gone when 0)
    perito:job:{id}:leases       hash: chunk -> "holder expiry_ms" of the worker running it
    perito:job:{id}:attempts     hash: chunk -> times a worker started it (the retry cap)
    perito:job:{id}:chunk-errors hash: chunk -> why its last attempt ended early
    perito:jobs                  sorted set: job ids by creation time
    perito:active-jobs           sorted set: jobs not yet terminal, by creation time
    perito:finished-jobs         sorted set: terminal jobs by end time (for retention)
    perito:request:{tenant}:{request_id}  string: the job a tenant's request id made (24 h)
    perito:tenant:{tenant}:jobs   sorted set: the tenant's job ids by creation time (ListJobs)
    perito:tenant:{tenant}:active sorted set: the tenant's jobs not yet terminal, and those
                                  being submitted (its concurrent-jobs quota)
    perito:dead-letter           list: chunks given up on, with the reason (capped)
    perito:output:{location}     string: the job writing its results files there (see
                                  `claim_output`), kept the job's retention and a day more

An item's result is written once: `record_results` sets it only if absent and bumps the
counters in the same Lua script, so a redelivered chunk never double-counts, and
succeeded + failed + cancelled never exceeds total. The call that brings that sum to total is
told so, and finalises the job (results files, terminal state).

A chunk is run under a lease: the worker that takes it renews the lease while it works, so a
second delivery of the same chunk (the broker's visibility timeout, or a resend) is skipped
while the first is alive, and a dead worker's chunk is found by its expired lease. The
watchdog (`perito_core.jobs.watchdog`) resends chunks that are open, unleased and not queued.
Times in the Lua scripts come from Redis's own clock (`TIME`), so hosts need not agree.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

import redis

# The API's job and item states: the contract's, which the SDK returns too.
from perito.v1.vocabulary import ItemState, JobState
from perito_core.errors import InvalidArgument, NotFound, StorageUnavailable
from perito_core.models.provenance import ServedVersion
from perito_core.quality import Quality

PREFIX = "perito"
# Jobs per state, moved by the same scripts that move each job.
STATE_COUNTS_KEY = f"{PREFIX}:job-states"


@dataclass(frozen=True)
class ItemInput:
    """One item of a job as submitted: an id, and a URI unless it came inline. `error` is set
    for an item found unreadable at submission (a listed object outside what the caller may
    read, such as a symlink out of the folder): it fails with that reason, never read."""

    id: str
    uri: str = ""
    error: str = ""


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
    first_frame_only: bool = False
    # Which form of the model answered (`openvino-int8`, `torchscript-fp32`, ...).
    form: str = ""
    # sha256 (hex) of the image's bytes as read, for its provenance (the version's file
    # digests are the job's: `Job.served`). 75 bytes of the stored JSON.
    input_sha256: str = ""
    # The photo's quality measures and issues (`perito_core.quality`); None when the image
    # was not decoded (or was recorded before the gate). About 200 bytes of the stored JSON.
    quality: Quality | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "state": self.state.value,
                "predictions": self.predictions,
                "margin": round(self.margin, 6),
                "normalized_entropy": round(self.normalized_entropy, 6),
                "uncertain": self.uncertain,
                "error": self.error,
                **({"first_frame_only": True} if self.first_frame_only else {}),
                **({"form": self.form} if self.form else {}),
                **({"sha256": self.input_sha256} if self.input_sha256 else {}),
                **({"quality": self.quality.as_dict()} if self.quality else {}),
            },
            separators=(",", ":"),
            allow_nan=False,
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
            first_frame_only=data.get("first_frame_only", False),
            form=data.get("form", ""),
            input_sha256=data.get("sha256", ""),
            quality=Quality.from_dict(data["quality"]) if data.get("quality") else None,
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
    # The form the caller asked for ("": the workers' PERITO_PRECISION; never less exact).
    precision: str = ""
    chunk_size: int = 64
    cancel_requested: bool = False
    completed_at: float = 0.0  # when the last item was recorded
    finalize_attempts: int = 0
    finalize_first_failure: float = 0.0  # Unix seconds; 0: no write of its files failed
    finalize_last_failure: float = 0.0
    tenant: str = ""  # who submitted it; "" for jobs recorded before tenants existed
    # The pinned version's file digests and threshold, for each item's provenance; None for
    # jobs recorded before provenance.
    served: ServedVersion | None = None

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    @property
    def chunks(self) -> int:
        """How many chunks the job is split into."""
        return chunk_count(self.total, self.chunk_size)


def chunk_count(total: int, chunk_size: int) -> int:
    """Chunks of `chunk_size` items (the last may be shorter) that `total` items make."""
    return -(-total // chunk_size)


@functools.cache
def _lua(name: str) -> str:
    """The Lua script `lua/{name}.lua` beside this module (package data: in a wheel too).

    Each file says its KEYS, ARGV and reply. The scripts that write refuse to touch a job
    that is gone (deleted after its retention) or terminal, so a late worker never recreates
    keys nobody will delete.
    """
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()


# Per-job keys besides the record itself; `finish.lua` drops the first five of them.
_RUNNING_PARTS = ("inline", "open", "leases", "attempts", "chunk-errors")
_PARTS = (*_RUNNING_PARTS, "inputs", "results")

_OUTPUT_PREFIX = f"{PREFIX}:output:"
# The watchdog's sweep lock: one server at a time runs a sweep (`watchdog.Watchdog`).
_SWEEP_LOCK_KEY = f"{PREFIX}:watchdog-lock"
ACTIVE_JOBS_KEY = f"{PREFIX}:active-jobs"
FINISHED_JOBS_KEY = f"{PREFIX}:finished-jobs"
JOBS_KEY = f"{PREFIX}:jobs"
DEAD_LETTER_KEY = f"{PREFIX}:dead-letter"
DEAD_LETTER_CAP = 10_000
REQUEST_ID_TTL_S = 24 * 3600
# What a request id's key holds once the job it made is deleted: "deleted:{job id}".
DELETED_MARK = "deleted:"
# A half-written job's inputs (its submission died while listing) expire after this.
_BUILDING_TTL_S = 3600
_INPUTS_PAGE = 1000


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


@dataclass(frozen=True)
class Lease:
    """A worker's hold on one chunk; see `JobStore.acquire_chunk`."""

    outcome: str  # acquired, busy, done, terminal or gone
    attempts: int = 0


class JobStore:
    """Jobs in Redis. Every method is one or a few round trips; safe across processes.

    Args:
        client: the Redis connection. Workers give it a `redis.retry.Retry` so a Redis restart
            is waited out rather than failing a chunk (see `connect`).
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._record = client.register_script(_lua("record"))
        self._mark_rest = client.register_script(_lua("mark_rest"))
        self._start = client.register_script(_lua("start"))
        self._finish = client.register_script(_lua("finish"))
        self._acquire = client.register_script(_lua("acquire"))
        self._renew = client.register_script(_lua("renew"))
        self._unleased = client.register_script(_lua("unleased"))
        self._delete = client.register_script(_lua("delete"))
        self._reserve = client.register_script(_lua("reserve"))
        self._sweep_lock = client.register_script(_lua("sweep_lock"))
        self._release_claims = client.register_script(_lua("release_claims"))
        self._stalled = client.register_script(_lua("stalled"))

    @classmethod
    def connect(cls, url: str, *, outage_retry_s: float = 0.0) -> JobStore:
        """Connect to the Redis at `url`.

        Args:
            outage_retry_s: how long a call keeps retrying (exponential backoff, 0.1 s to
                5 s between tries) through a Redis that is down or restarting, before it raises
                `StorageUnavailable`. 0 retries nothing: the server answers UNAVAILABLE at once.
        """
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        from perito_core.redis_connection import redis_client

        retries = 0
        waited = 0.0
        while waited < outage_retry_s:
            waited += min(5.0, 0.1 * 2**retries)
            retries += 1
        # Any URL of perito_core.redis_connection; with Sentinel, each new connection goes to
        # the primary the sentinels name now, and a failover is waited out like a restart: a
        # demoted primary's READONLY is retried too (as a ConnectionError, or as itself behind
        # an address that moved, such as a managed Redis's endpoint).
        client = redis_client(
            url,
            socket_connect_timeout=3,
            socket_timeout=30,
            retry=Retry(ExponentialBackoff(cap=5.0, base=0.1), retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError],
        )
        return cls(client)

    @staticmethod
    def _key(job_id: str, part: str = "") -> str:
        return f"{PREFIX}:job:{job_id}" + (f":{part}" if part else "")

    @staticmethod
    def _tenant_key(tenant: str, part: str) -> str:
        return f"{PREFIX}:tenant:{tenant}:{part}"

    # Creating

    @_redis_unavailable
    def claim_request(self, request_id: str, job_id: str, tenant: str = "") -> str:
        """The job id for a SubmitJob `request_id` (Google AIP-155): `job_id` if this is the
        first time `tenant` used the id in 24 h, else the job its first request made. Ids are
        scoped per tenant: another tenant's id never names (nor reveals) someone's job."""
        key = self._request_key(request_id, tenant)
        if self.redis.set(key, job_id, nx=True, ex=REQUEST_ID_TTL_S):
            return job_id
        return _decode(self.redis.get(key)) or job_id

    @staticmethod
    def _request_key(request_id: str, tenant: str) -> str:
        scope = f"{tenant}:" if tenant else ""
        return f"{PREFIX}:request:{scope}{request_id}"

    @_redis_unavailable
    def reserve_slot(self, tenant: str, job_id: str, limit: int) -> bool:
        """Hold one of `tenant`'s `limit` concurrent-job slots for `job_id`, which is about
        to be created; False if every slot is taken. The slot is freed when the job ends
        (`finish`), or by `release_slot` if its submission fails; a submission that died
        without either frees it after an hour. Atomic across server replicas."""
        now = time.time()
        return bool(
            self._reserve(
                keys=[self._tenant_key(tenant, "active")],
                args=[job_id, limit, now, now - _BUILDING_TTL_S, f"{PREFIX}:job:"],
            )
        )

    @_redis_unavailable
    def release_slot(self, tenant: str, job_id: str) -> None:
        """Free `job_id`'s slot if it never became a job (its submission failed)."""
        if not self.exists(job_id):
            self.redis.zrem(self._tenant_key(tenant, "active"), job_id)

    @_redis_unavailable
    def claim_output(self, job_id: str, locations: Sequence[str], ttl_s: int) -> bool:
        """Make the output location `locations[0]` `job_id`'s for `ttl_s` seconds, unless it,
        or a folder above it (the rest of `locations`), is another job's; then return False
        and claim nothing. Claiming a location the job holds already is True."""
        keys = [_OUTPUT_PREFIX + location for location in locations]
        owners = self.redis.mget(keys)
        if any(owner is not None and _decode(owner) != job_id for owner in owners):
            return False
        if self.redis.set(keys[0], job_id, nx=True, ex=ttl_s):
            return True
        return _decode(self.redis.get(keys[0])) in ("", job_id)  # "": expired since

    @_redis_unavailable
    def release_claims(
        self, job_id: str, *, request_id: str = "", tenant: str = "", output_location: str = ""
    ) -> None:
        """Forget what `claim_request` and `claim_output` recorded for `job_id` when its
        submission was refused: the request id (so it may be sent again) and the output
        location `locations[0]` of `claim_output`. Nothing changes if the job exists, nor for
        a claim that names another job; atomic."""
        keys = [self._key(job_id)]
        if request_id:
            keys.append(self._request_key(request_id, tenant))
        if output_location:
            keys.append(_OUTPUT_PREFIX + output_location)
        if len(keys) > 1:
            self._release_claims(keys=keys, args=[job_id])

    @_redis_unavailable
    def hold_sweep_lock(self, holder: str, ttl_ms: int) -> bool:
        """Take the watchdog's sweep lock for `holder`, or renew it if `holder` has it, for
        `ttl_ms` milliseconds: True if `holder` holds it now (one server sweeps at a time)."""
        return bool(self._sweep_lock(keys=[_SWEEP_LOCK_KEY], args=[holder, ttl_ms]))

    @_redis_unavailable
    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(self._key(job_id)))

    @_redis_unavailable
    def create(
        self,
        *,
        model: str,
        model_version: str,
        items: Iterable[ItemInput],
        inline: dict[int, bytes],
        output_uri: str,
        top_k: int,
        confidence_threshold: float,
        chunk_size: int,
        labels: dict[str, str],
        job_id: str | None = None,
        max_items: int | None = None,
        request_id: str = "",
        tenant: str = "",
        precision: str = "",
        served: ServedVersion | None = None,
    ) -> tuple[Job, bool]:
        """Record a new queued job and its inputs; returns it, and whether this call made it.

        `items` is consumed as it is produced (a listing or a manifest being read), a page of
        1,000 at a time, so the caller never holds them all; the job appears only once every
        item is written, in one transaction. Creating `job_id` again returns the job that
        exists (an idempotent retry: `(job, False)`), and a creation that died half-way
        leaves nothing but a list that expires after an hour.

        Raises:
            InvalidArgument: no items, or more than `max_items` (field `input`), counted
                while reading.
            StorageUnavailable: Redis is unreachable.
        """
        job_id = job_id or uuid.uuid4().hex[:20]
        if self.exists(job_id):
            return self.get(job_id), False
        building = self._key(job_id, f"inputs-building-{uuid.uuid4().hex[:8]}")
        total = 0
        try:
            page: list[str] = []
            for item in items:
                total += 1
                if max_items is not None and total > max_items:
                    raise InvalidArgument(
                        f"more than {max_items:,} images; the limit per job is {max_items:,}",
                        field="input",
                    )
                record = {"id": item.id, "uri": item.uri}
                if item.error:
                    record["error"] = item.error
                page.append(json.dumps(record))
                if len(page) == _INPUTS_PAGE:
                    self._append_inputs(building, page)
                    page = []
            if page:
                self._append_inputs(building, page)
            if not total:
                raise InvalidArgument("a job needs at least one image", field="input")
            return self._commit(
                job_id,
                building,
                total,
                inline,
                model=model,
                model_version=model_version,
                output_uri=output_uri,
                top_k=top_k,
                confidence_threshold=confidence_threshold,
                precision=precision,
                chunk_size=chunk_size,
                labels=labels,
                request_id=request_id,
                tenant=tenant,
                served=served.to_json() if served is not None else "",
            )
        finally:
            self.redis.delete(building)  # gone already if committed (renamed)

    def _append_inputs(self, key: str, page: list[str]) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, *page)
            pipe.expire(key, _BUILDING_TTL_S)
            pipe.execute()

    def _commit(
        self,
        job_id: str,
        building: str,
        total: int,
        inline: dict[int, bytes],
        *,
        chunk_size: int,
        labels: dict[str, str],
        tenant: str,
        **fields: Any,
    ) -> tuple[Job, bool]:
        key = self._key(job_id)
        chunks = chunk_count(total, chunk_size)
        with self.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)  # type: ignore[no-untyped-call]
                if pipe.exists(key):  # a concurrent retry of the same request won
                    pipe.reset()
                    return self.get(job_id), False
                now = time.time()
                pipe.multi()
                record: dict[Any, Any] = {
                    "id": job_id,
                    "state": JobState.QUEUED.value,
                    "total": total,
                    "succeeded": 0,
                    "failed": 0,
                    "cancelled": 0,
                    "created_at": now,
                    "labels": json.dumps(labels),
                    "chunk_size": chunk_size,
                    "tenant": tenant,
                    **fields,
                }
                pipe.hset(key, mapping=record)
                pipe.rename(building, self._key(job_id, "inputs"))
                pipe.persist(self._key(job_id, "inputs"))
                if inline:
                    pipe.hset(self._key(job_id, "inline"), mapping=inline)  # type: ignore[arg-type]
                for first in range(0, chunks, _INPUTS_PAGE):  # chunk -> its items not recorded
                    page = {
                        chunk: min(chunk_size, total - chunk * chunk_size)
                        for chunk in range(first, min(first + _INPUTS_PAGE, chunks))
                    }
                    pipe.hset(self._key(job_id, "open"), mapping=page)  # type: ignore[arg-type]
                pipe.zadd(JOBS_KEY, {job_id: now})
                pipe.zadd(ACTIVE_JOBS_KEY, {key: now})
                pipe.zadd(self._tenant_key(tenant, "jobs"), {job_id: now})
                pipe.zadd(self._tenant_key(tenant, "active"), {job_id: now})
                pipe.hincrby(STATE_COUNTS_KEY, JobState.QUEUED.value, 1)
                pipe.execute()
            except redis.WatchError:
                return self.get(job_id), False
        return self.get(job_id), True

    # Reading

    @_redis_unavailable
    def get(self, job_id: str) -> Job:
        raw = self.redis.hgetall(self._key(job_id))
        if not raw:
            raise NotFound(f"job {job_id!r} not found", field="job_id")
        return self._job_of(raw)

    @staticmethod
    def _job_of(raw: dict[Any, Any]) -> Job:
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
            precision=data.get("precision", ""),
            chunk_size=int(data.get("chunk_size") or 64),
            cancel_requested=data.get("cancel_requested") == "1",
            completed_at=float(data.get("completed_at") or 0),
            finalize_attempts=int(data.get("finalize_attempts") or 0),
            finalize_first_failure=float(data.get("finalize_first_failure") or 0),
            finalize_last_failure=float(data.get("finalize_last_failure") or 0),
            tenant=data.get("tenant", ""),
            served=ServedVersion.from_json(data.get("served", "")),
        )

    @_redis_unavailable
    def list_jobs(
        self,
        tenant: str,
        *,
        page_size: int,
        page_token: str = "",
        states: frozenset[JobState] = frozenset(),
        labels: dict[str, str] | None = None,
        max_scanned: int = 2000,
    ) -> tuple[list[Job], str]:
        """`tenant`'s jobs, newest first, a page at a time; returns (jobs, next page token).

        A page may hold fewer than `page_size` jobs when the filters (any of `states`, every
        one of `labels`) skip many: at most `max_scanned` records are read per call, and
        the token goes on from there (Google AIP-158). Tokens are positions in creation
        time, so jobs created meanwhile never shift a listing already under way.

        Raises:
            InvalidArgument: a malformed `page_token`.
        """
        key = self._tenant_key(tenant, "jobs")
        cursor: tuple[float, str] | None = None
        if page_token:
            score, _, member = page_token.partition(":")
            try:
                cursor = (float(score), member)
            except ValueError:
                raise InvalidArgument("invalid page_token", field="page_token") from None
        found: list[Job] = []
        scanned = 0
        while len(found) < page_size and scanned < max_scanned:
            entries = self._jobs_after(key, cursor, 200)
            if not entries:
                return found, ""
            with self.redis.pipeline(transaction=False) as pipe:
                for member, _ in entries:
                    pipe.hgetall(self._key(member))
                records = pipe.execute()
            for (member, at), raw in zip(entries, records, strict=True):
                scanned += 1
                cursor = (at, member)
                if raw:
                    job = self._job_of(raw)
                    if (not states or job.state in states) and all(
                        job.labels.get(k) == v for k, v in (labels or {}).items()
                    ):
                        found.append(job)
                if len(found) == page_size or scanned >= max_scanned:
                    break
        if cursor is None or not self._jobs_after(key, cursor, 1):
            return found, ""
        return found, f"{cursor[0]!r}:{cursor[1]}"

    def _jobs_after(
        self, key: str, cursor: tuple[float, str] | None, count: int
    ) -> list[tuple[str, float]]:
        """Up to `count` (job id, created) entries of a tenant's jobs after `cursor`, newest
        first (ties in time in reverse id order, as Redis lists them)."""
        high = "+inf" if cursor is None else repr(cursor[0])
        raw = self.redis.zrevrangebyscore(
            key, high, "-inf", start=0, num=count + 64, withscores=True
        )
        entries = [(_decode(member), float(at)) for member, at in raw]  # type: ignore[str-unpack,arg-type]
        if cursor is not None:
            entries = [(m, at) for m, at in entries if at < cursor[0] or m < cursor[1]]
        return entries[:count]

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

    @_redis_unavailable
    def active_jobs(self) -> list[str]:
        """Ids of every job not yet terminal, oldest first."""
        keys = self.redis.zrange(ACTIVE_JOBS_KEY, 0, -1)
        return [_decode(k).removeprefix(f"{PREFIX}:job:") for k in keys]  # type: ignore[arg-type]

    # Progress

    @_redis_unavailable
    def mark_running(self, job_id: str) -> JobState:
        keys = [self._key(job_id), STATE_COUNTS_KEY]
        return JobState(_decode(self._start(keys=keys)))

    @_redis_unavailable
    def record_results(self, job_id: str, results: Iterable[ItemResult]) -> tuple[int, bool]:
        """Record results not recorded before; returns (newly recorded, job now complete).

        A job that is terminal or gone records nothing and returns (0, False)."""
        args: list[Any] = []
        for result in results:
            args += [result.index, result.to_json(), result.state.value]
        if not args:
            return 0, False
        new, succeeded, failed, cancelled, total = self._record(
            keys=[self._key(job_id), self._key(job_id, "results"), self._key(job_id, "open")],
            args=args,
        )
        if int(new) < 0:
            return 0, False
        return int(new), int(succeeded) + int(failed) + int(cancelled) >= int(total)

    @_redis_unavailable
    def mark_unrecorded(self, job_id: str, state: ItemState, error: str) -> int:
        """Give every item without a result `state` (cancelled, or failed with `error`)."""
        result = ItemResult(0, state, error=error).to_json()
        keys = [self._key(job_id), self._key(job_id, "results"), self._key(job_id, "open")]
        marked: int = self._mark_rest(keys=keys, args=[result, state.value])
        return marked

    @_redis_unavailable
    def request_cancel(self, job_id: str) -> None:
        self.redis.hset(self._key(job_id), "cancel_requested", "1")

    @_redis_unavailable
    def is_cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self._key(job_id), "cancel_requested") == b"1"

    # Chunks

    @_redis_unavailable
    def acquire_chunk(self, job_id: str, chunk: int, holder: str, ttl_s: float) -> Lease:
        """Take the lease on `chunk` for `holder` for `ttl_s` seconds, counting an attempt.

        Returns a `Lease` whose outcome is `acquired` (with the attempt number), `busy`
        (another holder's lease is live: this is a duplicate delivery), `done` (nothing left
        to do), `terminal` or `gone` (the job ended or was deleted)."""
        outcome, attempts = self._acquire(
            keys=[
                self._key(job_id),
                self._key(job_id, "open"),
                self._key(job_id, "leases"),
                self._key(job_id, "attempts"),
            ],
            args=[chunk, holder, int(ttl_s * 1000)],
        )
        return Lease(_decode(outcome), int(attempts))

    @_redis_unavailable
    def renew_chunk(self, job_id: str, chunk: int, holder: str, ttl_s: float) -> bool:
        """Extend `holder`'s lease on `chunk`; False if it was lost (expired and taken)."""
        keys = [self._key(job_id, "leases")]
        return bool(self._renew(keys=keys, args=[chunk, holder, max(1, int(ttl_s * 1000))]))

    @_redis_unavailable
    def release_chunk(self, job_id: str, chunk: int, holder: str, error: str = "") -> None:
        """Give up `holder`'s lease on `chunk`; `error` says why the attempt ended early."""
        if error:
            self.redis.hset(self._key(job_id, "chunk-errors"), str(chunk), error)
        self._renew(keys=[self._key(job_id, "leases")], args=[chunk, holder, 0])

    @_redis_unavailable
    def chunk_error(self, job_id: str, chunk: int) -> str:
        """Why `chunk`'s last attempt ended early ('' if none said: its worker died)."""
        return _decode(self.redis.hget(self._key(job_id, "chunk-errors"), str(chunk)))

    @_redis_unavailable
    def unleased_chunks(self, job_id: str) -> list[int]:
        """Chunks of the job with unrecorded items and no live lease."""
        keys = [self._key(job_id, "open"), self._key(job_id, "leases")]
        return sorted(int(c) for c in self._unleased(keys=keys))

    @_redis_unavailable
    def note_resent(self, job_id: str, count: int) -> None:
        self.redis.hincrby(self._key(job_id), "resent", count)

    @_redis_unavailable
    def dead_letter(self, job_id: str, chunk: int, reason: str) -> None:
        """Record a chunk given up on; the newest `DEAD_LETTER_CAP` records are kept."""
        record = json.dumps({"job_id": job_id, "chunk": chunk, "reason": reason, "at": time.time()})
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(DEAD_LETTER_KEY, record)
            pipe.ltrim(DEAD_LETTER_KEY, -DEAD_LETTER_CAP, -1)
            pipe.execute()

    @_redis_unavailable
    def set_job_error(self, job_id: str, error: str) -> None:
        self.redis.hsetnx(self._key(job_id), "error", error)

    @_redis_unavailable
    def note_finalize_failure(self, job_id: str) -> tuple[int, float]:
        """Count a failed write of the results files; returns (failures so far, time of the
        first one, in Unix seconds)."""
        now = time.time()
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(self._key(job_id), "finalize_attempts", 1)
            pipe.hsetnx(self._key(job_id), "finalize_first_failure", now)
            pipe.hset(self._key(job_id), "finalize_last_failure", now)
            pipe.hget(self._key(job_id), "finalize_first_failure")
            attempts, _, _, first = pipe.execute()
        return int(attempts), float(first)

    # Ending

    @_redis_unavailable
    def finish(self, job_id: str, result_uris: list[str], error: str = "") -> Job:
        """Set the terminal state from the counters; idempotent.

        Args:
            error: a job-level failure (for example, results that could not be written): the
                job ends FAILED with it, whatever its items did.
        """
        job = self.get(job_id)
        if job.state.terminal:
            return job
        if job.done < job.total:
            raise RuntimeError(f"job {job_id} has {job.total - job.done} items unaccounted for")
        if job.cancel_requested and job.cancelled:
            state = JobState.CANCELLED
        elif error or job.error or job.succeeded == 0:
            state = JobState.FAILED
        elif job.failed or job.cancelled:
            state = JobState.PARTIALLY_SUCCEEDED
        else:
            state = JobState.SUCCEEDED
        self._finish(
            keys=[
                self._key(job_id),
                STATE_COUNTS_KEY,
                ACTIVE_JOBS_KEY,
                FINISHED_JOBS_KEY,
                *(self._key(job_id, part) for part in _RUNNING_PARTS),
                self._tenant_key(job.tenant, "active"),
            ],
            args=[state.value, json.dumps(result_uris), error, job_id],
        )
        return self.get(job_id)

    @_redis_unavailable
    def delete(self, job_id: str) -> bool:
        """Delete a terminal job and everything stored for it (results files stay where
        they were written). Returns False, deleting nothing, if the job is not terminal.

        Raises:
            NotFound: no such job.
        """
        tenant, request_id = (
            _decode(v) for v in self.redis.hmget(self._key(job_id), ["tenant", "request_id"])
        )
        outcome = self._delete(
            keys=[
                self._key(job_id),
                STATE_COUNTS_KEY,
                JOBS_KEY,
                FINISHED_JOBS_KEY,
                ACTIVE_JOBS_KEY,
                self._tenant_key(tenant, "jobs"),
                *(self._key(job_id, part) for part in _PARTS),
            ],
            args=[job_id],
        )
        if outcome == b"gone" or outcome == "gone":
            raise NotFound(f"job {job_id!r} not found", field="job_id")
        if outcome and request_id:  # a retry of its request must not make the job again
            key = self._request_key(request_id, tenant)
            self.redis.set(key, DELETED_MARK + job_id, xx=True, keepttl=True)
        return bool(outcome)

    @_redis_unavailable
    def expired_jobs(self, retention_s: float, limit: int = 500) -> list[str]:
        """Ids of terminal jobs that ended more than `retention_s` seconds ago."""
        keys = self.redis.zrangebyscore(
            FINISHED_JOBS_KEY, 0, time.time() - retention_s, start=0, num=limit
        )
        return [_decode(k).removeprefix(f"{PREFIX}:job:") for k in keys]  # type: ignore[arg-type]

    @_redis_unavailable
    def dead_letter_count(self) -> int:
        """Chunks on the dead-letter list now (at most `DEAD_LETTER_CAP`)."""
        count: int = self.redis.llen(DEAD_LETTER_KEY)
        return count

    @_redis_unavailable
    def stalled_seconds(self) -> dict[JobState, float]:
        """The longest time, in seconds, a queued job has waited since it was made and a
        running job has gone without recording a result (or, before its first, since it
        started), as `{QUEUED: s, RUNNING: s}`; 0 where no job is in that state.

        One script over the jobs not yet terminal (their number is bounded by the tenants'
        concurrent-jobs quotas). Start and progress times are Redis's clock, creation times
        the submitting server's.
        """
        queued, running = self._stalled(keys=[ACTIVE_JOBS_KEY])
        return {JobState.QUEUED: float(queued), JobState.RUNNING: float(running)}

    @_redis_unavailable
    def state_counts(self) -> dict[JobState, int]:
        """How many jobs are in each state now (kept up to date by every transition)."""
        raw = self.redis.hgetall(STATE_COUNTS_KEY)
        counts = {_decode(k): int(v) for k, v in raw.items()}
        return {state: counts.get(state.value, 0) for state in JobState}
