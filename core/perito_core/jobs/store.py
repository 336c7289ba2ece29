"""The job store: bulk jobs, their counters and per-chunk progress, in Redis; their inputs and
results in object storage (`perito_core.jobs.parts`), under each job's data prefix.

Keys of job `<id>` (`job_key`), every one with the Redis Cluster hash tag `{<id>}` (literal
braces), so all of a job's keys are in one hash slot and every Lua script touches one slot:

    perito:job:{<id>}              hash: the job record and its counters (`progress_at`: when
                                    its last chunk was recorded, for `stalled_seconds`;
                                    `data_uri`: its data prefix; `rest_error`: what the items
                                    of chunks closed failed without a part say; `indexed`:
                                    its global indexes below are written)
    perito:job:{<id>}:chunks       string: 4 bytes per chunk (`parts.ChunkSlot`): which
                                    attempt's part holds its results and how many failed, or
                                    that it was closed without one (cancelled, failed)
    perito:job:{<id>}:open         hash: chunk -> its items, for chunks not closed yet
    perito:job:{<id>}:inline       hash: index -> image bytes, for images sent inline (each
                                    chunk's go when it is closed)
    perito:job:{<id>}:leases       hash: chunk -> "holder expiry_ms" of the worker running it
    perito:job:{<id>}:attempts     hash: chunk -> times a worker started it (the retry cap)
    perito:job:{<id>}:chunk-errors hash: chunk -> why its last attempt ended early
    perito:job:{<id>}:chunk-failures  hash: chunk -> why its items failed, for a chunk
                                    closed failed without a part (given up after its last
                                    attempt: `fail_chunk`)

Global keys (indexes over jobs, claims), each in a slot of its own:

    perito:jobs                    sorted set: job ids by creation time
    perito:active-jobs             sorted set: ids of jobs not yet terminal (and of jobs being
                                    recorded), by creation time
    perito:finished-jobs:<state>   sorted set per terminal state: ids of jobs that ended so,
                                    by end time (retention; their number is the state's count)
    perito:job-data-purge          sorted set: data prefixes whose objects are to be deleted,
                                    by when (a deleted job's at once, and once more
                                    `_PURGE_AGAIN_S` on; a submission's an hour after it
                                    wrote its last inputs file, unless it made its job)
    perito:request:<tenant>:<request_id>  string: the job a tenant's request id made (24 h)
    perito:tenant:<tenant>:jobs    sorted set: the tenant's job ids by creation time (ListJobs)
    perito:tenant:<tenant>:active  sorted set: the tenant's jobs not yet terminal, and those
                                    being submitted (its concurrent-jobs quota)
    perito:legacy-adopted          string: no job under an earlier version's keys is left
                                    (`adopt_legacy_jobs`)
    perito:dead-letter             list: chunks given up on, with the reason (capped)
    perito:output:<location>       string: the job writing its results files there (see
                                    `claim_output`), kept the job's retention and a day more

A transition of a job (recorded, running, ended, deleted) is one Lua script or one MULTI over
the job's own keys; the global indexes follow it as separate commands, each idempotent (ZADD,
ZREM), in an order that leaves the job in `perito:active-jobs` (or `perito:finished-jobs:...`
for a deletion) until the rest is done. A process that dies between the two leaves a job the
watchdog finds there and indexes again (`sync_indexes`); jobs per state are counted from the
indexes (`state_counts`), never by a counter that a retry could move twice.

Once a chunk is closed the job store holds 4 bytes for it, whatever its size; nothing per
item (the rest of the record does not grow with the job).

A chunk is run under a lease: the worker that takes it renews the lease while it works, so a
second delivery of the same chunk (the broker's visibility timeout, or a resend) is skipped
while the first is alive, and a dead worker's chunk is found by its expired lease. The worker
writes the chunk's results as one part, then closes the chunk (`record_chunk`): one Lua
script that refuses a worker no longer holding the lease (fencing: its part is never read),
records which part counts, and moves the counters. A chunk is closed once, so a redelivered
chunk never double-counts, and succeeded + failed + cancelled never exceeds total; the call
that brings that sum to total is told so, and finalises the job (results files, terminal
state). The watchdog (`perito_core.jobs.watchdog`) resends chunks that are open, unleased and
not queued. Times in the Lua scripts come from Redis's own clock (`TIME`), so hosts need not
agree.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

import redis

# The API's job and item states: the contract's, which the SDK returns too.
from perito.v1.vocabulary import ItemState, JobState
from perito_core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PeritoError,
    StorageUnavailable,
)

# Where they were defined before; importers of the job store find them here too.
from perito_core.jobs.items import ItemInput as ItemInput
from perito_core.jobs.items import ItemResult as ItemResult
from perito_core.jobs.parts import (
    CANCELLED_MARK,
    FAILED_MARK,
    MAX_ATTEMPT,
    SLOT_BYTES,
    ChunkSlot,
    InputsWriter,
    JobData,
    JobDataMissing,
    LruCache,
    part_key,
)
from perito_core.models.provenance import ServedVersion
from perito_core.storage import S3Options, open_store

log = logging.getLogger(__name__)

PREFIX = "perito"


def job_key(job_id: str, part: str = "") -> str:
    """The Redis key of job `job_id`'s record (`part` ""), or of one of its other keys
    (`chunks`, `open`, `inline`, `leases`, `attempts`, `chunk-errors`, `chunk-failures`):
    `perito:job:{<id>}`
    and `perito:job:{<id>}:<part>`. The braces are literal: Redis Cluster's hash tag
    (https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#hash-tags), so
    every key of a job hashes to one slot."""
    return f"{PREFIX}:job:{{{job_id}}}" + (f":{part}" if part else "")


def job_keys_pattern(job_id: str = "") -> str:
    """A `KEYS`/`SCAN` pattern for every key of job `job_id`, or of every job ("")."""
    return f"{PREFIX}:job:{{{job_id}}}*" if job_id else f"{PREFIX}:job:{{*"


def request_key(request_id: str, tenant: str) -> str:
    """The key of a tenant's SubmitJob request id (`JobStore.claim_request`)."""
    scope = f"{tenant}:" if tenant else ""
    return f"{PREFIX}:request:{scope}{request_id}"


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
    output_uri: str = ""  # where its results files are written (canonical)
    result_uris: list[str] = field(default_factory=list)
    error: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    # Where its owner is told they are written (`shown_output_uri`): the caller's own words
    # for output_uri, "" for the server's results location where the caller may not be told
    # it; None for jobs recorded before (their output_uri is shown).
    output_shown: str | None = None
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
    # Its data prefix in object storage: chunk inputs and result parts (`perito_core.jobs.parts`).
    data_uri: str = ""
    # What each item of a chunk closed failed without a part says (`mark_unrecorded`).
    rest_error: str = ""
    # Its global indexes (the job lists, the tenant's active jobs) are written (`_index`).
    indexed: bool = False

    @property
    def shown_output_uri(self) -> str:
        """Where its owner is told its results files go: their own `output_uri`, or "" (the
        server's results location, which the caller may not read)."""
        return self.output_uri if self.output_shown is None else self.output_shown

    @property
    def shown_result_uris(self) -> list[str]:
        """Its results files as its owner is told them: under `shown_output_uri`; none where
        that is "" (read them with ListJobResults)."""
        shown = self.shown_output_uri
        if shown == self.output_uri:
            return list(self.result_uris)
        if not shown:
            return []
        base = self.output_uri.rstrip("/")
        return [
            shown.rstrip("/") + uri[len(base) :] if uri.startswith(base + "/") else uri
            for uri in self.result_uris
        ]

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
_PARTS = (*_RUNNING_PARTS, "chunks", "chunk-failures")
# Kept by versions that held each item in Redis: such a job is deleted with them.
_EARLIER_PARTS = ("inputs", "results")

_OUTPUT_PREFIX = f"{PREFIX}:output:"
# The watchdog's sweep lock: one server at a time runs a sweep (`watchdog.Watchdog`).
_SWEEP_LOCK_KEY = f"{PREFIX}:watchdog-lock"
ACTIVE_JOBS_KEY = f"{PREFIX}:active-jobs"
FINISHED_JOBS_PREFIX = f"{PREFIX}:finished-jobs:"
JOBS_KEY = f"{PREFIX}:jobs"
_TERMINAL = tuple(state for state in JobState if state.terminal)
DEAD_LETTER_KEY = f"{PREFIX}:dead-letter"
DEAD_LETTER_CAP = 10_000
REQUEST_ID_TTL_S = 24 * 3600
# What a request id's key holds once the job it made is deleted: "deleted:{job id}".
DELETED_MARK = "deleted:"
PURGE_KEY = f"{PREFIX}:job-data-purge"
# Keys of an earlier version's jobs (no hash tag), and the mark that none is left of them.
_LEGACY_JOB_PREFIX = f"{PREFIX}:job:"
_LEGACY_ADOPTED_KEY = f"{PREFIX}:legacy-adopted"
# A submission that died while listing leaves inputs files: purged after this.
_BUILDING_TTL_S = 3600
# A purged prefix is looked at again this much later (a part whose write was under way when
# its job was deleted: a lease is renewed right before the write, `lease_ttl_s` 30 s).
_PURGE_AGAIN_S = 600.0
# A prefix whose objects could not be deleted is tried again this much later.
_PURGE_RETRY_S = 300.0
_OPEN_PAGE = 1000
# A failed submission's inputs files deleted at once, up to this many (else by the watchdog).
_DELETE_AT_ONCE = 256
# Chunk slots read a page at a time (`page_results`): 4 KiB.
_SLOTS_PAGE = 1024
_CACHED_ITEMS = 20_000


def _decode(value: Any) -> str:
    """A reply's bytes (or str, or None: "") as text."""
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


@dataclass(frozen=True)
class ChunkRecord:
    """What closing a chunk did; see `JobStore.record_chunk`.

    Attributes:
        outcome: `recorded` (by this call, or by an earlier run of the same close whose
            answer was lost: the slot names this attempt); `lost` (the lease was no longer
            the worker's: its part is never read); `done` (closed already otherwise:
            recorded by another attempt, cancelled or failed); `mismatch` (the tallies are
            not the chunk's items: nothing changed); `terminal` or `gone` (the job ended, or
            was deleted).
        complete: every item of the job is accounted for now (whoever closed the last chunk
            finalises the job; finalising is idempotent).
    """

    outcome: str
    complete: bool


class JobStore:
    """Jobs in Redis. Every method is one or a few round trips; safe across processes.

    Jobs' inputs and results are read and written in object storage, under each job's data
    prefix (`perito_core.jobs.parts`); the parts and inputs files read last are kept in memory
    (a few, least recently used first out: they never change once written).

    Args:
        client: the Redis connection. Workers give it a `redis.retry.Retry` so a Redis restart
            is waited out rather than failing a chunk (see `connect`).
        s3: how to reach S3, for jobs whose data prefix is there.
    """

    def __init__(self, client: redis.Redis, s3: S3Options | None = None) -> None:
        self.redis = client
        self.s3 = s3 or S3Options()
        self._stores = LruCache(64)  # data prefix -> JobData (an S3 client each)
        # (data prefix, chunk, attempt) -> a chunk's parsed file, 20,000 items in all at most
        # (a few of the largest chunks, or a page of a results file's worth of small ones).
        self._files = LruCache(_CACHED_ITEMS, weight=len)
        self._complete = client.register_script(_lua("complete"))
        self._mark_rest = client.register_script(_lua("mark_rest"))
        self._start = client.register_script(_lua("start"))
        self._finish = client.register_script(_lua("finish"))
        self._acquire = client.register_script(_lua("acquire"))
        self._renew = client.register_script(_lua("renew"))
        self._unleased = client.register_script(_lua("unleased"))
        self._delete = client.register_script(_lua("delete"))
        self._reserve = client.register_script(_lua("reserve"))
        self._sweep_lock = client.register_script(_lua("sweep_lock"))
        self._release_claim = client.register_script(_lua("release_claim"))
        self._mark_indexed = client.register_script(_lua("mark_indexed"))

    @classmethod
    def connect(
        cls, url: str, *, outage_retry_s: float = 0.0, s3: S3Options | None = None
    ) -> JobStore:
        """Connect to the Redis at `url`.

        Args:
            s3: how to reach S3, for jobs' data (`JobStore`).
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
        return cls(client, s3)

    @staticmethod
    def _tenant_key(tenant: str, part: str) -> str:
        return f"{PREFIX}:tenant:{tenant}:{part}"

    # Creating

    @_redis_unavailable
    def claim_request(self, request_id: str, job_id: str, tenant: str = "") -> str:
        """The job id for a SubmitJob `request_id` (Google AIP-155): `job_id` if this is the
        first time `tenant` used the id in 24 h, else the job its first request made. Ids are
        scoped per tenant: another tenant's id never names (nor reveals) someone's job."""
        key = request_key(request_id, tenant)
        if self.redis.set(key, job_id, nx=True, ex=REQUEST_ID_TTL_S):
            return job_id
        return _decode(self.redis.get(key)) or job_id

    @_redis_unavailable
    def reserve_slot(self, tenant: str, job_id: str, limit: int) -> bool:
        """Hold one of `tenant`'s `limit` concurrent-job slots for `job_id`, which is about
        to be created; False if every slot is taken. The slot is freed when the job ends
        (`finish`), or by `release_slot` if its submission fails; a submission that died
        without either frees it after an hour (its entry older than that, no job recorded;
        `create` renews it as it writes the inputs files).
        Atomic across server replicas: one script over the tenant's set alone."""
        key = self._tenant_key(tenant, "active")
        now = time.time()
        stale_before = now - _BUILDING_TTL_S
        stale = [_decode(m) for m in self.redis.zrangebyscore(key, "-inf", f"({stale_before}")]
        dead: list[str] = []
        if stale:  # each job's record is in a slot of its own: asked one by one
            with self.redis.pipeline(transaction=False) as pipe:
                for member in stale:
                    pipe.exists(job_key(member))
                dead = [m for m, found in zip(stale, pipe.execute(), strict=True) if not found]
        return bool(self._reserve(keys=[key], args=[job_id, limit, now, stale_before, *dead]))

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
        with self.redis.pipeline(transaction=False) as pipe:  # a slot each: no MGET
            for key in keys:
                pipe.get(key)
            owners = pipe.execute()
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
        submission was refused, or (the output location alone) once it is deleted: the
        request id (so it may be sent again) and the output location `locations[0]` of
        `claim_output`. Nothing changes if the job exists (its
        record is written in one step, so a refused submission's never appears later), nor
        for a claim that names another job (each claim compared and deleted atomically)."""
        claims = []
        if request_id:
            claims.append(request_key(request_id, tenant))
        if output_location:
            claims.append(_OUTPUT_PREFIX + output_location)
        if not claims or self.exists(job_id):
            return
        for claim in claims:
            self._release_claim(keys=[claim], args=[job_id])

    @_redis_unavailable
    def hold_sweep_lock(self, holder: str, ttl_ms: int) -> bool:
        """Take the watchdog's sweep lock for `holder`, or renew it if `holder` has it, for
        `ttl_ms` milliseconds: True if `holder` holds it now (one server sweeps at a time)."""
        return bool(self._sweep_lock(keys=[_SWEEP_LOCK_KEY], args=[holder, ttl_ms]))

    @_redis_unavailable
    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(job_key(job_id)))

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
        data_root: str,
        job_id: str | None = None,
        max_items: int | None = None,
        request_id: str = "",
        tenant: str = "",
        precision: str = "",
        served: ServedVersion | None = None,
        output_shown: str | None = None,
    ) -> tuple[Job, bool]:
        """Record a new queued job and write its inputs; returns it, and whether this call
        made it.

        `items` is consumed as it is produced (a listing or a manifest being read) and written
        a chunk at a time as inputs files under the job's data prefix, `{data_root}/{a folder
        of this submission's own}` (two submissions of one job id never write the same
        files), so the caller never holds them all and Redis holds none of them; the job
        appears only once every item is written, in one transaction. Creating `job_id` again
        returns the job that exists (an idempotent retry: `(job, False)`). A creation that
        fails deletes the files it wrote (the watchdog does, past `_DELETE_AT_ONCE` of them,
        or if this process died: an hour after it wrote its last file).

        Args:
            data_root: where this job's data goes (`parts.data_location`): derived by the
                server from its job data setting, never from a caller.
            inline: index -> the bytes of an item sent inline (kept in Redis until its
                chunk is closed).

        Raises:
            InvalidArgument: no items, or more than `max_items` (field `input`), counted
                while reading.
            StorageUnavailable: Redis or object storage is unreachable.
        """
        job_id = job_id or uuid.uuid4().hex[:20]
        if self.exists(job_id):
            return self.get(job_id), False
        data_uri = f"{data_root.rstrip('/')}/{uuid.uuid4().hex[:8]}"
        data = self._data(data_uri)
        total = 0
        registered = False
        kept_at = 0.0

        def keep_alive() -> None:
            """Before the first file: queue its purge an hour from now, dropped when the job
            is made (a submission that dies leaves no files for ever). Then, as its files
            are written, push that an hour on again, and its tenant's slot (`reserve_slot`)
            too, at most once a minute: a listing that takes hours loses neither."""
            nonlocal registered, kept_at
            now = time.time()
            if registered and now - kept_at < _BUILDING_TTL_S / 60:
                return
            member = {_purge_member(job_id, data_uri): now + _BUILDING_TTL_S}
            with self.redis.pipeline(transaction=False) as pipe:  # a slot each: no MULTI
                pipe.zadd(PURGE_KEY, member, xx=registered, gt=registered)
                pipe.zadd(self._tenant_key(tenant, "active"), {job_id: now}, xx=True, gt=True)
                pipe.execute()
            registered, kept_at = True, now

        writer = InputsWriter(data, chunk_size)
        try:
            with writer:
                for item in items:
                    total += 1
                    if max_items is not None and total > max_items:
                        raise InvalidArgument(
                            f"more than {max_items:,} images; the limit per job is {max_items:,}",
                            field="input",
                        )
                    if total % chunk_size == 0:  # a file is written with this item
                        keep_alive()
                    writer.add(item)
                if not total:
                    raise InvalidArgument("a job needs at least one image", field="input")
                keep_alive()
                writer.close()
            job, created = self._commit(
                job_id,
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
                data_uri=data_uri,
                **({} if output_shown is None else {"output_shown": output_shown}),
            )
        except BaseException:
            if registered:
                self._abandon(job_id, data, writer.chunks)
            raise
        if not created and registered:  # a concurrent retry of the same request made it
            self._abandon(job_id, data, writer.chunks)
        return job, created

    def _abandon(self, job_id: str, data: JobData, files: int) -> None:
        """Delete the inputs files of a submission that made no job: at once if they are few,
        else by the watchdog (its purge, due now). Nothing is deleted if the job was made
        with them after all (a commit whose answer was lost), nor while Redis cannot say so:
        their purge stays queued, and the commit dropped it if it happened. Never raises."""
        member = _purge_member(job_id, data.uri)
        try:
            if _decode(self.redis.hget(job_key(job_id), "data_uri")) == data.uri:
                return
            if files <= _DELETE_AT_ONCE:
                data.purge(_DELETE_AT_ONCE + 1)
                self.redis.zrem(PURGE_KEY, member)
            else:
                self.redis.zadd(PURGE_KEY, {member: time.time()})
        except Exception:  # storage or Redis down: the queued purge stays
            log.warning("job data %s left for the watchdog to purge", data.uri, exc_info=True)

    def _commit(
        self,
        job_id: str,
        total: int,
        inline: dict[int, bytes],
        *,
        chunk_size: int,
        labels: dict[str, str],
        tenant: str,
        data_uri: str,
        **fields: Any,
    ) -> tuple[Job, bool]:
        """Record the job: its keys in one MULTI (one slot), then its global indexes
        (`_index`). Its id joins `perito:active-jobs` first, so a process that dies after the
        MULTI leaves a job the watchdog finds and indexes (`sync_indexes`); one that dies
        before it leaves an id without a record, which the watchdog drops an hour later."""
        key = job_key(job_id)
        chunks = chunk_count(total, chunk_size)
        now = time.time()
        self.redis.zadd(ACTIVE_JOBS_KEY, {job_id: now}, nx=True)
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    if pipe.exists(key):  # a concurrent retry of the same request won
                        pipe.reset()
                        return self.get(job_id), False
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
                        "data_uri": data_uri,
                        **fields,
                    }
                    pipe.hset(key, mapping=record)
                    if inline:
                        pipe.hset(job_key(job_id, "inline"), mapping=inline)  # type: ignore[arg-type]
                    for first in range(0, chunks, _OPEN_PAGE):  # chunk -> its items
                        page = {
                            chunk: min(chunk_size, total - chunk * chunk_size)
                            for chunk in range(first, min(first + _OPEN_PAGE, chunks))
                        }
                        pipe.hset(job_key(job_id, "open"), mapping=page)  # type: ignore[arg-type]
                    pipe.execute()
                except redis.WatchError:
                    return self.get(job_id), False
        except BaseException:
            with contextlib.suppress(redis.RedisError):  # else the watchdog drops it later
                if not self.redis.exists(key):
                    self.redis.zrem(ACTIVE_JOBS_KEY, job_id)
            raise
        job = self.get(job_id)
        try:
            self._index(job)
        except redis.RedisError as exc:  # the job is made: the watchdog indexes it
            log.warning("job %s recorded, its indexes left to the watchdog: %s", job_id, exc)
        return job, True

    # Reading

    @_redis_unavailable
    def get(self, job_id: str) -> Job:
        raw = self.redis.hgetall(job_key(job_id))
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
            output_shown=data.get("output_shown"),
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
            data_uri=data.get("data_uri", ""),
            rest_error=data.get("rest_error", ""),
            indexed=data.get("indexed") == "1",
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
                cursor = None
            # Tokens this store makes hold a finite creation time (never NaN, which Redis
            # refuses as a bound) and a job id.
            if cursor is None or not math.isfinite(cursor[0]) or not member:
                raise InvalidArgument("invalid page_token", field="page_token") from None
        found: list[Job] = []
        scanned = 0
        while len(found) < page_size and scanned < max_scanned:
            entries = self._jobs_after(key, cursor, 200)
            if not entries:
                return found, ""
            with self.redis.pipeline(transaction=False) as pipe:
                for member, _ in entries:
                    pipe.hgetall(job_key(member))
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
        entries = [(_decode(member), float(at)) for member, at in raw]  # type: ignore[str-unpack]
        if cursor is not None:
            entries = [(m, at) for m, at in entries if at < cursor[0] or m < cursor[1]]
        return entries[:count]

    # A job's data

    def _data(self, data_uri: str) -> JobData:
        """The job data prefix `data_uri`, opened once (an S3 prefix holds a client)."""
        return self._stores.get(data_uri, lambda: JobData(data_uri, open_store(data_uri, self.s3)))

    def job_data(self, job: Job) -> JobData:
        """`job`'s data prefix (inputs files, result parts).

        Raises:
            FailedPrecondition: a job recorded before jobs kept their data in object storage
                (it has none).
        """
        if not job.data_uri:
            raise FailedPrecondition(
                f"job {job.id} was recorded by an earlier version of Perito, which kept its "
                "items in Redis; this version cannot read them",
                reason="JOB_DATA_MISSING",
            )
        return self._data(job.data_uri)

    def chunk_inputs(self, job: Job, chunk: int) -> list[ItemInput]:
        """The items of `chunk` as submitted, in input order.

        Raises:
            JobDataMissing: its inputs file is missing or malformed.
            FailedPrecondition: a job without data (`job_data`).
            StorageUnavailable: object storage is unreachable.
        """
        first, items = self._chunk_span(job.total, job.chunk_size, chunk)
        data = self.job_data(job)
        return self._files.get((data.uri, chunk, 0), lambda: data.read_inputs(chunk, first, items))

    @staticmethod
    def _chunk_span(total: int, chunk_size: int, chunk: int) -> tuple[int, int]:
        """(index of the first item, items) of `chunk`."""
        first = chunk * chunk_size
        return first, max(0, min(chunk_size, total - first))

    @_redis_unavailable
    def inline_image(self, job_id: str, index: int) -> bytes | None:
        value = self.redis.hget(job_key(job_id, "inline"), str(index))
        return value if isinstance(value, bytes) else None

    @_redis_unavailable
    def chunk_slots(self, job_id: str, first: int, last: int) -> list[ChunkSlot]:
        """What the store says of chunks `first` .. `last` (inclusive): open, recorded (which
        attempt's part, how many failed), or closed without a part."""
        raw = self.redis.getrange(
            job_key(job_id, "chunks"), first * SLOT_BYTES, (last + 1) * SLOT_BYTES - 1
        )
        return ChunkSlot.parse(raw, last - first + 1)  # type: ignore[arg-type]

    def chunk_results(self, job: Job, chunk: int, slot: ChunkSlot) -> list[ItemResult]:
        """The results of `chunk`'s items, in input order, as `slot` (`chunk_slots`) says:
        its part's; each cancelled, or failed with its chunk's reason (`fail_chunk`) or else
        the job's `rest_error`; or PENDING while it is open. Parts and inputs files are read
        from object storage (or the cache).

        Raises:
            JobDataMissing: a file the store refers to is missing or malformed, or a part
                whose failures are not as many as the store recorded (another writer's).
            FailedPrecondition: a job without data (`job_data`).
            StorageUnavailable: object storage is unreachable.
        """
        first, items = self._chunk_span(job.total, job.chunk_size, chunk)
        if slot.mark not in (0, CANCELLED_MARK, FAILED_MARK):
            data = self.job_data(job)
            return self._files.get(
                (data.uri, chunk, slot.mark),
                lambda: _as_recorded(data.read_part(chunk, slot.mark, first, items), slot, chunk),
            )
        state, error = {
            0: (ItemState.PENDING, ""),
            CANCELLED_MARK: (ItemState.CANCELLED, ""),
            FAILED_MARK: (ItemState.FAILED, ""),
        }[slot.mark]
        if state is ItemState.FAILED:
            error = self.chunk_failure(job.id, chunk) or job.rest_error
        return [
            ItemResult(first + i, state, id=item.id, uri=item.uri, error=error)
            for i, item in enumerate(self.chunk_inputs(job, chunk))
        ]

    def page_results(
        self, job: Job, start: int, limit: int, state: ItemState | None = None
    ) -> tuple[list[ItemResult], int]:
        """Up to `limit` results from item `start` on, in input order (only those in `state`
        if given), and the index to go on from (`job.total` when nothing is left).

        With `state`, a chunk none of whose items is in it (by its slot's tallies) is passed
        over without reading its part, so a page of a few failures in a large job reads the
        chunk slots (4 bytes a chunk) and the parts holding failures only.

        Raises:
            JobDataMissing, FailedPrecondition, StorageUnavailable: as `chunk_results`.
        """
        found: list[ItemResult] = []
        position = max(0, start)
        size = job.chunk_size
        while position < job.total and len(found) < limit:
            first = position // size
            last = min(job.chunks - 1, first + _SLOTS_PAGE - 1)
            for chunk, slot in enumerate(self.chunk_slots(job.id, first, last), start=first):
                begin, items = self._chunk_span(job.total, size, chunk)
                if state is not None and not slot.count(state, items):
                    position = begin + items
                    continue
                for result in self.chunk_results(job, chunk, slot)[position - begin :]:
                    position = result.index + 1
                    if state is None or result.state is state:
                        found.append(result)
                        if len(found) == limit:
                            return found, position
        return found, min(position, job.total)

    def results(self, job_id: str, start: int, count: int) -> list[ItemResult]:
        """Results for items start .. start+count-1 (those that exist), in input order,
        PENDING where none is recorded yet; [] for a job that is gone.

        Raises:
            JobDataMissing, FailedPrecondition, StorageUnavailable: as `chunk_results`.
        """
        try:
            job = self.get(job_id)
        except NotFound:
            return []
        return self.page_results(job, start, count)[0]

    def recorded_items(self, job: Job) -> int:
        """How many items the job's closed chunks account for: each recorded part read and
        checked (index by index, as `JobData.read_part`), plus every item of a chunk closed
        without one. Equals `job.done` unless something was counted twice or lost; a check
        for the fault suite and tests, reading every part.

        Raises:
            JobDataMissing, FailedPrecondition, StorageUnavailable: as `chunk_results`.
        """
        recorded = 0
        for first in range(0, job.chunks, _SLOTS_PAGE):
            last = min(job.chunks - 1, first + _SLOTS_PAGE - 1)
            for chunk, slot in enumerate(self.chunk_slots(job.id, first, last), start=first):
                if not slot.open:
                    recorded += len(self.chunk_results(job, chunk, slot))
        return recorded

    @_redis_unavailable
    def active_jobs(self) -> list[str]:
        """Ids of every job not yet terminal, oldest first (and, for a moment, of a job being
        recorded, or one that ended and whose indexes are being moved: `sync_indexes`)."""
        return [_decode(k) for k in self.redis.zrange(ACTIVE_JOBS_KEY, 0, -1)]

    # Progress

    @_redis_unavailable
    def mark_running(self, job_id: str) -> JobState:
        """Move a queued job to running (once); returns its state after."""
        return JobState(_decode(self._start(keys=[job_key(job_id)])))

    def record_chunk(
        self, job: Job, chunk: int, holder: str, attempt: int, results: Sequence[ItemResult]
    ) -> ChunkRecord:
        """Write `chunk`'s results as the part of `attempt`, then close the chunk if `holder`
        still holds its lease (`complete.lua`): its slot names that part, the job's counters
        move by the part's tallies, its inline images go.

        Args:
            results: every item of the chunk, in index order, each SUCCEEDED or FAILED.

        Raises:
            InvalidArgument: `results` are not the chunk's items in order, an item is neither
                succeeded nor failed, or `attempt` is out of range; nothing is written.
            ValueError: a NaN or infinity in a result (strict JSON); nothing is written.
            StorageUnavailable: object storage or Redis is unreachable (the chunk stays
                open: a later attempt writes its own part).
        """
        first, items = self._chunk_span(job.total, job.chunk_size, chunk)
        if [r.index for r in results] != list(range(first, first + items)):
            raise InvalidArgument(
                f"chunk {chunk}'s results must be its items {first} to {first + items - 1}, "
                "in order"
            )
        if any(r.state not in (ItemState.SUCCEEDED, ItemState.FAILED) for r in results):
            raise InvalidArgument("a part holds succeeded and failed items only")
        if not 1 <= attempt <= MAX_ATTEMPT:
            raise InvalidArgument(f"attempt {attempt} is out of range 1..{MAX_ATTEMPT}")
        self.job_data(job).write_part(chunk, attempt, results)
        failed = sum(r.state is ItemState.FAILED for r in results)
        return self._close_chunk(job.id, chunk, holder, attempt, items - failed, failed, first)

    @_redis_unavailable
    def fail_chunk(self, job: Job, chunk: int, holder: str, reason: str) -> ChunkRecord:
        """Close `chunk` without a part if `holder` still holds its lease: every one of its
        items FAILED with `reason`, kept for the chunk alone (`chunk_failure`). Redis only,
        so a chunk given up on (its last attempt used) closes even while object storage
        refuses every write.

        Returns:
            What closing it did, as `record_chunk`; `recorded` also when an earlier run of
            this close did it (its answer lost, a retry found the chunk closed so).
        """
        first, items = self._chunk_span(job.total, job.chunk_size, chunk)
        return self._close_chunk(job.id, chunk, holder, FAILED_MARK, 0, items, first, reason)

    @_redis_unavailable
    def chunk_failure(self, job_id: str, chunk: int) -> str:
        """Why the items of `chunk`, closed failed without a part by `fail_chunk`, failed;
        "" for any other chunk."""
        return _decode(self.redis.hget(job_key(job_id, "chunk-failures"), str(chunk)))

    @_redis_unavailable
    def _close_chunk(
        self,
        job_id: str,
        chunk: int,
        holder: str,
        attempt: int,
        succeeded: int,
        failed: int,
        first: int,
        reason: str = "",
    ) -> ChunkRecord:
        """`complete.lua`; a `done` for a chunk whose slot says this close happened (redis-py
        ran the script again after a connection error, and the first run had closed it) is
        `recorded`."""
        outcome, done_ok, done_failed, done_cancelled, total = self._complete(
            keys=[
                job_key(job_id),
                *(job_key(job_id, part) for part in ("open", "leases", "attempts")),
                job_key(job_id, "chunk-errors"),
                job_key(job_id, "chunks"),
                job_key(job_id, "inline"),
                job_key(job_id, "chunk-failures"),
            ],
            args=[chunk, holder, attempt, succeeded, failed, first, succeeded + failed, reason],
        )
        complete = int(total) > 0 and int(done_ok) + int(done_failed) + int(done_cancelled) >= int(
            total
        )
        outcome = _decode(outcome)
        if (
            outcome == "done"
            and self.chunk_slots(job_id, chunk, chunk)[0].mark == attempt
            and (attempt != FAILED_MARK or self.chunk_failure(job_id, chunk) == reason)
        ):
            outcome = "recorded"
        return ChunkRecord(outcome, complete)

    @_redis_unavailable
    def mark_unrecorded(self, job_id: str, state: ItemState, error: str) -> int:
        """Close every open chunk without a part: each of its items `state` (cancelled, or
        failed with `error`, kept as the job's `rest_error`). One step per open chunk, in
        one script; a running chunk's part is then refused when it comes (`record_chunk`).
        Returns how many items were closed."""
        mark = {ItemState.CANCELLED: CANCELLED_MARK, ItemState.FAILED: FAILED_MARK}[state]
        keys = [job_key(job_id), job_key(job_id, "open"), job_key(job_id, "chunks")]
        marked: int = self._mark_rest(keys=keys, args=[mark, state.value, error])
        return marked

    @_redis_unavailable
    def request_cancel(self, job_id: str) -> None:
        self.redis.hset(job_key(job_id), "cancel_requested", "1")

    @_redis_unavailable
    def is_cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(job_key(job_id), "cancel_requested") == b"1"

    # Chunks

    @_redis_unavailable
    def acquire_chunk(self, job_id: str, chunk: int, holder: str, ttl_s: float) -> Lease:
        """Take the lease on `chunk` for `holder` for `ttl_s` seconds, counting an attempt.

        Returns a `Lease` whose outcome is `acquired` (with the attempt number), `busy`
        (another holder's lease is live: this is a duplicate delivery), `done` (nothing left
        to do), `terminal` or `gone` (the job ended or was deleted)."""
        outcome, attempts = self._acquire(
            keys=[
                job_key(job_id),
                job_key(job_id, "open"),
                job_key(job_id, "leases"),
                job_key(job_id, "attempts"),
            ],
            args=[chunk, holder, int(ttl_s * 1000)],
        )
        return Lease(_decode(outcome), int(attempts))

    @_redis_unavailable
    def renew_chunk(self, job_id: str, chunk: int, holder: str, ttl_s: float) -> bool:
        """Extend `holder`'s lease on `chunk`; False if it was lost (expired and taken)."""
        keys = [job_key(job_id, "leases")]
        return bool(self._renew(keys=keys, args=[chunk, holder, max(1, int(ttl_s * 1000))]))

    @_redis_unavailable
    def release_chunk(self, job_id: str, chunk: int, holder: str, error: str = "") -> None:
        """Give up `holder`'s lease on `chunk`; `error` says why the attempt ended early."""
        if error:
            self.redis.hset(job_key(job_id, "chunk-errors"), str(chunk), error)
        self._renew(keys=[job_key(job_id, "leases")], args=[chunk, holder, 0])

    @_redis_unavailable
    def chunk_error(self, job_id: str, chunk: int) -> str:
        """Why `chunk`'s last attempt ended early ('' if none said: its worker died)."""
        return _decode(self.redis.hget(job_key(job_id, "chunk-errors"), str(chunk)))

    @_redis_unavailable
    def unleased_chunks(self, job_id: str) -> list[int]:
        """Chunks of the job with unrecorded items and no live lease."""
        keys = [job_key(job_id, "open"), job_key(job_id, "leases")]
        return sorted(int(c) for c in self._unleased(keys=keys))

    @_redis_unavailable
    def note_resent(self, job_id: str, count: int) -> None:
        self.redis.hincrby(job_key(job_id), "resent", count)

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
        self.redis.hsetnx(job_key(job_id), "error", error)

    @_redis_unavailable
    def note_finalize_failure(self, job_id: str) -> tuple[int, float]:
        """Count a failed write of the results files; returns (failures so far, time of the
        first one, in Unix seconds)."""
        now = time.time()
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(job_key(job_id), "finalize_attempts", 1)
            pipe.hsetnx(job_key(job_id), "finalize_first_failure", now)
            pipe.hset(job_key(job_id), "finalize_last_failure", now)
            pipe.hget(job_key(job_id), "finalize_first_failure")
            attempts, _, _, first = pipe.execute()
        return int(attempts), float(first)

    # Ending

    @_redis_unavailable
    def finish(self, job_id: str, result_uris: list[str], error: str = "") -> Job:
        """Set the terminal state from the counters; idempotent. The job's keys move in one
        script (`finish.lua`), then its indexes (`_index`): a call for a job that has ended
        already writes them again, in case the call that ended it died in between.

        Args:
            error: a job-level failure (for example, results that could not be written): the
                job ends FAILED with it, whatever its items did.

        Raises:
            NotFound: no such job.
            RuntimeError: items of the job are not accounted for yet.
        """
        job = self.get(job_id)
        if job.state.terminal:
            self._index(job)
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
            keys=[job_key(job_id), *(job_key(job_id, part) for part in _RUNNING_PARTS)],
            args=[state.value, json.dumps(result_uris), error],
        )
        job = self.get(job_id)
        self._index(job)
        return job

    def _index(self, job: Job) -> None:
        """Write `job`'s global indexes as its state says, each command idempotent (ZADD,
        ZREM): a live job in the job lists and its tenant's active jobs (its quota), then
        `indexed` on its record; an ended one in its state's finished jobs and out of its
        tenant's active jobs, then out of `perito:active-jobs` last, so that until all is done
        the watchdog finds it there and calls this again (`sync_indexes`). A job that ended or
        was deleted meanwhile is indexed again as it is now.

        Raises:
            redis.RedisError: Redis is unreachable (what was written stays; it is idempotent).
        """
        tenant_active = self._tenant_key(job.tenant, "active")
        with self.redis.pipeline(transaction=False) as pipe:  # a slot each: no MULTI
            if job.data_uri:  # its submission's purge, queued in case it failed
                pipe.zrem(PURGE_KEY, _purge_member(job.id, job.data_uri))
            pipe.zadd(JOBS_KEY, {job.id: job.created_at}, nx=True)
            pipe.zadd(self._tenant_key(job.tenant, "jobs"), {job.id: job.created_at}, nx=True)
            if job.state.terminal:
                pipe.zadd(_finished_key(job.state), {job.id: job.finished_at})
                pipe.zrem(tenant_active, job.id)
            else:
                pipe.zadd(tenant_active, {job.id: job.created_at})
            pipe.execute()
        if job.state.terminal:
            self.redis.zrem(ACTIVE_JOBS_KEY, job.id)
            if not self.redis.exists(job_key(job.id)):  # deleted meanwhile: undo the above
                self._unindex(job.id, job.tenant)
            return
        now = _decode(self._mark_indexed(keys=[job_key(job.id)]))
        if not now:
            self._unindex(job.id, job.tenant)
        elif JobState(now).terminal:  # it ended meanwhile: its slot must not stay held
            try:
                self._index(self.get(job.id))
            except NotFound:
                self._unindex(job.id, job.tenant)

    def _unindex(self, job_id: str, tenant: str | None) -> None:
        """Take a job that is gone out of every global index (its tenant's too, if known)."""
        with self.redis.pipeline(transaction=False) as pipe:
            if tenant is not None:
                pipe.zrem(self._tenant_key(tenant, "jobs"), job_id)
                pipe.zrem(self._tenant_key(tenant, "active"), job_id)
            pipe.zrem(JOBS_KEY, job_id)
            pipe.zrem(ACTIVE_JOBS_KEY, job_id)
            for state in _TERMINAL:
                pipe.zrem(_finished_key(state), job_id)
            pipe.execute()

    @_redis_unavailable
    def sync_indexes(self, job: Job) -> None:
        """Write `job`'s global indexes again (`_index`): what the call that recorded or
        ended it does after its script, for a process that died in between. The watchdog
        calls it for a job in `perito:active-jobs` that has ended, or whose record does not
        say `indexed`. Idempotent."""
        self._index(job)

    @_redis_unavailable
    def forget_unrecorded(self, job_id: str) -> bool:
        """Drop `job_id` from `perito:active-jobs` if it has no record and joined more than an
        hour ago (a submission that died just before recording it, `_commit`); True if so."""
        if is_legacy_member(job_id):  # an earlier version's job, not moved yet: not ours to drop
            return False
        joined = self.redis.zscore(ACTIVE_JOBS_KEY, job_id)
        if joined is None or joined > time.time() - _BUILDING_TTL_S or self.exists(job_id):
            return False
        return bool(self.redis.zrem(ACTIVE_JOBS_KEY, job_id))

    @_redis_unavailable
    def delete(self, job_id: str) -> bool:
        """Delete a terminal job and everything stored for it (results files stay where
        they were written): its keys now, its data prefix's objects by the watchdog's purge
        (`purge_job_data`), queued first. Returns False, deleting nothing, if the job is not
        terminal.

        In order, so that a process dying anywhere leaves a job the retention sweep deletes
        again: its purge queued, its request id marked deleted (a retry of its request must
        not make it again), the tenant's and active lists left; then its keys (`delete.lua`,
        one slot); then the job list and its finished jobs, by which retention finds it.

        Raises:
            NotFound: no such job.
        """
        fields = ("state", "tenant", "request_id", "data_uri")
        state, tenant, request_id, data_uri = (
            _decode(v) for v in self.redis.hmget(job_key(job_id), fields)
        )
        if not state:  # none, or a deletion cut short after its keys went
            self._unindex(job_id, None)
            raise NotFound(f"job {job_id!r} not found", field="job_id")
        if not JobState(state).terminal:
            return False
        member = _purge_member(job_id, data_uri) if data_uri else ""
        if member:
            self.redis.zadd(PURGE_KEY, {member: time.time()})
        if request_id:
            key = request_key(request_id, tenant)
            self.redis.set(key, DELETED_MARK + job_id, xx=True, keepttl=True)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self._tenant_key(tenant, "jobs"), job_id)
            pipe.zrem(self._tenant_key(tenant, "active"), job_id)
            pipe.zrem(ACTIVE_JOBS_KEY, job_id)
            pipe.execute()
        parts = (*_PARTS, *_EARLIER_PARTS)
        outcome = self._delete(keys=[job_key(job_id), *(job_key(job_id, part) for part in parts)])
        if member:  # due now, if a purge put it off while the job still referred to it
            self.redis.zadd(PURGE_KEY, {member: time.time()})
        self._unindex(job_id, tenant)
        if outcome == b"gone" or outcome == "gone":  # another call deleted it first
            raise NotFound(f"job {job_id!r} not found", field="job_id")
        return bool(outcome)

    @_redis_unavailable
    def purge_job_data(self, budget: int) -> tuple[int, int]:
        """Delete up to `budget` objects of the data prefixes due in the purge queue (deleted
        jobs', abandoned submissions'), oldest first. A prefix emptied is looked at once more
        `_PURGE_AGAIN_S` later (a worker whose lease was renewed just before its job was
        deleted may still finish writing a part there), then leaves the queue. A prefix that
        a job's record still names (a submission recorded whose indexes were not written yet:
        `_index` takes it out of the queue) is never purged: it is put off an hour. A prefix
        whose objects cannot be deleted (object storage refuses, or is unreachable) is put
        off `_PURGE_RETRY_S`, logged, and the others are purged meanwhile. Returns (objects
        deleted, prefixes finished).

        Raises:
            StorageUnavailable: Redis is unreachable (what was deleted stays deleted; the
                rest is tried at the next call).
        """
        due = self.redis.zrangebyscore(PURGE_KEY, "-inf", time.time(), start=0, num=20)
        deleted = finished = 0
        for member in map(_decode, due):
            job_id, uri, again = _parse_purge_member(member)
            if job_id and _decode(self.redis.hget(job_key(job_id), "data_uri")) == uri:
                later = time.time() + _BUILDING_TTL_S
                self.redis.zadd(PURGE_KEY, {member: later}, xx=True)
                continue
            try:
                removed, done = self._data(uri).purge(budget - deleted)
            except (PeritoError, OSError) as exc:  # this prefix only: the others go on
                log.warning("job data %s not purged, tried again later: %s", uri, exc)
                self.redis.zadd(PURGE_KEY, {member: time.time() + _PURGE_RETRY_S}, xx=True)
                continue
            deleted += removed
            if done:
                with self.redis.pipeline(transaction=False) as pipe:
                    pipe.zrem(PURGE_KEY, member)
                    if not again:
                        pipe.zadd(
                            PURGE_KEY,
                            {
                                _purge_member(job_id, uri, again=True): (
                                    time.time() + _PURGE_AGAIN_S
                                )
                            },
                        )
                    pipe.execute()
                finished += 1
            if deleted >= budget:
                break
        return deleted, finished

    @_redis_unavailable
    def expired_jobs(self, retention_s: float, limit: int = 500) -> list[str]:
        """Ids of terminal jobs that ended more than `retention_s` seconds ago, those that
        ended first first, at most `limit`."""
        cutoff = time.time() - retention_s
        with self.redis.pipeline(transaction=False) as pipe:
            for state in _TERMINAL:
                pipe.zrangebyscore(
                    _finished_key(state), 0, cutoff, start=0, num=limit, withscores=True
                )
            ended = sorted(
                (float(at), _decode(member)) for found in pipe.execute() for member, at in found
            )
        return [job_id for _, job_id in ended[:limit]]

    @_redis_unavailable
    def dead_letter_count(self) -> int:
        """Chunks on the dead-letter list now (at most `DEAD_LETTER_CAP`)."""
        count: int = self.redis.llen(DEAD_LETTER_KEY)
        return count

    def _live_jobs(self) -> tuple[float, list[tuple[JobState, float]]]:
        """Redis's clock now (Unix seconds), and for each job of `perito:active-jobs` that is
        live (queued or running), its state and when it last moved (made, started, or its
        last chunk recorded). One pipelined read per job: each record is in a slot of its
        own, so no script reads them together."""
        ids = self.active_jobs()
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            for job_id in ids:
                pipe.hmget(job_key(job_id), ["state", "created_at", "started_at", "progress_at"])
            (seconds, micros), *records = pipe.execute()
        live = []
        for state, *times in records:
            if state is not None and not JobState(_decode(state)).terminal:
                since = max(float(_decode(t) or 0) for t in times)
                live.append((JobState(_decode(state)), since))
        return seconds + micros / 1e6, live

    @_redis_unavailable
    def stalled_seconds(self) -> dict[JobState, float]:
        """The longest time, in seconds, a queued job has waited since it was made and a
        running job has gone without recording a result (or, before its first, since it
        started), as `{QUEUED: s, RUNNING: s}`; 0 where no job is in that state.

        Read over the jobs not yet terminal (their number is bounded by the tenants'
        concurrent-jobs quotas), on Redis's clock. Start and progress times are Redis's
        clock, creation times the submitting server's.
        """
        now, live = self._live_jobs()
        worst = {JobState.QUEUED: 0.0, JobState.RUNNING: 0.0}
        for state, since in live:
            if since > 0:
                worst[state] = max(worst[state], now - since)
        return worst

    @_redis_unavailable
    def state_counts(self) -> dict[JobState, int]:
        """How many jobs are in each state now: the live ones counted from
        `perito:active-jobs` by their records, the ended ones by the size of their state's
        finished jobs. Derived from the indexes, so no retry can count a job twice; a job
        whose indexes a dying process left behind is counted once the watchdog writes them."""
        _, live = self._live_jobs()
        with self.redis.pipeline(transaction=False) as pipe:
            for state in _TERMINAL:
                pipe.zcard(_finished_key(state))
            ended = dict(zip(_TERMINAL, pipe.execute(), strict=True))
        counts = {state: int(ended.get(state, 0)) for state in JobState}
        for state, _ in live:
            counts[state] += 1
        return counts

    # Upgrading

    @_redis_unavailable
    def adopt_legacy_jobs(self, limit: int = 100) -> int:
        """Move up to `limit` jobs recorded by a version of Perito whose job keys had no hash
        tag (`perito:job:<id>`, listed in `perito:active-jobs` and `perito:finished-jobs` by
        key) to the keys of `job_key` (RENAME, on the one Redis such a version ran on), so
        they stay readable and expire with their retention. Jobs not yet ended go first, so
        a sweep never meets one still unmoved among the active jobs once they are; until
        then the watchdog passes such an entry over (`is_legacy_member`). Once none is left
        in either index, the earlier version's state counts (`perito:job-states`) go and
        `perito:legacy-adopted` is set: every later call reads that one key. Returns how
        many were moved."""
        if self.redis.exists(_LEGACY_ADOPTED_KEY):
            return 0
        old_finished = f"{PREFIX}:finished-jobs"
        active: Any = self.redis.zrange(ACTIVE_JOBS_KEY, 0, -1, withscores=True)
        pending = [
            (ACTIVE_JOBS_KEY, _decode(m), float(at))
            for m, at in active
            if is_legacy_member(_decode(m))  # the ids of this version's jobs have no prefix
        ]
        finished: Any = self.redis.zrange(old_finished, 0, limit - 1, withscores=True)
        pending += [(old_finished, _decode(m), float(at)) for m, at in finished]
        moved = 0
        for index, member, at in pending[:limit]:
            job_id = member.removeprefix(_LEGACY_JOB_PREFIX)
            for part in ("", *_PARTS, *_EARLIER_PARTS):
                old = f"{_LEGACY_JOB_PREFIX}{job_id}" + (f":{part}" if part else "")
                if self.redis.exists(old):
                    self.redis.rename(old, job_key(job_id, part))
            state = _decode(self.redis.hget(job_key(job_id), "state"))
            if state and JobState(state).terminal:
                self.redis.zadd(_finished_key(JobState(state)), {job_id: at})
            elif state:  # not yet indexed: the watchdog's sweep does it
                self.redis.zadd(ACTIVE_JOBS_KEY, {job_id: at}, nx=True)
            self.redis.zrem(index, member)
            moved += 1
        if not pending and not self.redis.exists(old_finished):
            self.redis.delete(f"{PREFIX}:job-states")
            self.redis.set(_LEGACY_ADOPTED_KEY, "1")
        return moved


def is_legacy_member(member: str) -> bool:
    """Whether an entry of `perito:active-jobs` names a job under an earlier version's keys
    (`perito:job:<id>`, moved by `JobStore.adopt_legacy_jobs`), not a job id."""
    return member.startswith(_LEGACY_JOB_PREFIX)


def _as_recorded(results: list[ItemResult], slot: ChunkSlot, chunk: int) -> list[ItemResult]:
    """A part's `results`, if as many of them failed as the store recorded for it (`slot`):
    else the part is not the one closed (two writers of one attempt's key, after a failover
    lost a lease), and is never served.

    Raises:
        JobDataMissing: naming the part.
    """
    failed = sum(r.state is ItemState.FAILED for r in results)
    if failed != slot.failed:
        raise JobDataMissing(
            f"{part_key(chunk, slot.mark)} of the job's data has {failed} failed items; the "
            f"job store recorded {slot.failed} for it"
        )
    return results


def _finished_key(state: JobState) -> str:
    """The sorted set of jobs that ended in `state` (terminal), by end time."""
    return f"{FINISHED_JOBS_PREFIX}{state.value}"


def _purge_member(job_id: str, data_uri: str, *, again: bool = False) -> str:
    """The purge queue's entry for job `job_id`'s data prefix `data_uri`: both, as a JSON
    array, so a purge can see whether the job still names the prefix; `again`: the second
    look at a prefix purged already (`JobStore.purge_job_data`)."""
    return json.dumps([job_id, data_uri, "again"] if again else [job_id, data_uri])


def _parse_purge_member(member: str) -> tuple[str, str, bool]:
    """(job id, data prefix, whether it is the second look) of a purge queue entry; ("",
    prefix, False) for an entry queued before entries named their job (a bare prefix: it
    starts with "/" or a scheme, never "[")."""
    if member.startswith("["):
        job_id, uri, *again = json.loads(member)
        return str(job_id), str(uri), bool(again)
    return "", member, False
