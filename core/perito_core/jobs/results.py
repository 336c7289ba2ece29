"""Finishing a job: its results files, in input order, then its terminal state.

Called by the worker whose chunk accounts for the last item, by the server when a cancel
accounts for the rest, and by the watchdog for a complete job nobody finished. Idempotent: a
second call rewrites the same files and changes nothing.

A job whose files cannot be written ends FAILED with the reason, its item results readable
through the API until its retention ends. A refusal that waiting cannot change (a results file
that is a symbolic link, a file where the output folder should be, permission denied, a
read-only file system, a missing bucket, access denied) ends it at the first try; a failure
that may pass (storage unreachable, a server error, a full disk) is tried again, 5 s doubling
to 60 s apart (`RETRY_FIRST_S`, `RETRY_MAX_S`), until `give_up_after_s` has passed since the
first failed try. The reason is written for the job's owner: what was refused, in terms of the
output location they named, never a path the server resolved.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from perito.v1.vocabulary import ItemState
from perito_core.errors import FailedPrecondition, PeritoError, StorageUnavailable
from perito_core.jobs.store import ItemResult, Job, JobStore
from perito_core.models.provenance import provenance_record
from perito_core.storage import (
    LocalStore,
    ObjectStore,
    S3Options,
    echo_uri,
    open_store,
    split_s3_uri,
)

log = logging.getLogger(__name__)

PAGE = 2000
RESULT_FILES = ("results.jsonl", "results.csv")
# Tries of a write that may succeed later: the first again after 5 s, each wait doubling, 60 s
# at most (the finalize task's Celery backoff and the watchdog's).
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 60.0


def item_provenance(job: Job, result: ItemResult) -> dict[str, Any] | None:
    """A succeeded item's provenance (`perito.v1.Provenance`'s fields, as
    `provenance_record`): its input's sha256 joined with the job's version digests, the
    threshold the job applied, and the job's id as the request id. None for an item that did
    not succeed, or of a job recorded before provenance."""
    if job.served is None or result.state is not ItemState.SUCCEEDED:
        return None
    return provenance_record(
        job.served,
        input_sha256=result.input_sha256,
        model=job.model,
        model_version=job.model_version,
        form=result.form,
        confidence_threshold=job.confidence_threshold or job.served.confidence_threshold,
        request_id=job.id,
        quality_issues=result.quality.issues if result.quality else (),
    )


# RFC 8259: a NaN that slipped through fails loudly (ValueError), never a bad line. One
# encoder for every line (`json.dumps` with an option builds one per call).
_ENCODE = json.JSONEncoder(allow_nan=False).encode


def _json_line(result: ItemResult, job: Job, provenance: dict[str, Any] | None) -> str:
    top = result.predictions[0] if result.predictions else None
    return _ENCODE(
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
            "quality": result.quality.as_dict() if result.quality else None,
            "model": job.model,
            "model_version": job.model_version,
            "provenance": provenance,
        }
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
    # Provenance (docs/trust.md#provenance), empty for an item that did not succeed.
    "input_sha256",
    "model",
    "artifact_sha256",
    "form",
    "request_id",
    # The photo-quality issues (docs/trust.md#quality), space-separated; empty when none.
    "quality_issues",
]


_CSV_PROVENANCE = ("input_sha256", "model", "artifact_sha256", "form", "request_id")
# A cell a spreadsheet would run as a formula (OWASP, "CSV Injection"): its first character.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_text(text: str) -> str:
    """`text` as a CSV cell a spreadsheet shows as text: one that starts as a formula would
    (`=HYPERLINK(...)`, `+`, `-`, `@`, a tab or a carriage return) gets a leading `'`, as
    OWASP's "CSV Injection" advises; results.jsonl keeps every value as it is."""
    return f"'{text}" if text.startswith(_FORMULA_STARTS) else text


def write_results(store: JobStore, job: Job, jsonl: IO[str], table: IO[str]) -> None:
    """Write the JSONL and CSV files for a job, one row per item in input order, reading the
    store a page of 2,000 items at a time (memory does not grow with the job)."""
    writer = csv.writer(table)
    writer.writerow(_CSV_HEADER)
    for start in range(0, job.total, PAGE):
        for result in store.results(job.id, start, PAGE):
            provenance = item_provenance(job, result)
            jsonl.write(_json_line(result, job, provenance) + "\n")
            top = result.predictions[0] if result.predictions else None
            writer.writerow(
                [
                    result.index,
                    spreadsheet_text(result.id),
                    spreadsheet_text(result.uri),
                    result.state.value,
                    spreadsheet_text(top[0]) if top else "",
                    f"{top[2]:.6f}" if top else "",
                    int(result.uncertain),
                    spreadsheet_text(result.error),
                    job.model_version,
                    *(
                        [provenance[name] for name in _CSV_PROVENANCE]
                        if provenance
                        else [""] * len(_CSV_PROVENANCE)
                    ),
                    " ".join(result.quality.issues) if result.quality else "",
                ]
            )


def finalize_job(
    store: JobStore, job_id: str, s3: S3Options, *, give_up_after_s: float = 300.0
) -> Job:
    """Write the results files to the job's output location and set its terminal state.

    Args:
        give_up_after_s: how long, from the first failed try, a write that may succeed later
            (storage unreachable) is tried again before the job ends FAILED. A refusal no
            wait can change ends it FAILED at once (see the module docstring).

    Returns:
        The job, terminal: SUCCEEDED, PARTIALLY_SUCCEEDED, FAILED or CANCELLED from its
        items, or FAILED with `error` "results could not be written: ..." (its item
        results kept as they were recorded).

    Raises:
        StorageUnavailable: Redis is unreachable; or the write failed in a way that may pass
            and `give_up_after_s` has not passed yet (retried by the caller: the finalize
            task's backoff, or the watchdog).
    """
    job = store.get(job_id)
    if job.state.terminal:
        return job
    with tempfile.TemporaryDirectory(prefix="perito-results-") as folder:
        jsonl_path, csv_path = Path(folder, "results.jsonl"), Path(folder, "results.csv")
        try:  # writing the files counts too: whatever fails, the bound below ends the job
            with (
                jsonl_path.open("w", encoding="utf-8") as jsonl,
                csv_path.open("w", encoding="utf-8", newline="") as table,
            ):
                write_results(store, job, jsonl, table)
            output = open_store(job.output_uri, s3)
            _refuse_links(output)
            output.upload_file("results.jsonl", jsonl_path)
            output.upload_file("results.csv", csv_path)
        except Exception as exc:  # classified below: the job ends, or the write is tried again
            failure = write_failure(exc, job.output_uri)
            attempts, first_failure = store.note_finalize_failure(job_id)
            waited = time.time() - first_failure
            if not failure.permanent and waited < give_up_after_s:
                log.warning(
                    "job %s: results not written (try %d): %s (%s)",
                    job_id,
                    attempts,
                    failure.reason,
                    _describe(exc),
                )
                raise StorageUnavailable(
                    f"results not written yet (try {attempts}): {failure.reason}",
                    retry_after=min(RETRY_MAX_S, RETRY_FIRST_S * 2.0 ** (attempts - 1)),
                ) from exc
            error = f"results could not be written: {failure.reason}"
            if not failure.permanent:
                error += f" ({attempts} tries over {waited:.0f} s)"
            log.error("job %s: ending it failed: %s (%s)", job_id, error, _describe(exc))
            return store.finish(job_id, [], error=error)
    base = job.output_uri.rstrip("/")
    return store.finish(job_id, [f"{base}/results.jsonl", f"{base}/results.csv"])


@dataclass(frozen=True)
class WriteFailure:
    """Why writing the results files failed, as the job's owner may read it.

    Attributes:
        permanent: no wait will change it (the job ends FAILED at once).
        reason: what was refused, naming only the results files, the caller's own bucket or
            an error code: never a path the server resolved (a link's target may be another
            tenant's folder).
    """

    permanent: bool
    reason: str


class _Refused(Exception):
    """A results file the output folder holds as something that must not be written over."""


def _refuse_links(output: ObjectStore) -> None:
    """Refuse a local output folder whose results file is a symbolic link (wherever it
    points: it is never followed) or a folder."""
    if not isinstance(output, LocalStore):
        return
    for name in RESULT_FILES:
        try:
            mode = os.lstat(output.root / name).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISLNK(mode):
            raise _Refused(f"{name} is a symbolic link; it is not followed")
        if stat.S_ISDIR(mode):
            raise _Refused(f"{name} is a folder")


# OSError numbers no wait changes, and what each means for an output folder.
_PERMANENT_ERRNO = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the output folder is on a read-only file system",
    errno.ENOTDIR: "part of the output path is a file, not a folder",
    errno.EEXIST: "part of the output path is a file, not a folder",  # mkdir over a file
    errno.EISDIR: "a results file is a folder",
    errno.ELOOP: "the output path holds a symbolic link loop",
    errno.ENAMETOOLONG: "the output path is too long",
}
# HTTP statuses of an S3 refusal that may pass: a timeout, a conflicting operation in
# progress, throttling. Any other 4xx (AccessDenied, NoSuchBucket, ...) is final.
_S3_TRANSIENT_STATUS = {408, 409, 429}


def write_failure(exc: BaseException, output_uri: str) -> WriteFailure:
    """Classify an exception raised while writing the results files to `output_uri`.

    Permanent: a symbolic link or folder in a results file's place, the OSErrors of
    `_PERMANENT_ERRNO`, an S3 4xx refusal (but 408, 409, 429), and any other Perito error
    but `StorageUnavailable` (a URI no store takes, a key out of the folder). Everything
    else may pass: an S3 endpoint unreachable or answering 5xx, a full disk, an I/O error.
    """
    if isinstance(exc, _Refused):
        return WriteFailure(True, str(exc))
    if isinstance(exc, OSError):
        if exc.errno in _PERMANENT_ERRNO:
            return WriteFailure(True, _PERMANENT_ERRNO[exc.errno])
        return WriteFailure(False, exc.strerror or type(exc).__name__)
    if isinstance(exc, StorageUnavailable):
        return _s3_failure(exc, output_uri)
    if isinstance(exc, PeritoError):
        return WriteFailure(True, exc.message)
    return WriteFailure(False, type(exc).__name__)


def _s3_failure(exc: StorageUnavailable, output_uri: str) -> WriteFailure:
    """`S3Store` raises StorageUnavailable for every failed call, from None; the botocore
    error it replaced is still its `__context__`: a ClientError holds the server's answer."""
    from botocore.exceptions import ClientError

    answer = exc.__cause__ or exc.__context__
    if not isinstance(answer, ClientError):
        return WriteFailure(False, "object storage is unreachable")
    code = str(answer.response.get("Error", {}).get("Code", "")) or "no error code"
    status = int(answer.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code == "NoSuchBucket":
        return WriteFailure(True, f"bucket {split_s3_uri(output_uri)[0]!r} does not exist")
    if 400 <= status < 500 and status not in _S3_TRANSIENT_STATUS:
        return WriteFailure(True, f"object storage refused the write ({code})")
    return WriteFailure(False, f"object storage failed the write ({code})")


def _describe(exc: BaseException) -> str:
    """The exception as the operator's log shows it (paths included)."""
    return exc.message if isinstance(exc, PeritoError) else f"{type(exc).__name__}: {exc}"


def check_output_writable(uri: str, s3: S3Options, *, given: str) -> None:
    """Write and delete a small object under `uri`, so a job that could never deliver its
    results is refused at submission (a local folder whose results file is a symbolic link
    or a folder too: see `finalize_job`).

    Args:
        uri: the output location made canonical (symbolic links resolved), written to.
        s3: how to reach S3.
        given: the location as the caller sent it, the only one a refusal quotes; "" when
            the caller named none (the server's default results location: not quoted).

    Raises:
        FailedPrecondition: the location cannot be written (field `output_uri`), with why
            as `write_failure` says it (never a path the server resolved); the detail goes
            to the operator's log.
    """
    key = f".perito-write-check-{uuid.uuid4().hex[:8]}"
    try:
        output = open_store(uri, s3)
        _refuse_links(output)
        output.write_bytes(key, b"")
        output.delete(key)
    except (_Refused, OSError, PeritoError) as exc:
        log.info("output %s cannot be written: %s", uri, _describe(exc))
        if isinstance(exc, PeritoError) and not isinstance(exc, StorageUnavailable):
            why = f"the server cannot write there ({exc.reason})"
        else:
            why = write_failure(exc, given or uri).reason
        where = f"output_uri {echo_uri(given)}" if given else "the default results location"
        raise FailedPrecondition(f"{where} cannot be written: {why}", field="output_uri") from None
