"""Finishing a job: its results files, in input order, then its terminal state.

Called by the worker whose chunk accounts for the last item, and by the server when a cancel
accounts for the rest. Idempotent: a second call rewrites the same files and changes nothing.
"""

from __future__ import annotations

import csv
import io
import json

from perito_core.jobs import ItemResult, Job, JobStore
from perito_core.storage import S3Options, open_store

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


def finalize_job(store: JobStore, job_id: str, s3: S3Options) -> Job:
    """Write the results files to the job's output location and set its terminal state."""
    job = store.get(job_id)
    if job.state.terminal:
        return job
    jsonl, table = render_results(store, job)
    output = open_store(job.output_uri, s3)
    output.write_bytes("results.jsonl", jsonl)
    output.write_bytes("results.csv", table)
    base = job.output_uri.rstrip("/")
    return store.finish(job_id, [f"{base}/results.jsonl", f"{base}/results.csv"])
