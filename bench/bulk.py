"""Benchmark bulk jobs: one worker against the raw in-process pipeline, and fairness.

In one run on one machine:

- raw: the raw overlapped pipeline of the form the worker serves (decode + resize the same
  640x480 JPEGs on two threads while the previous batch's forward pass runs, in this process,
  at the batch size this process measures fastest: `bench.classify.raw_overlapped`). The model
  is published with its compiled forms through the real gate (`--precision torchscript`:
  none); the worker picks its form (`PERITO_PRECISION`, default `auto`: the fastest verified
  form, timed at load) and batch size (`PERITO_BATCH_SIZE`, default `auto`), and this process
  loads the form the worker's log names;
- job: `perito worker` (one process) classifying a job of those images, read from a local
  folder, after a small warm-up job has loaded the model; images/s from the job's start to its
  end, and from submission to the results files being written;
- fairness: `Classify` latency at concurrency 1, first idle, then while a 10,000-image job is
  in flight on the same machine, with the job's own images/s over the same seconds (claims
  first, bulk second: the worker computes in SCHED_IDLE and starts no forward pass while the
  server has a call in hand, `perito_core.scheduling`; `--worker-env
  PERITO_YIELD_MAX_WAIT_S=0` turns the latter off).

Targets: job throughput >= 0.9x the raw overlapped pipeline of the form the worker serves;
`Classify` under bulk load: p50 within 1.5x of idle, p99 within 3x. Exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import perito  # noqa: E402
from bench.classify import (  # noqa: E402
    MODEL,
    bench_grpc,
    machine_line,
    make_jpegs,
    publish,
    raw_overlapped,
)
from bench.targets import report  # noqa: E402
from perito_core.models.batching import profile_batch_sizes  # noqa: E402
from perito_core.models.engines.base import LoadedModel  # noqa: E402
from perito_core.models.manifest import MIN_AGREEMENT  # noqa: E402
from perito_core.models.registry import ModelRegistry  # noqa: E402
from perito_core.models.selection import load_form, load_model  # noqa: E402
from tests.processes import Proc, free_port, redis_proc  # noqa: E402

BIN = Path(sys.executable).parent


def raw_model(registry: ModelRegistry, form: str) -> LoadedModel:
    """`form` of MODEL version 1, loaded in this process and warmed at 1, 2, 4 and 8."""
    manifest = registry.manifest(MODEL, "1")
    compiled = manifest.form(form)
    if compiled is None:  # the reference, model.pt
        return load_model(
            registry, MODEL, "1", precision="torchscript", warmup_batch_sizes=(1, 2, 4, 8)
        )
    model = load_form(registry, manifest, compiled)
    model.warm((1, 2, 4, 8))
    return model


def served_form(log: Path) -> tuple[str, int]:
    """The form and batch size the worker's log says it loaded (`loaded NAME@V in Ns, form F,
    batch size B`); ("unknown", 0) when it says none."""
    text = log.read_text(errors="replace")
    found = re.findall(r"loaded \S+ in [\d.]+s, form (\S+), batch size (\d+)", text)
    return (found[-1][0], int(found[-1][1])) if found else ("unknown", 0)


def stack_env(work: Path, redis_port: int, precision: str, batch: str) -> dict[str, str]:
    """The environment of the bench's worker and server: the registry, cache, Redis, local
    root and results under `work`, `PERITO_PRECISION` and `PERITO_BATCH_SIZE`."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PERITO_REGISTRY": str(work / "registry"),
        "PERITO_CACHE_DIR": str(work / "cache"),
        "PERITO_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "PERITO_LOCAL_ROOTS": json.dumps([str(work)]),
        "PERITO_RESULTS_URI": str(work / "results"),
        "PERITO_PRECISION": precision,
        "PERITO_BATCH_SIZE": batch,
    }


def start_stack(
    work: Path, env: dict[str, str], worker_env: dict[str, str], redis_port: int, port: int
) -> list[Proc]:
    """redis-server, one `perito worker` (`worker_env`) and `perito serve` on `port`
    (preloading MODEL), started in that order; logs under `work`. Stop them in reverse."""
    return [
        redis_proc(redis_port, work / "redis.log", env).start(),
        Proc(
            "perito worker",
            [str(BIN / "perito"), "worker"],
            worker_env,
            work / "worker.log",
            "ready.",
        ).start(),
        Proc(
            "perito serve",
            [
                str(BIN / "perito"),
                "serve",
                "--port",
                str(port),
                "--preload",
                MODEL,
                "--log-level",
                "WARNING",
            ],
            env,
            work / "serve.log",
            "serving on",
        ).start(),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000, help="images in the measured job")
    parser.add_argument("--seconds", type=float, default=8.0, help="per raw / latency measurement")
    parser.add_argument("--fairness-items", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3, help="job runs; the median is reported")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--precision",
        default="auto",
        help="the worker's and the raw pipeline's PERITO_PRECISION (torchscript: no forms built)",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a worker setting to try, e.g. PERITO_YIELD_MAX_WAIT_S=0 (claims first off)",
    )
    parser.add_argument(
        "--batch",
        default="auto",
        help="the worker's PERITO_BATCH_SIZE (auto: each measures its own, up to 8)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="perito-bulk-bench-") as tmp:
        work = Path(tmp)
        jpegs = make_jpegs(work, args.images)
        photos = work / "job"
        photos.mkdir()
        for index, data in enumerate(jpegs):
            (photos / f"{index:05d}.jpg").write_bytes(data)
        forms = () if args.precision == "torchscript" else ("fp32", "int8")
        registry = publish("efficientnet-lite0", work, forms, min_agreement=MIN_AGREEMENT)

        redis_port, port = free_port(), free_port()
        env = stack_env(work, redis_port, args.precision, args.batch)
        worker_env = {**env, **dict(kv.split("=", 1) for kv in args.worker_env)}
        processes = start_stack(work, env, worker_env, redis_port, port)
        try:
            with perito.Client(f"127.0.0.1:{port}", timeout=600) as client:
                client.submit_job(
                    [str(p) for p in sorted(photos.iterdir())[:20]], model=MODEL
                ).wait()
                # The raw pipeline runs the form the worker loaded (auto picks between forms of
                # like speed by timing them, which need not pick the same twice), at the batch
                # size its own measurement picks.
                worker_form, worker_batch = served_form(work / "worker.log")
                model = raw_model(registry, worker_form)
                fixed = None if args.batch == "auto" else int(args.batch)
                profile = profile_batch_sizes(model, fixed or 8, fixed, tolerance=0.0)
                batch = profile.preferred_batch_size
                # The machine is noisy (10% from one minute to the next): each job run is paired
                # with a raw measurement just before it, and the ratios' median is reported.
                raws, steadies, walls = [], [], []
                for _ in range(args.repeats):
                    raws.append(raw_overlapped(model, jpegs, batch, args.seconds))
                    submitted = time.monotonic()
                    job = client.submit_job(photos, model=MODEL).wait()
                    walls.append(args.images / (time.monotonic() - submitted))
                    assert job.succeeded == args.images, job
                    span = (job.finished - job.started).total_seconds()  # type: ignore[operator]
                    steadies.append(args.images / span)
                del model
                raw = float(np.median(raws))
                ratio = float(np.median([j / r for j, r in zip(steadies, raws, strict=True)]))
                steady, end_to_end = float(np.median(steadies)), float(np.median(walls))

                idle = asyncio.run(bench_grpc(f"127.0.0.1:{port}", jpegs[:48], 1, args.seconds))
                manifest = work / "big.csv"
                files = sorted(photos.iterdir())
                manifest.write_text(
                    "".join(f"{files[i % len(files)]},{i}\n" for i in range(args.fairness_items))
                )
                big = client.submit_job(manifest, model=MODEL, chunk_size=64)
                while big.status().done < 50:
                    time.sleep(0.1)
                before, started = big.status().done, time.monotonic()
                busy = asyncio.run(bench_grpc(f"127.0.0.1:{port}", jpegs[:48], 1, args.seconds))
                during = big.status().done - before
                job_rate = during / (time.monotonic() - started)
                big.cancel()
        finally:
            for process in reversed(processes):
                process.stop(60)

    print(machine_line())
    print(
        f"# bulk: EfficientNet-Lite0, {args.images} 640x480 JPEGs from a local folder, one worker "
        f"process (prefork), {os.cpu_count()} cores; precision {args.precision}: the worker served "
        f"{worker_form} at batch {worker_batch}, the raw pipeline the same form at batch {batch}"
    )
    pairs = ", ".join(f"{r:.1f} / {j:.1f}" for r, j in zip(raws, steadies, strict=True))
    print(f"paired runs, raw / job images/s: {pairs}")
    print("| what | images/s (median) | ratio to raw |")
    print("|---|---|---|")
    print(f"| raw overlapped in-process, batch {batch} (reference) | {raw:.1f} | 1.00 |")
    print(f"| job, first chunk start to last result | {steady:.1f} | {ratio:.2f} |")
    print(
        f"| job, submission to results files written | {end_to_end:.1f} | {end_to_end / raw:.2f} |"
    )
    targets = [
        (
            f"job throughput: {ratio:.2f} x raw overlapped, median of paired runs (target >= 0.90)",
            ratio >= 0.9,
        ),
    ]
    print("\n| Classify, concurrency 1 | p50 ms | p99 ms |")
    print("|---|---|---|")
    print(f"| idle | {idle['p50_ms']:.1f} | {idle['p99_ms']:.1f} |")
    print(
        f"| with a {args.fairness_items:,}-image job running (the job: {during:,} images, "
        f"{job_rate:.1f}/s, {job_rate / raw:.2f} x raw, meanwhile) "
        f"| {busy['p50_ms']:.1f} | {busy['p99_ms']:.1f} |"
    )
    slowdown = busy["p50_ms"] / idle["p50_ms"]
    tail = busy["p99_ms"] / idle["p99_ms"]
    targets.append(
        (f"sync p50 under bulk load: {slowdown:.2f} x idle (target <= 1.5)", slowdown <= 1.5)
    )
    targets.append((f"sync p99 under bulk load: {tail:.2f} x idle (target <= 3)", tail <= 3))
    malformed = idle["wrong_answers"] + busy["wrong_answers"]
    empty = f"Classify answers without a prediction: {malformed:.0f} (target 0)"
    targets.append((empty, not malformed))
    print()
    missed = report(targets)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "raw": raw,
                    "steady": steady,
                    "end_to_end": end_to_end,
                    "idle": idle,
                    "busy": busy,
                    "job_rate_during_latency": job_rate,
                },
                indent=2,
            )
        )
    return missed


if __name__ == "__main__":
    sys.exit(main())
