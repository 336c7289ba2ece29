"""Finishing a job: its results files, in input order, then its terminal state.

Called by the worker whose chunk accounts for the last item, by the server when a cancel
accounts for the rest, and by the watchdog for a complete job nobody finished. Idempotent: a
second call rewrites the same files and changes nothing. A job whose files cannot be written
for `give_up_after_s` ends FAILED with the reason; its item results stay readable.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO

from perito_core.errors import FailedPrecondition, PeritoError
from perito_core.jobs.store import ItemResult, Job, JobStore
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
            "form": result.form or None,
            "model": job.model,
            "model_version": job.model_version,
        },
        allow_nan=False,  # RFC 8259: a NaN that slipped through fails loudly, never a bad line
    )


_CSV_HEADER = [
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


def write_results(store: JobStore, job: Job, jsonl: IO[str], table: IO[str]) -> None:
    """Write the JSONL and CSV files for a job, one row per item in input order, reading the
    store a page of 2,000 items at a time (memory does not grow with the job)."""
    writer = csv.writer(table)
    writer.writerow(_CSV_HEADER)
    for start in range(0, job.total, PAGE):
        for result in store.results(job.id, start, PAGE):
            jsonl.write(_json_line(result, job) + "\n")
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


def finalize_job(
    store: JobStore, job_id: str, s3: S3Options, *, give_up_after_s: float = 600.0
) -> Job:
    """Write the results files to the job's output location and set its terminal state.

    Args:
        give_up_after_s: how long the output location may keep failing (from the first
            failed write, with at least 3 tries) before the job ends FAILED with the reason.
            Its item results stay readable through the API until its retention ends.

    Raises:
        StorageUnavailable: Redis is unreachable.
        Exception: writing to the output location failed this time, whatever it raised
            (retried by the caller: the finalize task's backoff, or the watchdog).
    """
    job = store.get(job_id)
    if job.state.terminal:
        return job
    with tempfile.TemporaryDirectory(prefix="perito-results-") as folder:
        jsonl_path, csv_path = Path(folder, "results.jsonl"), Path(folder, "results.csv")
        with (
            jsonl_path.open("w", encoding="utf-8") as jsonl,
            csv_path.open("w", encoding="utf-8", newline="") as table,
        ):
            write_results(store, job, jsonl, table)
        try:
            output = open_store(job.output_uri, s3)
            output.upload_file("results.jsonl", jsonl_path)
            output.upload_file("results.csv", csv_path)
        except Exception as exc:
            message = (
                exc.message if isinstance(exc, PeritoError) else f"{type(exc).__name__}: {exc}"
            )
            attempts, first_failure = store.note_finalize_failure(job_id)
            if attempts < 3 or time.time() - first_failure < give_up_after_s:
                log.warning("job %s: results not written (try %d): %s", job_id, attempts, message)
                raise
            log.error("job %s: results cannot be written, ending it failed: %s", job_id, message)
            error = (
                f"results could not be written to {job.output_uri} ({attempts} tries over "
                f"{time.time() - first_failure:.0f} s): {message}"
            )
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
