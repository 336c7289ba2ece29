"""The Celery configuration shared by the server (which enqueues) and the worker (which runs).

The server sends tasks by name, so it never imports the worker package. Reliability settings
follow Celery's guidance for long, idempotent tasks: acknowledge after the work is done
(`acks_late`), take one message at a time (prefetch 1), and put a task back when the process
running it dies (`reject_on_worker_lost`); the worker caps redeliveries itself.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any

from perito_core.redis_connection import BROKER_URL_SETTING, celery_broker

BULK_QUEUE = "perito.bulk"
CLASSIFY_CHUNK = "perito.classify_chunk"
FINALIZE_JOB = "perito.finalize_job"


def make_celery(
    broker_url: str, *, visibility_timeout_s: int = 3600, setting: str = BROKER_URL_SETTING
) -> Any:
    """A Celery app wired to `broker_url` with Perito's queues and settings.

    `broker_url` is any Redis URL `perito_core.redis_connection` accepts; a
    `redis+sentinel://` one becomes kombu's Sentinel transport (`celery_broker`), so the
    broker follows a failover as the job store does.

    Raises:
        InvalidArgument: a malformed `broker_url`, naming `setting`.
    """
    from celery import Celery

    broker, sentinel_options = celery_broker(broker_url, setting=setting)
    app = Celery("perito", broker=broker)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=BULK_QUEUE,
        task_routes={CLASSIFY_CHUNK: {"queue": BULK_QUEUE}, FINALIZE_JOB: {"queue": BULK_QUEUE}},
        # A message not acknowledged within this time is delivered again (the worker that had
        # it is presumed dead). Chunks take seconds; this must be far longer. Workers sweep for
        # such messages every fifth of it (at most a minute): one cheap ZRANGEBYSCORE, where
        # kombu's default sweep (every 100 s) would leave a lost chunk waiting far longer.
        broker_transport_options={
            "visibility_timeout": visibility_timeout_s,
            "unacked_restore_interval": min(60, max(1, visibility_timeout_s // 5)),
            "unacked_restore_throttle": 1,
            **sentinel_options,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    return app


def chunk_time_limits(items: int, item_time_limit_s: float) -> tuple[float, float]:
    """(soft, hard) Celery time limits in seconds for a chunk of `items` images.

    The soft limit raises `SoftTimeLimitExceeded` in the task, which ends the attempt with
    that reason (its recorded items stay); the hard limit, a minute later, kills a process
    stuck where no exception can reach it.
    """
    soft = 60.0 + items * item_time_limit_s
    return soft, soft + 60.0


def send_chunks(
    app: Any,
    job_id: str,
    chunks: Iterable[int],
    *,
    chunk_size: int,
    total: int,
    item_time_limit_s: float,
) -> int:
    """Enqueue `perito.classify_chunk` for each of `chunks` of a job; returns how many.

    Raises whatever kombu raises for a broker that cannot be reached.
    """
    sent = 0
    with app.producer_or_acquire() as producer:
        for chunk in chunks:
            start = chunk * chunk_size
            stop = min(start + chunk_size, total)
            soft, hard = chunk_time_limits(stop - start, item_time_limit_s)
            app.send_task(
                CLASSIFY_CHUNK,
                kwargs={"job_id": job_id, "chunk": chunk, "start": start, "stop": stop},
                queue=BULK_QUEUE,
                producer=producer,
                soft_time_limit=soft,
                time_limit=hard,
            )
            sent += 1
    return sent


# kombu's Redis transport keeps a queue's messages of priority p > 0 under "{queue}\x06\x16{p}".
_PRIORITY_SEP = "\x06\x16"


def queued_chunks(broker: Any, page: int = 1000) -> set[tuple[str, int]]:
    """(job id, chunk) of every `classify_chunk` message waiting in the bulk queue.

    Reads kombu's Redis transport layout (a list per queue and priority, each message a JSON
    envelope whose `body` is the base64 of Celery's protocol-2 `[args, kwargs, embed]`), a
    page at a time. Messages a worker has taken (kombu's `unacked` hash) are not counted:
    a running chunk is known by its lease instead.

    Args:
        broker: a `redis.Redis` client on the Celery broker.
    """
    found: set[tuple[str, int]] = set()
    for key in [BULK_QUEUE, *(f"{BULK_QUEUE}{_PRIORITY_SEP}{p}" for p in range(1, 10))]:
        start = 0
        while True:
            raw = broker.lrange(key, start, start + page - 1)
            for message in raw:
                parsed = _chunk_of(message)
                if parsed is not None:
                    found.add(parsed)
            if len(raw) < page:
                break
            start += page
    return found


def _chunk_of(message: bytes) -> tuple[str, int] | None:
    try:
        envelope = json.loads(message)
        if envelope.get("headers", {}).get("task") != CLASSIFY_CHUNK:
            return None
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        kwargs = json.loads(body)[1]
        return str(kwargs["job_id"]), int(kwargs["chunk"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
