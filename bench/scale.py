"""Scale benchmark: the bulk-job control plane at a million items, on real processes.

What a job of `--items` images costs the job store and how fast the control plane moves it,
with the compute taken out: the model ignores its input (a constant answer, no forward-pass
work) and the images are tiny PNGs (8x8, a few dozen bytes: their decode is next to nothing),
so what is measured is submission, the broker, leases, recording, Redis and reading back.

The stack is the fault suite's (`bench/faults.py`: `redis-server` with its append-only file
on, `perito serve`, `--workers` `perito worker` processes, each with one model thread), and
the job is submitted as a JSON Lines manifest of `--items` lines naming `--distinct` files in
turn (each line its own id), as a building inspector's listing would be.

Printed, with the CPU's features and the Redis version:

- submission: the `SubmitJob` call's time (the server reads the manifest and records the job);
- time to first result: from the submission's answer until `ListJobResults` gives the first
  item's recorded result (not PENDING);
- items per second of the control plane: items over the time from submission to the job's
  terminal state, and over its middle half (after start-up, before the tail);
- Redis bytes per item: `MEMORY USAGE` summed over the job's own keys (every key whose name
  holds the job id), and the server's `used_memory` over its baseline, each divided by the
  items: at the first sample past half-way ("during": chunks queued, leases, open chunks) and
  once the job is terminal ("after": what the job keeps until its retention ends);
- `ListJobResults`: the time to page through every result in input order (`--page-size` a
  page), and a check that it returned each index once, in order.

Then an extrapolation to 10 million items and to N worker hosts from those figures.

    make bench-scale                                  # 1,000,000 items, 4 workers
    .venv/bin/python bench/scale.py --items 100000 --workers 2
"""

# No `from __future__ import annotations`: the module below is compiled by TorchScript,
# which needs real annotations.
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from faults import Config, Lab, Stack, _png

from perito.v1.vocabulary import ItemState
from perito_core.jobs.store import job_keys_pattern
from perito_core.models.engines.base import isa_summary
from perito_core.models.registry import ModelRegistry
from perito_training.export import export_torchscript
from tests.helpers import TINY_INPUT

MODEL = "constant"
LABELS = ["a", "b", "c"]


class Constant(nn.Module):
    """Ignores its input: the same probabilities for every image (no forward-pass work)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("answer", torch.tensor([[0.7, 0.2, 0.1]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.answer.expand(x.shape[0], 3).contiguous()


def publish_constant(lab: Lab) -> None:
    path = lab.work / "models" / f"{MODEL}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    export_torchscript(Constant(), TINY_INPUT, path)
    registry = ModelRegistry.open(str(lab.registry), cache_dir=lab.work / "publish-cache")
    registry.publish(MODEL, path, labels=LABELS, input=TINY_INPUT)


def write_manifest(lab: Lab, items: int, distinct: int) -> Path:
    """`distinct` 8x8 PNGs under the local root, and a JSONL manifest of `items` lines naming
    them in turn, each with its own id."""
    folder = lab.root / "scale-images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = []
    for index in range(distinct):
        path = folder / f"{index:05d}.png"
        path.write_bytes(_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
        paths.append(str(path))
    manifest = lab.root / "scale-manifest.jsonl"
    with manifest.open("w") as out:
        for index in range(items):
            out.write(json.dumps({"uri": paths[index % distinct], "id": f"item-{index:08d}"}))
            out.write("\n")
    return manifest


def job_bytes(stack: Stack, job_id: str) -> tuple[int, int]:
    """(`MEMORY USAGE` summed over every key of job `job_id`, how many keys)."""
    total = keys = 0
    for key in stack.r.scan_iter(match=job_keys_pattern(job_id), count=1000):
        total += int(stack.r.memory_usage(key, samples=0) or 0)  # type: ignore[arg-type]
        keys += 1
    return total, keys


def used_memory(stack: Stack) -> int:
    return int(stack.r.info("memory")["used_memory"])  # type: ignore[index]


def cpu_line() -> str:
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()[2:3]
    return (
        f"# CPU: {name}, {os.cpu_count()} cores; ISA: {isa_summary()}; "
        f"redis-server {' '.join(redis_version)}; load average {os.getloadavg()[0]:.1f}"
    )


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    lab = Lab(work)
    publish_constant(lab)
    manifest = write_manifest(lab, args.items, args.distinct)
    config = Config(
        workers=args.workers,
        server_env=(
            ("PERITO_MAX_JOB_ITEMS", str(max(args.items, 1_000_000))),
            ("PERITO_MAX_JOB_CHUNK_SIZE", str(args.chunk_size)),
            ("PERITO_WATCHDOG_INTERVAL_S", "5"),
        ),
        worker_env=(("PERITO_BATCH_SIZE", "64"), ("PERITO_LEASE_TTL_S", "30")),
    )
    stack = Stack(lab, "scale", config)
    figures: dict[str, Any] = {"items": args.items, "workers": args.workers}
    try:
        stack.start()
        baseline = used_memory(stack)
        client = stack.client(timeout=600.0)
        began = time.perf_counter()
        job = client.submit_job(
            str(manifest), model=MODEL, chunk_size=args.chunk_size, timeout=600.0
        )
        submitted = time.perf_counter()
        figures["submit_s"] = submitted - began
        job_id = job.id
        print(f"# submitted {args.items:,} items in {figures['submit_s']:.1f} s", flush=True)

        first: list[float] = []

        def watch_first() -> None:
            while not first:
                item = next(iter(client.list_job_results(job_id, page_size=1)), None)
                if item is not None and item.state != ItemState.PENDING:
                    first.append(time.perf_counter() - submitted)
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=watch_first, daemon=True)
        watcher.start()
        during: tuple[int, int, int] | None = None
        quarter = three_quarters = all_done = None
        status = job.status()
        while not status.terminal:
            time.sleep(0.5)
            status = job.status()
            done = status.done
            now = time.perf_counter()
            if quarter is None and done >= args.items / 4:
                quarter = (now, done)
            if three_quarters is None and done >= args.items * 3 / 4:
                three_quarters = (now, done)
            if all_done is None and done >= args.items:
                all_done = now
            if during is None and done >= args.items / 2:
                during = (*job_bytes(stack, job_id), used_memory(stack) - baseline)
                print(
                    f"# half-way at {now - submitted:.0f} s: job keys {during[0] / args.items:.2f}"
                    f" B/item ({during[1]} keys), Redis {during[2] / args.items:.2f} B/item",
                    flush=True,
                )
            if now - submitted > args.timeout:
                raise SystemExit(f"the job did not end within {args.timeout:.0f} s: {status}")
        ended = time.perf_counter()
        watcher.join(10)
        after = (*job_bytes(stack, job_id), used_memory(stack) - baseline)
        figures.update(
            state=status.state.value if hasattr(status.state, "value") else str(status.state),
            succeeded=status.succeeded,
            failed=status.failed,
            run_s=ended - submitted,
            recorded_s=(all_done or ended) - submitted,
            files_s=ended - (all_done or ended),
            items_per_s=args.items / (ended - submitted),
            first_result_s=first[0] if first else None,
            during_job_bytes_per_item=during[0] / args.items if during else None,
            during_used_bytes_per_item=during[2] / args.items if during else None,
            after_job_bytes_per_item=after[0] / args.items,
            after_job_keys=after[1],
            after_used_bytes_per_item=after[2] / args.items,
        )
        if quarter and three_quarters and three_quarters[0] > quarter[0]:
            figures["middle_items_per_s"] = (three_quarters[1] - quarter[1]) / (
                three_quarters[0] - quarter[0]
            )
        began = time.perf_counter()
        expected, out_of_order = 0, 0
        pending = 0
        for result in client.list_job_results(job_id, page_size=args.page_size, timeout=120.0):
            out_of_order += result.index != expected
            pending += result.state == ItemState.PENDING
            expected += 1
        figures["list_s"] = time.perf_counter() - began
        figures["listed"] = expected
        figures["listed_out_of_order"] = out_of_order
        figures["listed_pending"] = pending
    finally:
        stack.close()
    return figures


def report(figures: dict[str, Any], args: argparse.Namespace) -> int:
    items, workers = figures["items"], figures["workers"]

    def number(key: str, fmt: str = ".1f") -> str:
        value = figures.get(key)
        return "-" if value is None else format(value, fmt)

    print(f"\n# {items:,} items, {workers} worker processes, chunks of {args.chunk_size}")
    print("| what | figure |")
    print("|---|---|")
    rows = [
        (
            "job state",
            f"{figures['state']} ({figures['succeeded']:,} succeeded, "
            f"{figures['failed']:,} failed)",
        ),
        ("submission (SubmitJob of the manifest)", f"{number('submit_s')} s"),
        ("time to first result", f"{number('first_result_s')} s"),
        (
            "control plane, whole job",
            f"{number('items_per_s', ',.0f')} items/s ({number('run_s')} s)",
        ),
        (
            "every item recorded / results files written after",
            f"{number('recorded_s')} s / {number('files_s')} s",
        ),
        ("control plane, middle half", f"{number('middle_items_per_s', ',.0f')} items/s"),
        ("Redis, the job's keys, during", f"{number('during_job_bytes_per_item', '.2f')} B/item"),
        (
            "Redis, used_memory over baseline, during",
            f"{number('during_used_bytes_per_item', '.2f')} B/item",
        ),
        (
            "Redis, the job's keys, after",
            f"{number('after_job_bytes_per_item', '.2f')} B/item "
            f"({figures['after_job_keys']} keys)",
        ),
        (
            "Redis, used_memory over baseline, after",
            f"{number('after_used_bytes_per_item', '.2f')} B/item",
        ),
        (
            "ListJobResults, every page",
            f"{number('list_s')} s for {figures['listed']:,} "
            f"results ({args.page_size} a page), {figures['listed_out_of_order']} out of order",
        ),
    ]
    for what, value in rows:
        print(f"| {what} | {value} |")
    # From the job's own keys, which grow with its items; used_memory's growth also holds a
    # fixed part (scripts, the broker's queues) that a small run would scale up as if per item.
    per_item = figures.get("after_job_bytes_per_item") or 0.0
    during = figures.get("during_job_bytes_per_item") or 0.0
    during_used = figures.get("during_used_bytes_per_item") or 0.0
    rate = figures.get("middle_items_per_s") or figures["items_per_s"]
    print(
        f"\nextrapolated to 10,000,000 items: the job's Redis keys {during * 1e7 / 2**20:,.1f} MiB "
        f"while it runs, {per_item * 1e7 / 2**20:,.1f} MiB kept after (used_memory grew "
        f"{during_used * items / 2**20:,.1f} MiB in this run); the control plane at "
        f"{rate:,.0f} items/s per {workers} worker processes on {os.cpu_count()} cores: "
        f"{1e7 / rate / 3600:.1f} h on one such host, {1e7 / rate / 3600 / 10:.2f} h on 10 "
        "(if the job store keeps up: see the docs' scale section)"
    )
    ok = (
        figures["succeeded"] == items
        and figures["listed"] == items
        and not figures["listed_out_of_order"]
        and not figures["listed_pending"]
    )
    print("every item succeeded and listed once, in order:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--distinct", type=int, default=1000, help="distinct image files")
    parser.add_argument("--workers", type=int, default=4, help="worker processes")
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds the job may take")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    print(cpu_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="perito-scale-") as tmp:
        figures = run(args, Path(tmp))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return report(figures, args)


if __name__ == "__main__":
    sys.exit(main())
