"""`perito models compare`: how a candidate version answered the images its incumbent
answered, read live from a shadow's counts (`perito_core.models.comparison.ComparisonStore`,
summed over every server) or made offline by two bulk jobs over the same images.

The offline comparison acts as an operator, as `perito models import` does: it records the
two jobs through `JobService` (the server's own submission path, with the tenant's checks)
straight into the job store, and `perito worker`s run them; no server need be up.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import redis

from perito.v1 import jobs_pb2
from perito.v1.vocabulary import ItemState, JobState
from perito_core.access.audit import record_command
from perito_core.access.tenancy import Tenant
from perito_core.drift import COMPARE_JOB_LABEL
from perito_core.errors import FailedPrecondition, PeritoError
from perito_core.jobs.store import ItemResult, Job, JobStore
from perito_core.models.comparison import SHIFT_BINS, Comparison, ComparisonStore
from perito_core.plots import confusion_heatmap
from perito_core.redis_connection import redis_client
from perito_server.jobs import JobService
from perito_server.model_pool import ModelPool
from perito_server.settings import ServerSettings

# The confusion is printed as a matrix up to this many labels a side; past it, only the
# most frequent disagreements are (the --json and --plot outputs hold all of it).
MATRIX_MAX_LABELS = 12
# Disagreements listed, most frequent first.
TOP_DISAGREEMENTS = 10
# Failed items listed in the table (all of them are in --json).
FAILED_LISTED = 20
# Widest histogram bar, in characters.
BAR_WIDTH = 30
# Results read from the job store per round trip.
RESULTS_PAGE = 1000


@dataclass(frozen=True)
class FailedItem:
    """An image at least one version did not answer: not compared.

    Attributes:
        index: its place in the incumbent's job (the input order); -1 for an image only the
            candidate's job listed.
        errors: version -> that version's error ("" where it answered; "not in its job"
            where its job did not list the image).
    """

    index: int
    id: str
    uri: str
    errors: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "uri": self.uri, "errors": self.errors}


@dataclass
class Report:
    """A comparison and where it came from: `source` "shadow" (live) or "images" (offline,
    `images` the input, `jobs` version -> job id, `failed` the items not compared)."""

    comparison: Comparison
    source: str
    images: str = ""
    jobs: dict[str, str] = field(default_factory=dict)
    failed: list[FailedItem] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The report as a JSON object: every figure the table prints, the whole confusion
        (most frequent first) and every failed item. Shares and shifts are fractions."""
        c = self.comparison
        low, high = c.agreement_interval
        edges = [round(-1.0 + 2.0 * i / SHIFT_BINS, 6) for i in range(SHIFT_BINS + 1)]
        out: dict[str, Any] = {
            "model": c.model,
            "incumbent": c.incumbent,
            "candidate": c.candidate,
            "source": self.source,
            "compared": c.compared,
            "agreed": c.agreed,
            "agreement": c.agreement,
            "agreement_interval": [low, high] if c.compared else None,
            "mean_shift": c.mean_shift,
            "shift_histogram": {"edges": edges, "counts": list(c.shift)},
            "confusion": [
                {"incumbent": a, "candidate": b, "images": n} for (a, b), n in _by_count(c)
            ],
        }
        if self.source == "images":
            out["images"] = self.images
            out["jobs"] = self.jobs
            out["failed"] = [item.as_json() for item in self.failed]
        return out


def _by_count(comparison: Comparison) -> list[tuple[tuple[str, str], int]]:
    """The confusion's cells, most images first (then by labels)."""
    return sorted(comparison.confusion.items(), key=lambda cell: (-cell[1], cell[0]))


def _percent(share: float) -> str:
    return f"{100 * share:.1f}%"


def table(report: Report) -> str:
    """The report as text: images compared, top-1 agreement with its Wilson 95% interval,
    the mean confidence shift and its histogram, the confusion (incumbent's labels as rows,
    candidate's as columns; past `MATRIX_MAX_LABELS` a side only the most frequent
    disagreements) and, offline, the items not compared."""
    c = report.comparison
    where = (
        "shadow traffic, summed over every server"
        if report.source == "shadow"
        else f"bulk jobs over {report.images}"
    )
    lines = [
        f"{c.model}: version {c.candidate} (candidate) against version {c.incumbent} "
        f"(incumbent), {where}",
        f"images compared    {c.compared:,}",
    ]
    if report.source == "images":
        lines.append(f"not compared       {len(report.failed):,} (failed on either side)")
    if c.agreement is None or c.mean_shift is None:
        lines.append("nothing compared yet")
        return "\n".join(lines + _failed_lines(report)) + "\n"
    low, high = c.agreement_interval
    lines += [
        f"top-1 agreement    {_percent(c.agreement)}  ({c.agreed:,} images; 95% interval "
        f"{_percent(low)} to {_percent(high)})",
        f"confidence shift   {c.mean_shift:+.3f} mean (candidate's top-1 probability minus "
        "the incumbent's)",
        *_histogram_lines(c),
        "",
        *_confusion_lines(c),
        *_failed_lines(report),
    ]
    return "\n".join(lines) + "\n"


def _histogram_lines(comparison: Comparison) -> list[str]:
    """One line per shift bin from the first to the last with images: its range, a bar
    scaled to the fullest bin, the images."""
    used = [i for i, n in enumerate(comparison.shift) if n]
    if not used:
        return []
    most = max(comparison.shift)
    lines = []
    for i in range(used[0], used[-1] + 1):
        low = -1.0 + 2.0 * i / SHIFT_BINS
        high = low + 2.0 / SHIFT_BINS
        count = comparison.shift[i]
        bar = "#" * math.ceil(BAR_WIDTH * count / most) if count else ""
        close = "]" if i == SHIFT_BINS - 1 else ")"
        lines.append(f"  [{low:+.1f}, {high:+.1f}{close}  {bar:<{BAR_WIDTH}}  {count:,}")
    return lines


def _confusion_lines(comparison: Comparison) -> list[str]:
    rows, columns = comparison.labels()
    lines = []
    if len(rows) <= MATRIX_MAX_LABELS and len(columns) <= MATRIX_MAX_LABELS:
        lines.append(
            f"confusion (rows: version {comparison.incumbent}'s top-1, "
            f"columns: version {comparison.candidate}'s)"
        )
        counts = [[comparison.confusion.get((a, b), 0) for b in columns] for a in rows]
        first = max(len(a) for a in rows)
        widths = [
            max(len(b), *(len(f"{row[j]:,}") for row in counts)) for j, b in enumerate(columns)
        ]
        header = " ".join(f"{b:>{w}}" for b, w in zip(columns, widths, strict=True))
        lines.append(f"  {'':<{first}}  {header}")
        for a, row in zip(rows, counts, strict=True):
            cells = " ".join(f"{n:>{w},}" for n, w in zip(row, widths, strict=True))
            lines.append(f"  {a:<{first}}  {cells}")
    disagreements = [(pair, n) for pair, n in _by_count(comparison) if pair[0] != pair[1]]
    if disagreements:
        shown = disagreements[:TOP_DISAGREEMENTS]
        lines.append(
            f"disagreements, most frequent first ({len(shown)} of {len(disagreements)} pairs; "
            f"version {comparison.incumbent} -> version {comparison.candidate})"
        )
        width = max(len(f"{a} -> {b}") for (a, b), _ in shown)
        for (a, b), n in shown:
            lines.append(f"  {f'{a} -> {b}':<{width}}  {n:,}")
    else:
        lines.append("no disagreements")
    return lines


def _failed_lines(report: Report) -> list[str]:
    if not report.failed:
        return []
    lines = [f"not compared ({min(len(report.failed), FAILED_LISTED)} of {len(report.failed)}):"]
    for item in report.failed[:FAILED_LISTED]:
        why = "; ".join(f"version {v}: {e}" for v, e in item.errors.items() if e)
        lines.append(f"  {item.id or item.uri}  {why}")
    return lines


def plot_confusion(comparison: Comparison, path: Path) -> Path:
    """Write the confusion as a heat map PNG at `path` (`perito_core.plots.confusion_heatmap`):
    every label either version answered, in one order on both axes, the incumbent's as rows
    and the candidate's as columns, so agreement is the diagonal; each cell coloured by its
    share of the row. The figure is (n x 0.6 + 3) x (n x 0.6 + 2) inches at 100 dots an inch
    for n labels (at least 4), so its size says how many labels it holds.

    Raises:
        RuntimeError: matplotlib is not installed (perito[serve] declares it).
        OSError: `path` cannot be written.
    """
    rows, columns = comparison.labels()
    labels = sorted(set(rows) | set(columns))
    counts = np.array(
        [[comparison.confusion.get((a, b), 0) for b in labels] for a in labels], dtype=np.int64
    ).reshape(len(labels), len(labels))
    agreement = comparison.agreement
    title = f"{comparison.model}: {comparison.compared:,} images"
    if agreement is not None:
        title += f", {_percent(agreement)} agree"
    return confusion_heatmap(
        counts,
        labels,
        labels,
        path,
        xlabel=f"version {comparison.candidate} (candidate)",
        ylabel=f"version {comparison.incumbent} (incumbent)",
        title=title,
        colorbar=f"share of version {comparison.incumbent}'s answer",
    )


def comparison_store(settings: ServerSettings) -> ComparisonStore:
    """The shadows' comparisons in the job store's Redis (`settings.redis_url`)."""
    client = redis_client(settings.redis_url, socket_connect_timeout=2, socket_timeout=10)
    return ComparisonStore(client)


def live(settings: ServerSettings, name: str, incumbent: str, candidate: str) -> Report:
    """The comparison the servers' shadows have summed for versions `incumbent` and
    `candidate` of model `name` (empty when none was recorded).

    Raises:
        redis.RedisError: Redis could not be reached.
    """
    return Report(comparison_store(settings).read(name, incumbent, candidate), "shadow")


Progress = Callable[[list[Job]], None]


def offline(
    settings: ServerSettings,
    tenant: Tenant,
    name: str,
    incumbent: str,
    candidate: str,
    images: str,
    *,
    progress: Progress | None = None,
    poll_s: float = 0.5,
) -> Report:
    """Compare versions `incumbent` and `candidate` (numbers) of model `name` on the images
    under `images` (a folder or an `s3://` prefix): one bulk job per version, each pinned to
    it, submitted as `tenant` through `JobService.submit` (its prefix, output and quota
    checks), run by `perito worker`s. Waits for both jobs (calling `progress` with both
    every `poll_s` seconds), then pairs their items by URI in the incumbent's input order:
    an item both answered is compared by its top-1 label and probability, any other is a
    `FailedItem`. Interrupted (KeyboardInterrupt), both jobs are cancelled.

    Raises:
        PeritoError: a job was refused (as `JobService.submit`: InvalidArgument,
            PermissionDenied, QuotaExceeded, NotFound, ...), or one ended FAILED or CANCELLED.
        StorageUnavailable: Redis could not be reached.
    """
    service = JobService(settings, ModelPool(settings.open_registry(), settings))
    try:
        jobs = asyncio.run(_submit(service, tenant, name, (incumbent, candidate), images))
        try:
            done = _wait(service.store, [job.id for job in jobs], progress, poll_s)
        except KeyboardInterrupt:
            for job in jobs:
                asyncio.run(service.cancel(job.id, tenant))
            raise
    finally:
        asyncio.run(service.close())
    for job in done:
        if job.state is JobState.CANCELLED or (job.state is JobState.FAILED and job.error):
            raise FailedPrecondition(
                f"job {job.id} (version {job.model_version}) ended {job.state.value}: "
                f"{job.error or 'cancelled'}"
            )
    comparison, failed = compare_results(service.store, done[0], done[1])
    return Report(
        comparison,
        "images",
        images=images,
        jobs={job.model_version: job.id for job in done},
        failed=failed,
    )


def compare_results(
    store: JobStore, incumbent: Job, candidate: Job
) -> tuple[Comparison, list[FailedItem]]:
    """Pair two ended jobs' items by URI, in the incumbent's input order, and compare each
    item both answered by its top-1 label and probability (the first of its `predictions`).

    Returns:
        The comparison, and the items not compared: failed (or cancelled) on either side,
        or listed by one job only (the input changed between the two listings).
    """
    comparison = Comparison(incumbent.model, incumbent.model_version, candidate.model_version)
    theirs = {result.uri or result.id: result for result in _results(store, candidate)}
    failed = []
    a, b = incumbent.model_version, candidate.model_version
    for mine in _results(store, incumbent):
        other = theirs.pop(mine.uri or mine.id, None)
        if other is None:
            errors = {a: _error(mine), b: "not in its job"}
        elif _answered(mine) and _answered(other):
            (label_a, _, p_a), (label_b, _, p_b) = mine.predictions[0], other.predictions[0]
            comparison.add(np.array([[p_a]]), np.array([[p_b]]), [label_a], [label_b])
            continue
        else:
            errors = {a: _error(mine), b: _error(other)}
        failed.append(FailedItem(mine.index, mine.id, mine.uri, errors))
    for other in theirs.values():
        failed.append(FailedItem(-1, other.id, other.uri, {a: "not in its job", b: _error(other)}))
    return comparison, failed


def _answered(result: ItemResult) -> bool:
    return result.state is ItemState.SUCCEEDED and bool(result.predictions)


def _error(result: ItemResult) -> str:
    """ "" for an answered item; else its state and error."""
    if _answered(result):
        return ""
    return f"{result.state.value}: {result.error}" if result.error else result.state.value


async def _submit(
    service: JobService, tenant: Tenant, name: str, versions: tuple[str, str], images: str
) -> list[Job]:
    """One job per version over `images`, the version pinned, top-1 only."""
    submitted = []
    for version in versions:
        request = jobs_pb2.SubmitJobRequest(
            model=name,
            version=version,
            prefix=images,
            top_k=1,
            labels={COMPARE_JOB_LABEL: f"{versions[0]}-{versions[1]}"},
        )
        message = await service.submit(request, tenant)
        submitted.append(await asyncio.to_thread(service.store.get, message.id))
    return submitted


def _wait(
    store: JobStore, job_ids: list[str], progress: Progress | None, poll_s: float
) -> list[Job]:
    while True:
        jobs = [store.get(job_id) for job_id in job_ids]
        if progress is not None:
            progress(jobs)
        if all(job.state.terminal for job in jobs):
            return jobs
        time.sleep(poll_s)


def _results(store: JobStore, job: Job) -> Iterator[ItemResult]:
    """The job's item results in input order, a page at a time."""
    for start in range(0, job.total, RESULTS_PAGE):
        yield from store.results(job.id, start, RESULTS_PAGE)


def progress_line(jobs: list[Job]) -> str:
    """One line on both jobs: `version 3: 120/400 done (2 failed), running; version 4: ...`."""
    parts = []
    for job in jobs:
        done = job.succeeded + job.failed + job.cancelled
        failed = f" ({job.failed:,} failed)" if job.failed else ""
        parts.append(
            f"version {job.model_version}: {done:,}/{job.total:,} done{failed}, {job.state.value}"
        )
    return "; ".join(parts)


def run_compare(
    settings: ServerSettings,
    name: str,
    incumbent: str | None,
    candidate: str | None,
    images: str | None,
    as_json: bool,
    plot: Path | None,
) -> None:
    """`perito models compare`, its arguments as given: whom it acts as (the tenant
    PERITO_TOKEN names, with role `jobs` for --images, else `models:read`), the versions
    resolved through the registry, the report printed (and plotted).

    Raises:
        click.ClickException: a refusal, an unknown version, Redis unreachable, a job refused
            or ended without results; click.UsageError: one of INCUMBENT / CANDIDATE alone.
    """
    if (incumbent is None) != (candidate is None):
        raise click.UsageError("give both INCUMBENT and CANDIDATE, or neither")
    if images is not None and incumbent is None:
        raise click.UsageError("--images needs INCUMBENT and CANDIDATE")
    role, what = (
        ("jobs", f"run jobs on model {name!r}")
        if images is not None
        else ("models:read", f"read comparisons of model {name!r}")
    )
    try:
        tenant = settings.acting_tenant(role, what, name)
    except PeritoError as error:
        raise click.ClickException(f"{error.message} (PERITO_TOKEN)") from None
    try:
        if incumbent is None or candidate is None:
            _print_pairs(settings, name, as_json)
            return
        registry = settings.open_registry()
        a, b = registry.resolve(name, incumbent), registry.resolve(name, candidate)
        if a == b:
            raise click.UsageError(f"{incumbent} and {candidate} are both version {a}")
        if images is None:
            report = live(settings, name, a, b)
        else:
            report = offline(settings, tenant, name, a, b, images, progress=_Progress())
            for version, job_id in report.jobs.items():
                _record_job(settings, tenant, job_id, version, a, b)
    except PeritoError as error:
        raise click.ClickException(error.message) from None
    except redis.RedisError as error:
        raise click.ClickException(f"Redis (PERITO_REDIS_URL) is unreachable: {error}") from None
    except RuntimeError as error:  # a job store whose Redis may evict jobs (JobService)
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        click.echo(table(report), nl=False)
    if plot is not None:
        if not report.comparison.compared:
            raise click.ClickException(f"nothing compared: {plot} not written")
        plot_confusion(report.comparison, plot)
        if not as_json:
            click.echo(f"confusion matrix written to {plot}")


def _print_pairs(settings: ServerSettings, name: str, as_json: bool) -> None:
    """The version pairs a shadow recorded for `name`, each with its images and agreement."""
    store = comparison_store(settings)
    found = [store.read(name, a, b) for a, b in store.pairs(name)]
    if as_json:
        rows = [
            {
                "incumbent": c.incumbent,
                "candidate": c.candidate,
                "compared": c.compared,
                "agreement": c.agreement,
            }
            for c in found
        ]
        click.echo(json.dumps({"model": name, "pairs": rows}, indent=2))
        return
    if not found:
        click.echo(f"{name}: no comparison recorded (start one: perito models shadow)")
        return
    click.echo(f"{name}: comparisons recorded by shadows (incumbent -> candidate)")
    for c in found:
        agreement = "" if c.agreement is None else f", {_percent(c.agreement)} agree"
        click.echo(f"  {c.incumbent} -> {c.candidate}  {c.compared:,} images{agreement}")


class _Progress:
    """Both jobs' progress on stderr: rewritten in place on a terminal, else a line whenever
    it changes (at most every 5 s, and the last)."""

    def __init__(self) -> None:
        self.terminal = sys.stderr.isatty()
        self.last = ""
        self.last_at = 0.0

    def __call__(self, jobs: list[Job]) -> None:
        line = progress_line(jobs)
        ended = all(job.state.terminal for job in jobs)
        if self.terminal:
            click.echo(f"\r{line}\033[K" + ("\n" if ended else ""), nl=False, err=True)
        elif line != self.last and (ended or time.monotonic() - self.last_at >= 5.0):
            click.echo(line, err=True)
            self.last_at = time.monotonic()
        self.last = line


def _record_job(
    settings: ServerSettings, tenant: Tenant, job_id: str, version: str, a: str, b: str
) -> None:
    """The job's SubmitJob record in the audit log, as a server would write it."""
    unstored = record_command(
        settings,
        tenant=tenant.name,
        method="SubmitJob",
        resource=f"jobs/{job_id}",
        outcome="OK",
        detail=f"perito models compare {a} {b}: version {version}",
    )
    if unstored:
        click.echo(unstored, err=True)
