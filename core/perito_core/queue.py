"""The Celery configuration shared by the server (which enqueues) and the worker (which runs).

The server sends tasks by name, so it never imports the worker package. Reliability settings
follow Celery's guidance for long, idempotent tasks: acknowledge after the work is done
(`acks_late`), take one message at a time (prefetch 1), and put a task back when the process
running it dies (`reject_on_worker_lost`); the worker caps redeliveries itself.
"""

from __future__ import annotations

from typing import Any

BULK_QUEUE = "perito.bulk"
CLASSIFY_CHUNK = "perito.classify_chunk"
FINALIZE_JOB = "perito.finalize_job"


def make_celery(broker_url: str, *, visibility_timeout_s: int = 3600) -> Any:
    """A Celery app wired to `broker_url` (Redis) with Perito's queues and settings."""
    from celery import Celery

    app = Celery("perito", broker=broker_url)
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
        },
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    return app
