"""Single-caller latency of a TorchScript server over fresh starts: `Classify` c1 p50 against
the raw single-image time, each start measured as it comes up and again after a burst of 16
callers.

A TorchScript version (ResNet-18 by default, random weights) is published once; then, for each
of `--restarts` rounds: the raw single-image time (decode + resize a 640x480 JPEG, one forward
pass, in this process, with the module the server loads), then `perito serve
PERITO_PRECISION=torchscript` started fresh, `Classify` at concurrency 1, a 16-caller burst, and
concurrency 1 again. With `--variant`, every round runs each variant in turn (server
environments to compare, interleaved so that other load on the machine falls on all of them).

Prints the CPU, the load average as each server starts, one row per start and variant (beside
each p50: the raw forward pass alone, and the server's mean batcher wait and forward pass from
its /metrics, which say whether a gap is in the model or around it), and the medians.
Target: c1 p50 within 2 ms of the raw single-image time in every round, before and after the
burst. Exits 1 when missed.

OpenMP's threads wait as `perito_core` has them wait (GOMP_SPINCOUNT=1000) in this process and
the servers; GOMP_SPINCOUNT=300000 in a variant gives a server libgomp's default spinning:

    .venv/bin/python bench/torchscript_latency.py                   # the defaults, 5 starts
    .venv/bin/python bench/torchscript_latency.py --variant '' \\
        --variant GOMP_SPINCOUNT=300000                             # two settings side by side
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

# First, before torch: the package sets how OpenMP's threads wait as in the server, so the raw
# pipeline here runs torch as `perito serve` runs it.
import perito_core  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.classify import (  # noqa: E402
    bench_grpc,
    machine_line,
    make_jpegs,
    percentile,
    publish,
    random_images,
    start_server,
    timed_loop,
)
from bench.targets import report  # noqa: E402
from perito_core.imaging import load_model_input  # noqa: E402
from perito_core.models.engines.torchscript import TorchScriptModel  # noqa: E402
from tests.processes import free_port  # noqa: E402

MODEL = "bench-model"
# Within this many ms of the raw single-image p50 (the target).
TARGET_GAP_MS = 2.0


def parse_variant(text: str) -> dict[str, str]:
    """`KEY=VALUE,KEY=VALUE` as a dict ("" : the defaults)."""
    return dict(pair.split("=", 1) for pair in text.split(",") if pair.strip())


def raw_single_ms(
    model: TorchScriptModel, jpegs: list[bytes], seconds: float
) -> tuple[float, float]:
    """p50s in ms: decode + resize + one forward pass of one JPEG (cycling through `jpegs`),
    and the forward pass of one prepared image alone."""
    spec = model.manifest.input.spec()
    cursor = [0]

    def single() -> int:
        data = jpegs[cursor[0] % len(jpegs)]
        cursor[0] += 1
        model.predict(load_model_input(data, spec)[None])
        return 1

    def forward() -> int:
        model.predict(image)
        return 1

    image = random_images(1)
    _, latencies = timed_loop(seconds, single)
    _, forwards = timed_loop(seconds / 2, forward)
    return percentile(latencies, 50) * 1000, percentile(forwards, 50) * 1000


def stage_totals(metrics_port: int) -> dict[str, float]:
    """The server's cumulative seconds and counts of its batcher's queue wait and forward
    passes (`perito_queue_seconds`, `perito_compute_seconds`), from /metrics."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("perito_queue_seconds", "perito_compute_seconds"):
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def stage_means_ms(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """Mean queue wait per image and mean forward pass per batch, in ms, between two reads."""

    def mean(name: str) -> float:
        count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
        total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
        return total / count * 1000 if count else float("nan")

    return mean("perito_queue_seconds"), mean("perito_compute_seconds")


def serve_round(
    work: Path, jpegs: list[bytes], env: dict[str, str], seconds: float
) -> dict[str, float]:
    """Start a server with `env`, measure c1, a c16 burst and c1 again; stop it. The c1
    figures include the server's mean queue wait and forward pass (ms) over that window."""
    port, metrics_port = free_port(), free_port()
    server = start_server(
        work,
        port,
        {"PERITO_PRECISION": "torchscript", "PERITO_METRICS_PORT": str(metrics_port), **env},
    )
    target = f"127.0.0.1:{port}"
    try:
        load = os.getloadavg()[0]
        before = stage_totals(metrics_port)
        first = asyncio.run(bench_grpc(target, jpegs, 1, seconds))
        queue_ms, forward_ms = stage_means_ms(before, stage_totals(metrics_port))
        burst = asyncio.run(bench_grpc(target, jpegs, 16, seconds))
        before = stage_totals(metrics_port)
        after = asyncio.run(bench_grpc(target, jpegs, 1, seconds))
        queue_after_ms, forward_after_ms = stage_means_ms(before, stage_totals(metrics_port))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    wrong = first["wrong_answers"] + burst["wrong_answers"] + after["wrong_answers"]
    return {
        "load": load,
        "c1_p50_ms": first["p50_ms"],
        "c1_queue_ms": queue_ms,
        "c1_forward_ms": forward_ms,
        "c16_images_per_s": burst["images_per_s"],
        "after_burst_p50_ms": after["p50_ms"],
        "after_burst_queue_ms": queue_after_ms,
        "after_burst_forward_ms": forward_after_ms,
        "wrong_answers": wrong,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=["resnet18", "efficientnet-lite0"], default="resnet18")
    parser.add_argument("--restarts", type=int, default=5, help="fresh server starts")
    parser.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    parser.add_argument("--images", type=int, default=48, help="distinct JPEGs to cycle through")
    parser.add_argument(
        "--variant",
        action="append",
        metavar="KEY=VALUE,...",
        help="server environment to measure (repeat to compare; '' is the defaults)",
    )
    args = parser.parse_args()
    variants = [parse_variant(v) for v in (args.variant or [""])]
    names = [",".join(f"{k}={v}" for k, v in env.items()) or "defaults" for env in variants]

    print(machine_line())
    print(f"# {args.arch}, random weights, 640x480 JPEGs, {args.seconds:g} s per measurement")
    print(
        "| start | variant | load | raw single p50 ms (forward) | c1 p50 ms (queue, forward) "
        "| gap | after burst p50 ms (queue, forward) | gap | c16 images/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    gaps: dict[str, list[float]] = {name: [] for name in names}
    wrong = 0.0
    with tempfile.TemporaryDirectory(prefix="perito-bench-") as tmp:
        work = Path(tmp)
        jpegs = make_jpegs(work, args.images)
        artifact = publish(args.arch, work).fetch(MODEL, "1")
        model = TorchScriptModel.load(artifact.path, artifact.manifest)
        for start in range(1, args.restarts + 1):
            for name, env in zip(names, variants, strict=True):
                raw, raw_forward = raw_single_ms(model, jpegs, args.seconds)
                row = serve_round(work, jpegs, env, args.seconds)
                wrong += row["wrong_answers"]
                gap, gap_after = row["c1_p50_ms"] - raw, row["after_burst_p50_ms"] - raw
                gaps[name] += [gap, gap_after]
                print(
                    f"| {start} | {name} | {row['load']:.1f} | {raw:.1f} ({raw_forward:.1f}) "
                    f"| {row['c1_p50_ms']:.1f} ({row['c1_queue_ms']:.1f}, "
                    f"{row['c1_forward_ms']:.1f}) | {gap:+.1f} "
                    f"| {row['after_burst_p50_ms']:.1f} ({row['after_burst_queue_ms']:.1f}, "
                    f"{row['after_burst_forward_ms']:.1f}) | {gap_after:+.1f} "
                    f"| {row['c16_images_per_s']:.1f} |",
                    flush=True,
                )
    print()
    for name in names:
        print(
            f"# {name}: gap median {statistics.median(gaps[name]):+.1f} ms, "
            f"worst {max(gaps[name]):+.1f} ms over {len(gaps[name])} measurements"
        )
    worst = max(gaps[names[0]])
    return report(
        [
            (
                f"{names[0]}: c1 p50 at most raw + {worst:.1f} ms over {args.restarts} starts, "
                f"before and after a 16-caller burst (target <= {TARGET_GAP_MS:g} ms)",
                worst <= TARGET_GAP_MS,
            ),
            (f"Classify answers without a prediction: {wrong:.0f} (target 0)", not wrong),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
