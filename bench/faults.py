"""Fault suite: every accepted job ends, every item is recorded exactly once, memory is bounded.

Each scenario runs on real processes and real sockets: `redis-server` with its append-only file
on (`--appendonly yes --appendfsync everysec`), `perito serve` and `perito worker` started as
subprocesses (each in its own process group, so `kill -9` takes a worker's pool children too),
the SDK (`perito.Client`, `perito.AsyncClient`) over TCP. The model is a tiny TorchScript CNN
(32x32 input) and the images small PNGs in a local folder, so the suite runs in minutes on two
CPU cores without an S3 server.

Scenarios:

- `kill-worker`: a 5,000-image job (chunks of 100); the worker's process group is killed with
  SIGKILL three times and restarted each time. Expect all 5,000 succeeded.
- `kill-redis`: a 6,000-image job (chunks of 64); `redis-server` is killed with SIGKILL mid-job
  and restarted 5 s later on the same port and append-only file. Expect all 6,000 succeeded.
- `kill-server`: 30 `SubmitJob` calls from threads, each with its own request id; the server
  is killed with SIGKILL mid-burst and restarted; every call whose answer was lost is retried,
  then all 30 once more, with the same ids. Expect exactly one job per request id.
- `cancel-running`: a 5,000-image job cancelled while a chunk runs: the chunk stops at its
  next batch, its late results are not recorded over the cancellation, the counters do not
  move afterwards, and no item is both cancelled and succeeded.
- `chunk-error`: a model that raises in `forward` on an all-white image: in a job of 48 that
  image fails alone (its batch is rerun one image at a time), its error saying where the
  worker's log has the model's words (the log does); a chunk of only such images
  ends its attempt, is retried, and after 2 attempts its items fail dead-lettered.
- `odd-files`: a folder job holding a symlink out of the local root, a FIFO, a directory named
  `x.jpg` and a 2 GB sparse file beside 4 good images: those 4 fail, named, within seconds.
- `unwritable-output`: an `output_uri` under a regular file (and a read-only folder, unless
  running as root) is refused at submission with FAILED_PRECONDITION; no job is made.
- `unwritable-results`: output folders changed after their jobs were accepted, before a
  worker ran them: `results.jsonl` a symbolic link to a file out of the root, a file where the
  folder was, the folder deleted. The first two end FAILED with the reason within seconds of
  their last item (every item keeping its result, the link's target untouched), the third is
  made again and succeeds; a symlinked `results.jsonl` at submission is FAILED_PRECONDITION.
- `overload`: 160 concurrent `Classify` callers against a server admitting 16 images: excess
  calls get RESOURCE_EXHAUSTED with a retry hint, admitted calls are answered, health checks
  say SERVING throughout, the server's RSS stays bounded.
- `retention`: with `PERITO_JOB_RETENTION=5`, a few jobs run and expire; Redis's used memory
  and its job keys (`perito:job:{<id>}...`) return to their baseline.
- `slow-chunk`: a chunk that runs longer than the broker's visibility timeout (10 s; a model
  made slow with real work, one image per batch) with two workers: the broker redelivers it
  while it runs; the second delivery is skipped (the lease is live) and every item is
  recorded once, none failed.
- `cut-off-host` (`bench/fault_netns.py`): two worker hosts in network namespaces, joined to
  redis-server by veth links; host A's link is cut (set down: silent, no reset) a quarter of
  the way into its 3 chunks of a 4,000-image job, and restored once host B has finished one
  of them, resent by the watchdog after A's leases lapsed. Expect all 4,000 succeeded, once
  each, A's late writes refused or changing nothing. Skipped (SKIP) without root or `ip`.
- `sentinel-failover` (`bench/fault_sentinel.py`): the server and a worker on a
  `redis+sentinel://` URL (a primary, a replica, three `redis-sentinel`s); the primary is
  SIGKILLed mid-job (5,000 images) and the replica promoted. Expect all 5,000 succeeded.

Every scenario ends by checking each of its jobs: terminal; succeeded + failed + cancelled ==
total; the results file (`results.jsonl` at the output location) lists every index
0..total-1 exactly once; its per-state tallies equal the job's counters, and the items its
recorded parts hold (each part read and checked index by index) plus those of chunks closed
without one number exactly `total` (so no item counted twice, none both cancelled and
succeeded);
no job in the store left non-terminal. It prints one line per scenario, then a markdown
table, and exits 1 on any loss, duplicate, non-terminal job or failed expectation. Memory is
sampled every 0.2 s: the server's RSS, and the workers' PSS summed over each worker's process
group (a prefork worker and its pool child share most pages; RSS would count them twice).

    make faults
    .venv/bin/python bench/faults.py --only kill-redis --json var/faults.json
"""

# No `from __future__ import annotations`: the modules below are compiled by TorchScript,
# which needs real annotations.
import argparse
import asyncio
import contextlib
import fnmatch
import io
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import redis  # noqa: E402
import torch  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

import perito  # noqa: E402
from perito_core.access.tenancy import ANONYMOUS_TENANT  # noqa: E402
from perito_core.jobs.store import (  # noqa: E402
    ACTIVE_JOBS_KEY,
    DEAD_LETTER_KEY,
    JOBS_KEY,
    JobStore,
    job_key,
    job_keys_pattern,
    request_key,
)
from perito_core.models.registry import ModelRegistry  # noqa: E402
from perito_training.export import export_torchscript  # noqa: E402
from tests.helpers import TINY_INPUT, tiny_network  # noqa: E402
from tests.processes import Proc, ProcessFailed, free_port, redis_proc  # noqa: E402

BIN = Path(sys.executable).parent
LABELS = ["minor", "moderate", "severe"]
BATCH_SIZE = 4  # the workers' batch size (PERITO_BATCH_SIZE), the default


class Failure(Exception):
    """An expectation that did not hold; the scenario stops and reports it."""


class Skipped(Exception):
    """A scenario that cannot run on this machine (a privilege or tool missing): reported as
    SKIP with the reason, neither passed nor failed."""


# Processes


def _stat(pid: str) -> tuple[str, int, int]:
    """(state letter, parent pid, process group) of process `pid`, from /proc/PID/stat.

    Raises:
        FileNotFoundError: no such process (any more).
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    state, ppid, pgid = stat[stat.rindex(")") + 2 :].split()[:3]
    return state, int(ppid), int(pgid)


# `flags` of /proc/PID/stat: the kernel sets PF_EXITING (include/linux/sched.h) as a process
# starts to exit, before it is a zombie, while its memory is torn down and unreadable.
PF_EXITING = 0x4


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not exiting: a killed one is not, from the moment
    its exit starts (PF_EXITING) until it is reaped, through its zombie state."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] not in "ZX" and not int(fields[6]) & PF_EXITING


def _group_memory_mb(groups: set[int]) -> dict[int, tuple[float, float]]:
    """(RSS, PSS) in MB of each of the process `groups`, summed over their processes, from
    /proc. PSS counts pages shared between a prefork worker and its pool children once.

    Raises:
        OSError, ValueError, KeyError: a running process's figures could not be read (a
            process that exits while read is skipped).
    """
    found: dict[int, tuple[float, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            state, _, pgid = _stat(entry.name)
            if pgid not in groups or state in "ZX":  # another group's, or exited unreaped
                continue
            fields = dict(
                line.split(":", 1)
                for line in Path(f"/proc/{entry.name}/smaps_rollup").read_text().splitlines()[1:]
            )
            if "Rss" not in fields and not _running(int(entry.name)):
                continue  # it exited while read: its memory was gone
            rss, pss = (int(fields[k].split()[0]) / 1024 for k in ("Rss", "Pss"))
        except (FileNotFoundError, ProcessLookupError):  # it exited between list and read
            continue
        old_rss, old_pss = found.get(pgid, (0.0, 0.0))
        found[pgid] = (old_rss + rss, old_pss + pss)
    return found


@dataclass(frozen=True)
class Config:
    """What a stack is started with; scenarios with equal configs share one stack."""

    workers: int = 1
    worker_env: tuple[tuple[str, str], ...] = ()
    server_env: tuple[tuple[str, str], ...] = ()
    preload: str = ""


class Stack:
    """redis-server (append-only file on), `perito worker`s and `perito serve`, on free ports."""

    def __init__(self, lab: "Lab", name: str, config: Config) -> None:
        self.name, self.config = name, config
        self.dir = lab.work / "stacks" / name
        (self.dir / "redis").mkdir(parents=True)
        self.redis_port, self.port = free_port(), free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.target = f"127.0.0.1:{self.port}"
        common = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PERITO_REDIS_URL": self.redis_url,
            "PERITO_REGISTRY": str(lab.registry),
            "PERITO_LOCAL_ROOTS": json.dumps([str(lab.root)]),
            "PERITO_RESULTS_URI": str(lab.root / "results"),
            "PERITO_WATCHDOG_INTERVAL_S": "1",
            "PERITO_LEASE_TTL_S": "3",
            "PERITO_VISIBILITY_TIMEOUT_S": "30",
            "PERITO_NICE": "0",
        }
        self.redis = redis_proc(
            self.redis_port, self.dir / "redis.log", dict(os.environ), data_dir=self.dir / "redis"
        )
        self.workers = [
            Proc(
                f"worker-{i}",
                [str(BIN / "perito"), "worker", "--log-level", "INFO", "--name", f"w{i}@faults"],
                {
                    **common,
                    "PERITO_CACHE_DIR": str(self.dir / f"worker-{i}-cache"),
                    "PERITO_TORCH_THREADS": "1",
                    "PERITO_BATCH_SIZE": str(BATCH_SIZE),
                    **dict(config.worker_env),
                },
                self.dir / f"worker-{i}.log",
                " ready.",
            )
            for i in range(config.workers)
        ]
        preload = ["--preload", config.preload] if config.preload else []
        self.server = Proc(
            "perito serve",
            [
                str(BIN / "perito"),
                "serve",
                "--port",
                str(self.port),
                "--log-level",
                "INFO",
                *preload,
            ],
            {
                **common,
                "PERITO_CACHE_DIR": str(self.dir / "server-cache"),
                **dict(config.server_env),
            },
            self.dir / "server.log",
            "serving on",
        )
        self.r = redis.Redis(host="127.0.0.1", port=self.redis_port, socket_timeout=10)

    def start(self) -> None:
        self.redis.start()
        for worker in self.workers:
            worker.launch()
        self.server.launch()
        for proc in [*self.workers, self.server]:
            proc.wait_ready()

    def ensure_running(self) -> None:
        """Restart whatever a previous scenario left stopped."""
        for proc in [self.redis, *self.workers, self.server]:
            if not proc.alive:
                proc.start()

    def close(self) -> None:
        for proc in [self.server, *self.workers]:
            proc.stop()
        self.redis.stop()

    def client(self, **kwargs: Any) -> perito.Client:
        return perito.Client(self.target, **{"timeout": 30.0, **kwargs})

    def job_ids(self) -> set[str]:
        return {k.decode() for k in self.r.zrange(JOBS_KEY, 0, -1)}  # type: ignore[union-attr]

    def active_jobs(self) -> int:
        return int(self.r.zcard(ACTIVE_JOBS_KEY))  # type: ignore[arg-type]

    def rss(self) -> tuple[float, float]:
        """(the server's RSS, the PSS of every worker process) in MB, now; 0 for a stopped one.

        Raises:
            OSError, ValueError, IndexError, KeyError: /proc could not be read or parsed.
            SampleMissing: a running process's group had no figures.
        """
        leaders = {p.pid: p.name for p in (self.server, *self.workers) if p.alive}
        groups = _group_memory_mb(set(leaders))
        missing = [name for pid, name in leaders.items() if pid not in groups and _running(pid)]
        if missing:
            raise SampleMissing(f"no memory figures for running {', '.join(missing)}")
        server = groups.get(self.server.pid, (0.0, 0.0))[0]
        workers = sum(groups.get(w.pid, (0.0, 0.0))[1] for w in self.workers)
        return server, workers


class SampleMissing(Exception):
    """A memory sample that could not be taken."""


class Sampler:
    """Samples the current stack's server and worker RSS every 0.2 s; keeps the peaks.

    A sample that fails is not a small one: the first failure since `reset` is kept in
    `error`, and the peaks read as missing (None), never as 0 under a bound."""

    def __init__(self) -> None:
        self.stack: Stack | None = None
        self._peak_server = self._peak_workers = 0.0
        self.samples = 0
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def reset(self, stack: Stack) -> None:
        self.stack = stack
        self._peak_server = self._peak_workers = 0.0
        self.samples = 0
        self.error = ""

    @property
    def peak_server(self) -> float | None:
        """The server's peak RSS in MB since `reset`; None when a sample failed or none ran."""
        return None if self.error or not self.samples else self._peak_server

    @property
    def peak_workers(self) -> float | None:
        """The workers' peak summed PSS in MB since `reset`; None as for `peak_server`."""
        return None if self.error or not self.samples else self._peak_workers

    def sample(self) -> None:
        """Take one sample of the current stack now (the thread does this every 0.2 s)."""
        stack = self.stack
        if stack is None:
            return
        try:
            server, workers = stack.rss()
        except Exception as exc:  # noqa: BLE001 - kept, and the scenario fails on it
            self.error = self.error or f"memory sample failed: {type(exc).__name__}: {exc}"
            return
        self._peak_server = max(self._peak_server, server)
        self._peak_workers = max(self._peak_workers, workers)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


# Models and images


class _Boom(nn.Module):
    """Fails the whole forward pass on a batch holding an all-white image (normalised 2.0)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.flatten(1).mean(1) > 1.9).any()):
            raise RuntimeError("boom: this model fails on an all-white image")
        return self.inner(x)


class _Slow(nn.Module):
    """The tiny network plus `rounds` dependent 512x512 products per image: real work that
    makes one image take a chosen time (TorchScript has no sleep)."""

    def __init__(self, inner: nn.Module, rounds: int) -> None:
        super().__init__()
        self.inner = inner
        self.rounds = rounds
        self.register_buffer("weight", torch.randn(512, 512) / 32.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)[:, :512]
        for _ in range(self.rounds):
            h = torch.tanh(torch.mm(h, self.weight))
        return self.inner(x) + 0.0 * h[:, :1]


def _slow_rounds(seconds_per_image: float) -> int:
    """Rounds of `_Slow` that take `seconds_per_image` for one image on one thread here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probe = 400
        with warnings.catch_warnings():  # torch 2.14 marks TorchScript deprecated
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.script(_Slow(tiny_network(3), probe).eval())
        x = torch.zeros(1, 3, 32, 32)
        timings = []
        with torch.inference_mode():
            module(x)
            for _ in range(3):  # the fastest: a busy machine then only makes the chunk longer
                started = time.perf_counter()
                module(x)
                timings.append(time.perf_counter() - started)
        per_round = min(timings) / probe
    finally:
        torch.set_num_threads(threads)
    return max(probe, int(seconds_per_image / per_round))


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pngs(folder: Path, count: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"{index:05d}.png"
        path.write_bytes(_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
        paths.append(path)
    return paths


class Lab:
    """The work folder: registry, local root with images and results, the running stack."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.registry = work / "registry"
        self.root = work / "root"  # the only local root jobs may read and write
        (self.root / "results").mkdir(parents=True)
        self.current: Stack | None = None
        self._published: set[str] = set()
        self._folders: dict[str, Path] = {}

    def publish(self, name: str) -> None:
        """Publish `tiny`, `boom` or `slow` (once)."""
        if name in self._published:
            return
        path = self.work / "models" / f"{name}.pt"
        if name == "tiny":
            network = tiny_network(3)
        elif name == "boom":
            network = _Boom(tiny_network(3))
        else:
            network = _Slow(tiny_network(3), _slow_rounds(0.8))
        torch.manual_seed(0)
        export_torchscript(network, TINY_INPUT, path)
        registry = ModelRegistry.open(str(self.registry), cache_dir=self.work / "publish-cache")
        registry.publish(name, path, labels=LABELS, input=TINY_INPUT)
        self._published.add(name)

    def photos(self, count: int) -> Path:
        """A folder of `count` (5,000 or 6,000) random 32x32 PNGs under the local root."""
        key = f"photos-{count}"
        if key not in self._folders:
            big = self.root / "photos-6000"
            if not big.exists():
                write_pngs(big, 6000, seed=1)
            if count == 6000:
                self._folders[key] = big
            else:  # hard links: the same files, regular, under the root
                folder = self.root / key
                folder.mkdir()
                for path in sorted(big.iterdir())[:count]:
                    os.link(path, folder / path.name)
                self._folders[key] = folder
        return self._folders[key]

    def stack(self, name: str, config: Config, models: tuple[str, ...] = ("tiny",)) -> Stack:
        for model in models:
            self.publish(model)
        if self.current is not None and self.current.config == config:
            self.current.ensure_running()
            return self.current
        if self.current is not None:
            self.current.close()
        self.current = Stack(self, name, config)
        self.current.start()
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()


# Checking jobs


@dataclass
class Outcome:
    """One scenario's figures and verdict."""

    name: str
    items: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    duplicates: int = 0
    lost: int = 0
    jobs: int = 0
    to_terminal_s: float = 0.0
    peak_worker_pss_mb: float | None = None
    peak_server_rss_mb: float | None = None
    resent: int = 0
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    skipped: str = ""  # why it could not run here ("": it ran)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        return "SKIP" if self.skipped else "PASS" if self.ok else "FAIL"

    def expect(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)


@dataclass
class JobCheck:
    job: perito.Job
    rows: list[dict[str, Any]]
    duplicates: int
    lost: int
    resent: int


def _poll(client: perito.Client, job_id: str) -> perito.Job | None:
    """The job now, or None while the server or its Redis is down."""
    try:
        return client.get_job(job_id, timeout=5)
    except perito.PeritoError:
        return None


def wait_done(client: perito.Client, job_id: str, at_least: int, timeout: float) -> perito.Job:
    """Poll until `at_least` items are done or the job is terminal."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        job = _poll(client, job_id)
        if job is not None:
            last = job
            if job.done >= at_least or job.terminal:
                return job
        time.sleep(0.05)
    seen = f"{last.state.value} {last.done}/{last.total}" if last else "unreachable"
    raise Failure(f"job {job_id}: {seen} after {timeout:.0f}s, waiting for {at_least} done")


def wait_terminal(
    client: perito.Client,
    job_ids: list[str],
    timeout: float,
    on_terminal: Callable[[perito.Job], object] | None = None,
) -> list[perito.Job]:
    """Poll until every job is terminal; `on_terminal(job)` runs as each is first seen so
    (before a short retention deletes it)."""
    deadline = time.monotonic() + timeout
    final: dict[str, perito.Job] = {}
    last: dict[str, perito.Job] = {}
    while len(final) < len(job_ids):
        for job_id in job_ids:
            if job_id in final:
                continue
            job = _poll(client, job_id)
            if job is not None:
                last[job_id] = job
                if job.terminal:
                    final[job_id] = job
                    if on_terminal is not None:
                        on_terminal(job)
        if len(final) < len(job_ids):
            if time.monotonic() > deadline:
                stuck = [
                    f"{i} {last[i].state.value} {last[i].done}/{last[i].total}"
                    if i in last
                    else f"{i} unreachable"
                    for i in job_ids
                    if i not in final
                ]
                raise Failure(f"not terminal after {timeout:.0f}s: {', '.join(stuck)}")
            time.sleep(0.2)
    return [final[i] for i in job_ids]


def duplicates_in_results(rows: list[dict[str, Any]], done: int) -> int:
    """Items recorded more than once, by a job's results file (its rows, as parsed JSON) and
    its `done` counter (succeeded + failed + cancelled): an index listed again, or more items
    counted done than distinct indices settled in the file. The larger of the two, since
    one item recorded twice may show in both."""
    indices = Counter(int(row["index"]) for row in rows)
    listed_again = sum(n - 1 for n in indices.values() if n > 1)
    settled = {int(row["index"]) for row in rows if row["state"] != "pending"}
    return max(listed_again, done - len(settled))


def check_job(
    stack: Stack, job: perito.Job, out: Outcome, *, results_file: bool = True
) -> JobCheck:
    """Check one terminal job against its counters, its results file and its recorded parts;
    add it up. Its Redis record must still be there: a job with a short retention is checked
    as soon as it ends (`wait_terminal`'s `on_terminal`). Without `results_file` (a job whose
    results could not be written), its items are counted from its parts alone."""
    key = job_key(job.id)
    record = {k.decode(): v.decode() for k, v in stack.r.hgetall(key).items()}  # type: ignore[union-attr]
    label = f"job {job.id}"
    out.expect(job.terminal, f"{label} not terminal: {job.state.value} {job.done}/{job.total}")
    out.expect(
        job.done == job.total,
        f"{label}: succeeded + failed + cancelled = {job.done} != total {job.total}",
    )
    out.expect(bool(record), f"{label}: gone from Redis before it was checked")
    # The items its closed chunks account for: each recorded part read from the job's data
    # and checked index by index, and every item of a chunk closed without one (cancelled,
    # failed whole). Exactly `total`: none counted twice, none both cancelled and succeeded.
    store = JobStore(stack.r)
    recorded = store.recorded_items(store.get(job.id)) if record else 0
    duplicates = max(0, job.done - recorded)
    out.expect(
        recorded == job.total,
        f"{label}: its recorded parts account for {recorded} items of {job.total}",
    )
    counters = tuple(int(record.get(f) or 0) for f in ("succeeded", "failed", "cancelled"))
    out.expect(
        counters == (job.succeeded, job.failed, job.cancelled),
        f"{label}: Redis counters {counters} differ from GetJob's",
    )
    rows: list[dict[str, Any]] = []
    jsonl = next((u for u in job.result_uris if u.endswith(".jsonl")), "")
    if not jsonl:
        if results_file:
            out.problems.append(f"{label}: no results.jsonl ({job.state.value}: {job.error})")
        lost = job.total - min(recorded, job.total)
    else:
        rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line]
        duplicates = max(duplicates, duplicates_in_results(rows, job.done))
        indices = {int(r["index"]) for r in rows}
        out.expect(
            all(0 <= i < job.total for i in indices), f"{label}: index out of range in results"
        )
        settled = {int(r["index"]) for r in rows if r["state"] != "pending"}
        lost = job.total - len(settled & set(range(job.total)))
        states = Counter(r["state"] for r in rows)
        tallies = (states["succeeded"], states["failed"], states["cancelled"])
        out.expect(
            tallies == (job.succeeded, job.failed, job.cancelled),
            f"{label}: results file has {tallies} (succeeded, failed, cancelled), the job "
            f"{(job.succeeded, job.failed, job.cancelled)}",
        )
    out.expect(duplicates == 0, f"{label}: {duplicates} items recorded twice")
    out.expect(lost == 0, f"{label}: {lost} items lost")
    resent = int(record.get("resent") or 0)
    out.items += job.total
    out.succeeded += job.succeeded
    out.failed += job.failed
    out.cancelled += job.cancelled
    out.duplicates += duplicates
    out.lost += lost
    out.jobs += 1
    out.resent += resent
    if job.created and job.finished:
        seconds = (job.finished - job.created).total_seconds()
        out.to_terminal_s = max(out.to_terminal_s, seconds)
    return JobCheck(job, rows, duplicates, lost, resent)


def expect_all_succeeded(
    stack: Stack, client: perito.Client, job_id: str, total: int, out: Outcome
) -> None:
    """Wait (up to 300 s) for job `job_id` to end, check it and the store, and expect all
    `total` items succeeded."""
    [job] = wait_terminal(client, [job_id], timeout=300)
    check_job(stack, job, out)
    out.expect(
        job.state is perito.JobState.SUCCEEDED and job.succeeded == total,
        f"expected {total} succeeded, got {job.state.value} {job.succeeded}/{job.total}: "
        f"{job.error}",
    )
    check_store(stack, out)


def check_store(stack: Stack, out: Outcome) -> None:
    """No job in the store may be left non-terminal."""
    active = stack.active_jobs()
    out.expect(active == 0, f"{active} job(s) in the store not terminal")


# Scenarios


DEFAULT = Config()


def submit_on_main(
    lab: Lab, sampler: Sampler, photos: int, *, chunk_size: int
) -> tuple[Stack, perito.Client, perito.JobHandle]:
    """The shared stack, its memory sampler reset, and a job over `photos` generated photos
    submitted to the `tiny` model in chunks of `chunk_size`."""
    stack = lab.stack("main", DEFAULT)
    sampler.reset(stack)
    client = stack.client()
    handle = client.submit_job(str(lab.photos(photos)), model="tiny", chunk_size=chunk_size)
    return stack, client, handle


def scenario_kill_worker(lab: Lab, out: Outcome, sampler: Sampler) -> None:
    stack, client, handle = submit_on_main(lab, sampler, 5000, chunk_size=100)
    total = handle.last.total
    out.expect(total == 5000, f"the job has {total} items, not 5000")
    killed_at = []
    for threshold in (1050, 2250, 3450):  # aiming mid-chunk: part recorded, the rest redone
        job = wait_done(client, handle.id, threshold, timeout=120)
        if job.terminal:
            raise Failure(f"the job ended before kill {len(killed_at) + 1}: nothing was tested")
        stack.workers[0].kill9()
        killed_at.append(_done(stack, handle.id))
        stack.workers[0].start()
    expect_all_succeeded(stack, client, handle.id, 5000, out)
    mid_chunk = sum(1 for done in killed_at if done % 100)
    out.notes.append(
        f"worker killed (SIGKILL, process group) and restarted 3 times, at {killed_at} items "
        f"done ({mid_chunk} of the 3 in the middle of a chunk)"
    )
    out.figures.update(killed_at_done=killed_at, mid_chunk_kills=mid_chunk)


def _done(stack: Stack, job_id: str) -> int:
    """succeeded + failed + cancelled, read from Redis now."""
    values = stack.r.hmget(job_key(job_id), ["succeeded", "failed", "cancelled"])
    return sum(int(v or 0) for v in values)  # type: ignore[union-attr]


def scenario_cancel_running(lab: Lab, out: Outcome, sampler: Sampler) -> None:
    stack, client, handle = submit_on_main(lab, sampler, 5000, chunk_size=100)
    job = wait_done(client, handle.id, 1500, timeout=120)
    if job.terminal:
        raise Failure("the job ended before the cancel: nothing was tested")
    cancelled = client.cancel_job(handle.id)  # a chunk is running: it stops at its next batch
    out.expect(
        cancelled.state is perito.JobState.CANCELLED,
        f"cancel answered {cancelled.state.value} {cancelled.done}/{cancelled.total}",
    )
    time.sleep(3)  # the running chunk's late batches, redeliveries, the watchdog's sweeps
    [job] = wait_terminal(client, [handle.id], timeout=30)
    check_job(stack, job, out)
    counts = (job.succeeded, job.failed, job.cancelled)
    at_cancel = (cancelled.succeeded, cancelled.failed, cancelled.cancelled)
    out.expect(counts == at_cancel, f"counters moved after the cancel: {at_cancel} -> {counts}")
    out.expect(job.cancelled > 0, "nothing was cancelled")
    check_store(stack, out)
    out.notes.append(
        f"cancelled while a chunk ran: {job.succeeded} succeeded + {job.cancelled} cancelled "
        f"= {job.total}; counters unchanged 3 s later"
    )


def scenario_kill_redis(lab: Lab, out: Outcome, sampler: Sampler) -> None:
    stack, client, handle = submit_on_main(lab, sampler, 6000, chunk_size=64)
    job = wait_done(client, handle.id, 1500, timeout=120)
    if job.terminal:
        raise Failure("the job ended before Redis was killed: nothing was tested")
    before = int(stack.r.hget(job_key(handle.id), "succeeded") or 0)  # type: ignore[arg-type]
    stack.redis.kill9()
    killed = time.monotonic()
    time.sleep(5)
    stack.redis.start()  # same port, same --dir: replays the append-only file
    down = time.monotonic() - killed
    after = int(stack.r.hget(job_key(handle.id), "succeeded") or 0)  # type: ignore[arg-type]
    expect_all_succeeded(stack, client, handle.id, 6000, out)
    out.notes.append(
        f"Redis SIGKILLed at {before} succeeded, restarted {down:.1f}s later from its "
        f"append-only file with {after} ({max(0, before - after)} recorded results lost)"
    )
    out.figures.update(redis_down_s=round(down, 2), succeeded_before=before, after=after)


def scenario_kill_server(lab: Lab, out: Outcome, sampler: Sampler) -> None:
    stack = lab.stack("main", DEFAULT)
    sampler.reset(stack)
    files = sorted(lab.photos(6000).iterdir())
    calls, per_job = 30, 100
    sources = [[str(p) for p in files[i * per_job : (i + 1) * per_job]] for i in range(calls)]
    request_ids = [str(uuid.uuid4()) for _ in range(calls)]
    with stack.client() as client:  # warm: the model's versions read once
        [warm] = wait_terminal(
            client, [client.submit_job(sources[0][:4], model="tiny").id], timeout=60
        )
    before = stack.job_ids()

    first: dict[int, str] = {}
    lost: dict[int, str] = {}

    with stack.client(timeout=10, max_retries=0) as burst:

        def submit(i: int) -> None:
            time.sleep(i * 0.03)
            try:
                first[i] = burst.submit_job(
                    sources[i], model="tiny", chunk_size=50, request_id=request_ids[i]
                ).id
            except perito.PeritoError as exc:
                lost[i] = f"{type(exc).__name__}: {exc.message[:60]}"

        with ThreadPoolExecutor(calls) as pool:
            futures = [pool.submit(submit, i) for i in range(calls)]
            time.sleep(0.35)
            stack.server.kill9()
            for future in futures:
                future.result()
    # Lost calls that got as far as claiming their request id, and those whose job was recorded.
    claimed = {i for i in lost if _request_job(stack, request_ids[i])}
    made = {i for i in claimed if stack.r.exists(job_key(_request_job(stack, request_ids[i])))}
    stack.server.start()

    with stack.client(timeout=30, max_retries=5) as client:
        retried = {
            i: client.submit_job(
                sources[i], model="tiny", chunk_size=50, request_id=request_ids[i]
            ).id
            for i in sorted(lost)
        }
        again = {
            i: client.submit_job(
                sources[i], model="tiny", chunk_size=50, request_id=request_ids[i]
            ).id
            for i in range(calls)
        }
        for i in range(calls):
            earlier = first.get(i) or retried.get(i)
            out.expect(
                earlier == again[i],
                f"request {i}: job {earlier} first, {again[i]} on the retry: not idempotent",
            )
            recorded = _request_job(stack, request_ids[i])
            out.expect(recorded == again[i], f"request {i}: the request id maps to {recorded}")
        out.expect(
            len(set(again.values())) == calls,
            f"{calls} request ids made {len(set(again.values()))} distinct jobs",
        )
        jobs = wait_terminal(client, [again[i] for i in range(calls)], timeout=240)
        # Once they ran: a job whose submission died between its record and the job list is
        # listed by then (by the watchdog's sweep, or when it ends).
        new = stack.job_ids() - before
        out.expect(
            new == set(again.values()),
            f"{len(new)} jobs in the store for {calls} request ids "
            f"({len(new - set(again.values()))} not reachable by any id)",
        )
    for job in jobs:
        check_job(stack, job, out)
        out.expect(
            job.state is perito.JobState.SUCCEEDED and job.succeeded == per_job,
            f"job {job.id}: {job.state.value} {job.succeeded}/{job.total}",
        )
    warm_up = Outcome("warm-up")  # checked like the others, not counted in the figures
    check_job(stack, warm, warm_up)
    out.problems += warm_up.problems
    check_store(stack, out)
    out.expect(bool(lost), f"all {calls} calls answered before the kill: nothing was tested")
    out.notes.append(
        f"server SIGKILLed mid-burst: {len(first)} of {calls} SubmitJob answered, {len(lost)} "
        f"lost ({len(claimed)} had claimed their request id, {len(made)} of them with the job "
        f"recorded; {len(lost) - len(claimed)} left no trace); {len(lost)} retried, then "
        f"all {calls} again: {len(set(again.values()))} jobs, one per request id"
    )
    out.figures.update(
        answered=len(first),
        lost=len(lost),
        claimed_request_id=len(claimed),
        recorded_before_kill=len(made),
        errors=sorted(set(lost.values())),
    )


def _request_job(stack: Stack, request_id: str) -> str:
    """The job id a request id is recorded with in Redis ('' if none). The stacks run without
    auth, so the id is the anonymous tenant's (request ids are scoped per tenant)."""
    value = stack.r.get(request_key(request_id, ANONYMOUS_TENANT))
    return value.decode() if isinstance(value, bytes) else ""


FAULTS = Config(worker_env=(("PERITO_MAX_ATTEMPTS", "2"),))


def scenario_chunk_error(lab: Lab, out: Outcome, sampler: Sampler) -> None:
    stack = lab.stack("faults", FAULTS, models=("tiny", "boom"))
    sampler.reset(stack)
    client = stack.client()
    started = time.monotonic()
    # 1. One image breaks the model's forward pass: its batch is rerun one image at a time,
    # and that image alone fails, saying where the worker's log has the model's words (which
    # may quote the model's code or the server's files: never the job owner's to read).
    folder = lab.root / "boom"
    total, chunk, white = 48, 16, 21
    paths = write_pngs(folder, total, seed=3)
    paths[white].write_bytes(_png(np.full((32, 32, 3), 255, dtype=np.uint8)))
    handle = client.submit_job(str(folder), model="boom", chunk_size=chunk)
    [job] = wait_terminal(client, [handle.id], timeout=120)
    check = check_job(stack, job, out)
    failed = {int(r["index"]): r["error"] or "" for r in check.rows if r["state"] == "failed"}
    out.expect(
        job.state is perito.JobState.PARTIALLY_SUCCEEDED,
        f"expected partially_succeeded, got {job.state.value}: {job.error}",
    )
    out.expect(set(failed) == {white}, f"failed items {sorted(failed)}, expected [{white}]")
    where = f"job {job.id} item {white}"
    out.expect(
        all(
            e.startswith("INTERNAL: the model failed on this image alone")
            and where in e
            and "boom" not in e
            and "\n" not in e
            for e in failed.values()
        ),
        f"failure reason is not one line saying where the log has it: "
        f"{next(iter(failed.values()), '')!r}",
    )
    logged = "".join(p.read_text(errors="replace") for p in stack.dir.glob("worker-*.log"))
    out.expect(
        any(where in line and "boom" in line for line in logged.splitlines()),
        f"no worker log line names {where} with the model's error",
    )
    out.expect(job.succeeded == total - 1, f"{job.succeeded} succeeded")
    # 2. The model fails on every image of a chunk: not the images' fault, so the attempt
    # ends (retried); after 2 attempts the chunk's items fail with the error, dead-lettered.
    every = lab.root / "boom-all"
    for n, path in enumerate(write_pngs(every, 8, seed=4)):
        path.write_bytes(_png(np.full((32, 32, 3), 255 - n % 2, dtype=np.uint8)))
    handle = client.submit_job(str(every), model="boom", chunk_size=8)
    [broken] = wait_terminal(client, [handle.id], timeout=120)
    seconds = time.monotonic() - started
    check = check_job(stack, broken, out)
    reasons = [r["error"] or "" for r in check.rows]
    out.expect(broken.state is perito.JobState.FAILED, f"got {broken.state.value}")
    out.expect(broken.failed == 8, f"{broken.failed} failed")
    out.expect(
        all("boom" in e and "dead-lettered" in e for e in reasons),
        f"failure reasons do not name the error: {reasons[0][:200]}",
    )
    letters = [json.loads(x) for x in stack.r.lrange(DEAD_LETTER_KEY, 0, -1)]  # type: ignore[union-attr]
    out.expect(
        any(x["job_id"] == broken.id and x["chunk"] == 0 for x in letters),
        "no dead-letter record for the chunk",
    )
    check_store(stack, out)
    out.notes.append(
        f"forward() raises on all-white images: item {white} of 48 failed alone "
        f"({failed.get(white, '')[:60]!r}); a chunk of 8 white images ended its attempt twice, "
        f"then failed dead-lettered; both ended in {seconds:.1f}s"
    )


def scenario_odd_files(lab: Lab, out: Outcome, sampler: Sampler) -> None:
    stack = lab.stack("faults", FAULTS, models=("tiny", "boom"))
    sampler.reset(stack)
    folder = lab.root / "odd-files"
    write_pngs(folder, 4, seed=4)
    outside = lab.work / "outside" / "secret.png"  # a real image, but out of the local root
    outside.parent.mkdir(exist_ok=True)
    outside.write_bytes(_png(np.zeros((32, 32, 3), dtype=np.uint8)))
    (folder / "outside.png").symlink_to(outside)
    (folder / "x.jpg").mkdir()
    os.mkfifo(folder / "pipe.png")
    with (folder / "sparse.png").open("wb") as sparse:  # 2 GB, no disk used
        sparse.truncate(2 * 1024**3)
    client = stack.client()
    started = time.monotonic()
    handle = client.submit_job(str(folder), model="tiny")
    [job] = wait_terminal(client, [handle.id], timeout=120)
    seconds = time.monotonic() - started
    check = check_job(stack, job, out)
    failed = {
        Path(r["uri"]).name.replace("secret.png", "outside.png"): r["error"] or ""
        for r in check.rows
        if r["state"] == "failed"
    }
    odd = {"outside.png", "x.jpg", "pipe.png", "sparse.png"}
    out.expect(
        job.state is perito.JobState.PARTIALLY_SUCCEEDED,
        f"expected partially_succeeded, got {job.state.value}: {job.error}",
    )
    out.expect(
        (job.total, job.succeeded, job.failed) == (8, 4, 4),
        f"(total, succeeded, failed) = {(job.total, job.succeeded, job.failed)}, not (8, 4, 4)",
    )
    out.expect(set(failed) == odd, f"failed: {sorted(failed)}, expected {sorted(odd)}")
    out.expect(all(failed.values()), "a failed item without a reason")
    out.expect(seconds < 20, f"took {seconds:.1f}s to end (expected within seconds)")
    check_store(stack, out)
    reasons = "; ".join(f"{n}: {e.split(':')[0]}" for n, e in sorted(failed.items()))
    out.notes.append(f"ended {job.state.value} in {seconds:.1f}s; {reasons}")
    out.figures["reasons"] = failed


def scenario_unwritable_output(lab: Lab, out: Outcome, sampler: Sampler) -> None:
    stack = lab.stack("faults", FAULTS, models=("tiny", "boom"))
    sampler.reset(stack)
    images = [str(p) for p in write_pngs(lab.root / "few", 2, seed=5)]
    a_file = lab.root / "not-a-folder"
    a_file.write_text("a regular file")
    targets = {"under a regular file": a_file / "out"}
    if os.geteuid() != 0:
        read_only = lab.root / "read-only"
        read_only.mkdir()
        read_only.chmod(0o555)
        targets["a read-only folder"] = read_only / "out"
    else:
        out.notes.append("read-only folder skipped (running as root, which may write it)")
    client = stack.client()
    before = stack.job_ids()
    refused = []
    for what, target in targets.items():
        try:
            job = client.submit_job(images, model="tiny", output_uri=str(target))
            out.problems.append(f"output {what} accepted: job {job.id}")
        except perito.FailedPreconditionError as exc:
            out.expect("output_uri" in exc.message, f"refusal does not name output_uri: {exc}")
            refused.append(f"{what}: FAILED_PRECONDITION ({exc.message[:70]}...)")
        except perito.PeritoError as exc:
            out.problems.append(f"output {what}: {type(exc).__name__}, not FailedPrecondition")
    out.expect(stack.job_ids() == before, "a refused submission left a job behind")
    check_store(stack, out)
    out.notes.append("; ".join(refused))
    out.figures["refused"] = len(refused)


def scenario_unwritable_results(lab: Lab, out: Outcome, sampler: Sampler) -> None:
    stack = lab.stack("faults", FAULTS, models=("tiny", "boom"))
    sampler.reset(stack)
    client = stack.client()
    base = lab.root / "unwritable-results"
    photos = base / "photos"
    write_pngs(photos, 24, seed=6)
    other = lab.work / "outside" / "other-tenant.jsonl"  # another tenant's file, out of the root
    other.parent.mkdir(exist_ok=True)
    other.write_text("another tenant's results\n")
    # At submission: a results file that is a symbolic link is refused there.
    linked = base / "linked-at-submission"
    linked.mkdir(parents=True)
    (linked / "results.jsonl").symlink_to(other)
    before = stack.job_ids()
    try:
        accepted = client.submit_job(str(photos), model="tiny", output_uri=str(linked))
        out.problems.append(f"a symlinked results.jsonl accepted at submission: {accepted.id}")
    except perito.FailedPreconditionError as exc:
        out.expect("output_uri" in exc.message, f"refusal does not name output_uri: {exc}")
        out.expect(str(other) not in exc.message, f"refusal names the link's target: {exc}")
    out.expect(stack.job_ids() == before, "a refused submission left a job behind")
    # Mid-job: each output folder is changed after the job was accepted, while no worker runs.
    stack.workers[0].stop()
    cases = {
        "symlink": "results could not be written: results.jsonl is a symbolic link; it is not "
        "followed",
        "file-for-folder": "results could not be written: part of the output path is a file, "
        "not a folder",
        "deleted": "",  # made again: the job succeeds
    }
    handles = {
        case: client.submit_job(
            str(photos), model="tiny", output_uri=str(base / case / "out"), chunk_size=8
        )
        for case in cases
    }
    (base / "symlink" / "out" / "results.jsonl").symlink_to(other)
    shutil.rmtree(base / "file-for-folder" / "out")
    (base / "file-for-folder" / "out").write_text("a file where the output folder was")
    shutil.rmtree(base / "deleted")
    started = time.monotonic()
    stack.workers[0].start()
    jobs = wait_terminal(client, [h.id for h in handles.values()], timeout=120)
    seconds = time.monotonic() - started
    lags = []
    for (case, reason), job in zip(cases.items(), jobs, strict=True):
        check_job(stack, job, out, results_file=not reason)
        completed = float(stack.r.hget(job_key(job.id), "completed_at") or 0)  # type: ignore[arg-type]
        lag = job.finished.timestamp() - completed if job.finished and completed else -1.0
        lags.append(lag)
        out.expect(0 <= lag < 5, f"{case}: ended {lag:.1f}s after its last item (expected < 5)")
        if reason:
            out.expect(
                job.state is perito.JobState.FAILED and job.error == reason,
                f"{case}: {job.state.value} {job.error!r}, expected failed {reason!r}",
            )
            out.expect(job.succeeded == job.total, f"{case}: {job.succeeded}/{job.total} kept")
        else:
            out.expect(
                job.state is perito.JobState.SUCCEEDED,
                f"{case}: {job.state.value} {job.error!r}, expected succeeded",
            )
    out.expect(
        other.read_text() == "another tenant's results\n", "the symlink's target was written"
    )
    out.expect(
        not (base / "symlink" / "out" / "results.csv").exists(), "results.csv written beside"
    )
    check_store(stack, out)
    out.notes.append(
        "symlinked results.jsonl at submission: FAILED_PRECONDITION; accepted, then changed "
        "before any item ran: symlinked results.jsonl and a file in the folder's place ended "
        f"failed with the reason, the folder deleted was made again and succeeded; each ended "
        f"{max(lags):.1f}s at most after its last item, all {seconds:.1f}s after the worker "
        "started; every item kept its result"
    )
    out.figures["seconds_after_last_item"] = dict(zip(cases, lags, strict=True))


OVERLOAD = Config(workers=0, server_env=(("PERITO_MAX_QUEUE_SIZE", "16"),), preload="tiny")


def _photo_jpegs(count: int) -> list[bytes]:
    rng = np.random.default_rng(6)
    y, x = np.mgrid[0:240, 0:320]
    images = []
    for _ in range(count):
        base = (x * rng.uniform(0.2, 0.8) + y * rng.uniform(0.2, 0.8)) % 256
        pixels = np.stack([base, np.roll(base, 40, 1), 255 - base], -1)
        pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


@dataclass
class _Burst:
    attempts: int = 0
    answered: int = 0
    short_answers: int = 0
    hints: list[float] = field(default_factory=list)
    without_hint: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    unfinished_callers: int = 0


async def _classify_burst(
    target: str, images: list[bytes], callers: int, calls_each: int, seconds: float
) -> _Burst:
    burst = _Burst()
    clients = [perito.AsyncClient(target, timeout=30, max_retries=0) for _ in range(8)]
    deadline = time.monotonic() + seconds

    async def caller(n: int) -> None:
        client = clients[n % len(clients)]
        answered = 0
        while answered < calls_each:
            if time.monotonic() > deadline:
                burst.unfinished_callers += 1
                return
            burst.attempts += 1
            try:
                results = await client.classify(images, model="tiny", timeout=30)
            except perito.ResourceExhaustedError as exc:
                if exc.retry_after is None or exc.retry_after <= 0:
                    burst.without_hint += 1
                    await asyncio.sleep(0.05)
                else:
                    burst.hints.append(exc.retry_after)
                    await asyncio.sleep(exc.retry_after)
                continue
            except perito.PeritoError as exc:
                burst.errors[f"{type(exc).__name__}: {exc.message[:80]}"] += 1
                await asyncio.sleep(0.05)
                continue
            answered += 1
            burst.answered += 1
            if len(results) != len(images):
                burst.short_answers += 1

    try:
        await asyncio.gather(*(caller(n) for n in range(callers)))
    finally:
        for client in clients:
            await client.close()
    return burst


def scenario_overload(lab: Lab, out: Outcome, sampler: Sampler) -> None:
    stack = lab.stack("overload", OVERLOAD)
    sampler.reset(stack)
    images = _photo_jpegs(4)
    callers, calls_each = 160, 4
    with stack.client() as client:  # warm
        client.classify(images, model="tiny")
    baseline, _ = stack.rss()

    health = {"checks": 0, "serving": 0, "failures": Counter(), "latencies": []}
    stop = threading.Event()

    def probe() -> None:
        with grpc.insecure_channel(stack.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
            while not stop.is_set():
                started = time.monotonic()
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        health["serving"] += 1
                    else:
                        health["failures"][f"status {status.status}"] += 1
                except grpc.RpcError as exc:
                    health["failures"][exc.code().name] += 1  # type: ignore[attr-defined]
                health["checks"] += 1
                health["latencies"].append(time.monotonic() - started)
                stop.wait(0.1)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    started = time.monotonic()
    try:
        burst = asyncio.run(_classify_burst(stack.target, images, callers, calls_each, 120))
    finally:
        stop.set()
        prober.join(5)
    seconds = time.monotonic() - started
    sampler.sample()
    peak = sampler.peak_server
    if peak is None:
        raise Failure(sampler.error or "no memory sample of the server was taken")
    rejected = len(burst.hints) + burst.without_hint
    out.items = burst.attempts
    out.succeeded = burst.answered
    out.failed = rejected + sum(burst.errors.values())
    out.to_terminal_s = seconds
    out.expect(rejected > 0, "no call was refused: the server was not overloaded")
    out.expect(burst.without_hint == 0, f"{burst.without_hint} refusals without a retry hint")
    out.expect(not burst.errors, f"calls failed otherwise: {dict(burst.errors)}")
    out.expect(burst.short_answers == 0, f"{burst.short_answers} answers missing results")
    out.expect(
        burst.answered == callers * calls_each and burst.unfinished_callers == 0,
        f"{burst.answered} of {callers * calls_each} calls answered in 120s",
    )
    out.expect(
        health["checks"] > 0 and health["serving"] == health["checks"],
        f"health: {health['serving']} SERVING of {health['checks']}: {dict(health['failures'])}",
    )
    out.expect(peak - baseline < 300, f"server RSS grew {peak - baseline:.0f} MB under overload")
    check_store(stack, out)
    hints = sorted(burst.hints)
    worst = max(health["latencies"], default=0.0)
    out.notes.append(
        "items here are Classify calls: succeeded = answered, failed = refused with "
        "RESOURCE_EXHAUSTED; to terminal = the burst's length"
    )
    out.notes.append(
        f"{callers} callers x {calls_each} calls of {len(images)} images, queue 16 images: "
        f"{burst.attempts} calls, {burst.answered} answered, {rejected} RESOURCE_EXHAUSTED "
        f"(retry_after {hints[0]:.3f}-{hints[-1]:.3f}s, median {statistics.median(hints):.3f}s)"
        if hints
        else f"{burst.attempts} calls, {burst.answered} answered, none refused"
    )
    out.notes.append(
        f"health {health['serving']}/{health['checks']} SERVING (slowest {worst * 1000:.0f} ms); "
        f"server RSS {baseline:.0f} MB before, peak {peak:.0f} MB"
    )
    out.figures.update(
        attempts=burst.attempts,
        answered=burst.answered,
        rejected=rejected,
        retry_after_median=statistics.median(hints) if hints else None,
        health_checks=health["checks"],
        health_serving=health["serving"],
        health_slowest_ms=round(worst * 1000, 1),
        server_rss_before_mb=round(baseline, 1),
    )


RETENTION = Config(server_env=(("PERITO_JOB_RETENTION", "5"),))


def _redis_memory(stack: Stack) -> tuple[int, set[str]]:
    """(used_memory in bytes, the median of 3 readings; every key's name)."""
    readings = []
    for _ in range(3):
        readings.append(int(stack.r.info("memory")["used_memory"]))  # type: ignore[index]
        time.sleep(0.1)
    keys = {k.decode() for k in stack.r.scan_iter(count=1000)}
    return int(statistics.median(readings)), keys


def _wait_expired(stack: Stack, timeout: float) -> float:
    started = time.monotonic()
    while any(True for _ in stack.r.scan_iter(job_keys_pattern(), count=1000)):
        if time.monotonic() - started > timeout:
            raise Failure(f"job keys still in Redis {timeout:.0f}s after the jobs ended")
        time.sleep(0.2)
    return time.monotonic() - started


def scenario_retention(lab: Lab, out: Outcome, sampler: Sampler) -> None:
    stack = lab.stack("retention", RETENTION)
    sampler.reset(stack)
    files = sorted(lab.photos(6000).iterdir())
    inline = [p.read_bytes() for p in files[:40]]
    client = stack.client()
    # Warm-up: the first job loads Redis's scripts and the broker's bindings; it expires too.
    [warm] = wait_terminal(client, [client.submit_job(inline[:5], model="tiny").id], 60)
    _wait_expired(stack, 30)
    base_memory, base_keys = _redis_memory(stack)

    handles = [
        client.submit_job([str(p) for p in files[:1000]], model="tiny", chunk_size=100),
        client.submit_job([str(p) for p in files[1000:2000]], model="tiny", chunk_size=100),
        client.submit_job(inline, model="tiny"),
        client.submit_job(inline, model="tiny"),
    ]
    # Each job is checked (Redis included) as it ends, within its 5 s retention.
    jobs = wait_terminal(
        client, [h.id for h in handles], timeout=180, on_terminal=lambda j: check_job(stack, j, out)
    )
    ended = time.monotonic()
    peak_memory, peak_keys = _redis_memory(stack)
    for job in jobs:
        out.expect(job.state is perito.JobState.SUCCEEDED, f"job {job.id}: {job.state.value}")
    for handle in handles[2:]:
        out.expect(
            not stack.r.exists(job_key(handle.id, "inline")),
            f"job {handle.id}: inline images kept after the job ended",
        )
    _wait_expired(stack, 30)
    expired_after = time.monotonic() - ended
    after_memory, after_keys = _redis_memory(stack)
    for handle in handles:
        try:
            client.get_job(handle.id)
            out.problems.append(f"job {handle.id} still readable after its retention")
        except perito.NotFoundError:
            pass
    # Request ids stay 24 h (AIP-155) by design: 4 small strings. Nothing else may remain.
    extra = after_keys - base_keys
    requests = {k for k in extra if k.startswith("perito:request:")}
    job_keys = {k for k in peak_keys if fnmatch.fnmatchcase(k, job_keys_pattern())}
    growth = after_memory - base_memory
    out.expect(not extra - requests, f"keys left after retention: {sorted(extra - requests)}")
    out.expect(
        growth <= 128 * 1024,
        f"Redis used_memory {after_memory / 1024:.0f} KB after expiry, baseline "
        f"{base_memory / 1024:.0f} KB (+{growth / 1024:.0f} KB)",
    )
    check_store(stack, out)
    out.notes.append(
        f"retention 5 s: Redis used_memory {base_memory / 1024:.0f} KB baseline, "
        f"{peak_memory / 1024:.0f} KB with {len(jobs)} jobs done ({len(job_keys)} job keys), "
        f"{after_memory / 1024:.0f} KB ({growth / 1024:+.1f} KB) {expired_after:.1f}s after "
        f"they ended; keys {len(base_keys)} -> {len(peak_keys)} -> {len(after_keys)} (the "
        f"{len(requests)} new ones request ids, kept 24 h by design)"
    )
    out.figures.update(
        used_memory_baseline=base_memory,
        used_memory_peak=peak_memory,
        used_memory_after=after_memory,
        job_keys_peak=len(job_keys),
        keys_left=sorted(extra),
        expired_after_s=round(expired_after, 1),
        warm_up_job=warm.id,
    )


# Celery's log line for each message a worker takes.
DELIVERY = re.compile(rb"Task perito\.classify_chunk\[[0-9a-f-]+\] received")

SLOW = Config(
    workers=2,
    worker_env=(("PERITO_VISIBILITY_TIMEOUT_S", "10"), ("PERITO_BATCH_SIZE", "1")),
    server_env=(("PERITO_VISIBILITY_TIMEOUT_S", "10"),),
)


def scenario_slow_chunk(lab: Lab, out: Outcome, sampler: Sampler) -> None:
    stack = lab.stack("slow", SLOW, models=("slow",))
    sampler.reset(stack)
    items = 24
    images = [str(p) for p in write_pngs(lab.root / "slow", items, seed=7)]
    marks = [len(w.output()) for w in stack.workers]
    client = stack.client()
    handle = client.submit_job(images, model="slow", chunk_size=items)
    [job] = wait_terminal(client, [handle.id], timeout=240)
    check_job(stack, job, out)
    received = sum(
        len(DELIVERY.findall(w.output()[mark:]))
        for w, mark in zip(stack.workers, marks, strict=True)
    )
    running = (job.finished - job.started).total_seconds() if job.finished and job.started else 0
    redelivered = received - 1 - out.resent
    out.expect(
        job.state is perito.JobState.SUCCEEDED and job.succeeded == items,
        f"expected {items} succeeded, got {job.state.value} {job.succeeded}/{job.total}",
    )
    out.expect(running > 10, f"the chunk ran {running:.1f}s, not past the 10 s visibility timeout")
    out.expect(redelivered >= 1, "the broker never redelivered the running chunk")
    check_store(stack, out)
    out.notes.append(
        f"one chunk of {items} ran {running:.1f}s against a 10 s visibility timeout; delivered "
        f"{received} times ({redelivered} broker redelivery, {out.resent} watchdog resends), "
        "later deliveries skipped under the live lease"
    )
    out.figures.update(chunk_seconds=round(running, 1), deliveries=received)


# Scenarios in modules of their own import this one's parts: as a script, this module is
# `__main__`, so it is also registered as `bench.faults` (one copy of its classes), and they
# are imported once those parts are defined.
sys.modules.setdefault("bench.faults", sys.modules[__name__])
from bench.fault_netns import scenario_cut_off_host  # noqa: E402
from bench.fault_sentinel import scenario_sentinel_failover  # noqa: E402

SCENARIOS: dict[str, Callable[[Lab, Outcome, Sampler], None]] = {
    "kill-worker": scenario_kill_worker,
    "kill-redis": scenario_kill_redis,
    "kill-server": scenario_kill_server,
    "cancel-running": scenario_cancel_running,
    "chunk-error": scenario_chunk_error,
    "odd-files": scenario_odd_files,
    "unwritable-output": scenario_unwritable_output,
    "unwritable-results": scenario_unwritable_results,
    "overload": scenario_overload,
    "retention": scenario_retention,
    "slow-chunk": scenario_slow_chunk,
    "cut-off-host": scenario_cut_off_host,
    "sentinel-failover": scenario_sentinel_failover,
}
# Peak worker RSS is reported where workers do the work; server RSS where the server does.
WORKER_RSS = {
    "kill-worker",
    "kill-redis",
    "kill-server",
    "cancel-running",
    "chunk-error",
    "odd-files",
    "slow-chunk",
}
SERVER_RSS = {"kill-server", "overload", "retention", "kill-redis"}


# Reporting


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def line(out: Outcome) -> str:
    return (
        f"{out.name:<18} items {out.items:>5}  succeeded/failed/cancelled "
        f"{out.succeeded}/{out.failed}/{out.cancelled}  duplicates {out.duplicates}  lost "
        f"{out.lost}  to terminal {out.to_terminal_s:.1f}s  peak worker PSS "
        f"{_mb(out.peak_worker_pss_mb)} MB, server RSS {_mb(out.peak_server_rss_mb)} MB  resent "
        f"{out.resent}  [{out.wall_s:.0f}s]  {out.verdict}"
    )


def table(outcomes: list[Outcome]) -> str:
    rows = [
        "| scenario | items | succeeded | failed | cancelled | duplicates | lost | to terminal "
        "(s) | peak worker PSS (MB) | peak server RSS (MB) | resent | result | what happened |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for out in outcomes:
        notes = "; ".join(out.notes + out.problems).replace("|", "/")
        rows.append(
            f"| {out.name} | {out.items} | {out.succeeded} | {out.failed} | {out.cancelled} | "
            f"{out.duplicates} | {out.lost} | {out.to_terminal_s:.1f} | "
            f"{_mb(out.peak_worker_pss_mb)} | {_mb(out.peak_server_rss_mb)} | {out.resent} | "
            f"{out.verdict} | {notes} |"
        )
    return "\n".join(rows)


@contextlib.contextmanager
def work_folder(keep: Path | None) -> Iterator[tuple[Path, list[bool]]]:
    """A work folder, removed afterwards unless asked to keep it or something failed."""
    path = keep or Path(tempfile.mkdtemp(prefix="perito-faults-"))
    path.mkdir(parents=True, exist_ok=True)
    failed = [False]
    try:
        yield path, failed
    finally:
        if keep is None and not failed[0]:
            shutil.rmtree(path, ignore_errors=True)
        else:
            print(f"\nlogs and files kept in {path} (stacks/*/ has each process's log)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SCENARIOS),
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--workdir", type=Path, help="keep processes' logs and files here")
    args = parser.parse_args()
    selected = [name for name in SCENARIOS if not args.only or name in args.only]

    print(f"# fault suite: {cpu_model()}, {os.cpu_count()} cores; redis-server AOF everysec")
    print(f"# scenarios: {', '.join(selected)}", flush=True)
    outcomes: list[Outcome] = []
    suite_started = time.monotonic()
    with work_folder(args.workdir) as (work, failed):
        lab = Lab(work)
        sampler = Sampler()
        try:
            for name in selected:
                out = Outcome(name)
                started = time.monotonic()
                try:
                    SCENARIOS[name](lab, out, sampler)
                except (Failure, ProcessFailed) as exc:
                    out.problems.append(str(exc))
                except Skipped as exc:
                    out.skipped = str(exc)
                    out.notes.append(f"skipped: {exc}")
                except Exception as exc:  # noqa: BLE001 - reported as that scenario's failure
                    traceback.print_exc()
                    out.problems.append(f"crashed: {type(exc).__name__}: {exc}")
                out.wall_s = time.monotonic() - started
                if name in WORKER_RSS:
                    out.peak_worker_pss_mb = sampler.peak_workers
                if name in SERVER_RSS:
                    out.peak_server_rss_mb = sampler.peak_server
                if sampler.error and (name in WORKER_RSS or name in SERVER_RSS):
                    out.problems.append(sampler.error)
                outcomes.append(out)
                print(line(out), flush=True)
                for note in out.notes:
                    print(f"    {note}")
                for problem in out.problems:
                    print(f"    PROBLEM: {problem}")
                sys.stdout.flush()
        finally:
            sampler.close()
            lab.close()
        failed[0] = not all(o.ok for o in outcomes)

    total = time.monotonic() - suite_started
    print()
    print(table(outcomes))
    bad = [o.name for o in outcomes if not o.ok]
    skipped = [o.name for o in outcomes if o.skipped]
    print(
        f"\n{len(outcomes) - len(bad) - len(skipped)} of {len(outcomes)} scenarios passed in "
        f"{total:.0f}s; lost {sum(o.lost for o in outcomes)}, duplicated "
        f"{sum(o.duplicates for o in outcomes)}"
        + (f"; SKIPPED: {', '.join(skipped)}" if skipped else "")
        + (f"; FAILED: {', '.join(bad)}" if bad else "")
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "seconds": round(total, 1),
            "scenarios": [{**asdict(o), "ok": o.ok} for o in outcomes],
        }
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
