"""Finishing a job: its results files, in input order, then its terminal state.

Called by the worker whose chunk accounts for the last item, by the server when a cancel
accounts for the rest, and by the watchdog for a complete job nobody finished. Idempotent: a
second call rewrites the same files and changes nothing. A job whose files cannot be written
after `max_attempts` tries ends FAILED with the reason; its item results stay readable.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import uuid

from perito_core.errors import FailedPrecondition, PeritoError
from perito_core.jobs import ItemResult, Job, JobStore
from perito_core.storage import S3Options, open_store

log = logging.getLogger(__name__)

PAGE = 2000


def _json_line(result: ItemResult, job: Job) -> str:
    top = result.predictions[0] if result.predictions else None
    return json.dumps(
        {
            "index": result.index,
            "id": result.id,
            "uri": result.uri,
            "state": result.state.value,
            "label": top[0] if top else None,
            "probability": round(top[2], 6) if top else None,
            "uncertain": result.uncertain,
            "margin": round(result.margin, 6),
            "predictions": [
                {"label": label, "class_index": index, "probability": round(p, 6)}
                for label, index, p in result.predictions
            ],
            "error": result.error or None,
            "first_frame_only": result.first_frame_only,
            "model": job.model,
            "model_version": job.model_version,
        }
    )


def render_results(store: JobStore, job: Job) -> tuple[bytes, bytes]:
    """The JSONL and CSV files for a job: one row per item, in input order."""
    lines: list[str] = []
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(
        [
            "index",
            "id",
            "uri",
            "state",
            "label",
            "probability",
            "uncertain",
            "error",
            "model_version",
        ]
    )
    for start in range(0, job.total, PAGE):
        for result in store.results(job.id, start, PAGE):
            lines.append(_json_line(result, job))
            top = result.predictions[0] if result.predictions else None
            writer.writerow(
                [
                    result.index,
                    result.id,
                    result.uri,
                    result.state.value,
                    top[0] if top else "",
                    f"{top[2]:.6f}" if top else "",
                    int(result.uncertain),
                    result.error,
                    job.model_version,
                ]
            )
    return ("\n".join(lines) + "\n").encode(), table.getvalue().encode()


def finalize_job(store: JobStore, job_id: str, s3: S3Options, *, max_attempts: int = 5) -> Job:
    """Write the results files to the job's output location and set its terminal state.

    Raises:
        StorageUnavailable: Redis or the output location failed this time; after
            `max_attempts` failed writes the job ends FAILED instead (no raise).
    """
    job = store.get(job_id)
    if job.state.terminal:
        return job
    jsonl, table = render_results(store, job)
    try:
        output = open_store(job.output_uri, s3)
        output.write_bytes("results.jsonl", jsonl)
        output.write_bytes("results.csv", table)
    except Exception as exc:
        attempts = store.count_finalize_attempt(job_id)
        if attempts < max_attempts:
            raise
        message = exc.message if isinstance(exc, PeritoError) else f"{type(exc).__name__}: {exc}"
        log.error("job %s: results cannot be written, ending it failed: %s", job_id, message)
        error = f"results could not be written to {job.output_uri} ({attempts} tries): {message}"
        return store.finish(job_id, [], error=error)
    base = job.output_uri.rstrip("/")
    return store.finish(job_id, [f"{base}/results.jsonl", f"{base}/results.csv"])


def check_output_writable(uri: str, s3: S3Options) -> None:
    """Write and delete a small object under `uri`, so a job that could never deliver its
    results is refused at submission.

    Raises:
        FailedPrecondition: the location cannot be written (field `output_uri`), with why.
    """
    key = f".perito-write-check-{uuid.uuid4().hex[:8]}"
    try:
        output = open_store(uri, s3)
        output.write_bytes(key, b"")
        output.delete(key)
    except PeritoError as exc:
        raise FailedPrecondition(
            f"output_uri {uri!r} cannot be written: {exc.message}", field="output_uri"
        ) from None
    except OSError as exc:
        raise FailedPrecondition(
            f"output_uri {uri!r} cannot be written: {exc.strerror or exc}", field="output_uri"
        ) from None
