"""What trust in each answer costs: provenance, the prediction log, the photo-quality gate and
an explanation, as ratios measured in one run on one machine (docs/trust.md#what-it-costs).

The same photos and model as bench/classify.py (EfficientNet-Lite0 from the offline weights,
640x480 JPEGs cut from the sample photos), `Classify` through gRPC, one image a call, to
`perito serve` in its own process. The CPU's ISA flags are printed first.

1. Provenance at concurrency 16 (target: at most 2% of throughput). It is always on: the
   server has no switch, so its work is timed in-process instead: per image, the sha256 of the
   bytes as received (`sha256_hex`), the `Provenance` message built as the server builds it
   (`provenance_record` over the version's `ServedVersion`) and serialized for the wire. The
   ratio is that time divided by the per-image wall time of `Classify` at concurrency 16
   (1 / images/s) on the server without a log, in the same run: the share of the server's
   time per image (it is CPU-bound at c16) that provenance takes.
2. The prediction log at concurrency 16 (target: at most 5%). Three `perito serve` processes,
   started one after the other and measured in turn (`--rounds` times, a window of
   `--seconds` each, so drift on a shared machine falls on all three alike): the log off, on
   into a local folder, and on into a dead store (an `s3://` log whose endpoint refuses
   connections). The order alternates by round (off, local, dead; then dead, local, off; ...)
   so that no server always follows the same one, and after each window the next waits
   until that server's log has settled (every call's record written or dropped, per its
   /metrics, at most `SETTLE_S`), so that its writer's work cannot fall into another's
   window. Their images/s are compared with the log off: the ratio of the windows' means,
   and the median and mean of each round's ratio; the records written and dropped (by
   reason) are read from each server's /metrics once its queue has drained, and the dead
   store's calls that failed are counted (target 0). When one server's windows differ by
   more than `STEADY`, other work on the machine moved the figures: that is a miss too
   (rerun on a quiet machine).
3. Quality at concurrency 1 (target: at most 10% of latency). The server always measures
   each decoded photo, so the measures (`perito_core.quality.measure` and `find_issues` with
   the default thresholds) are timed in-process on the same photos decoded as the server
   decodes them, and divided by `Classify`'s p50 at concurrency 1 in the same run.
4. An explanation's cost per image, stated (no target): `Classify` p50 at concurrency 1 with
   `explain` on and off, sequential one-image calls (`bench/explain.py`'s `timed_calls`,
   `--explain-calls` of each), on the server without a log.

Prints a table and the targets (`bench.targets.report`: exit status 1 on a miss); `--json`
writes the figures too. About 2 to 3 minutes on 2 cores with the defaults:

    .venv/bin/python bench/trust.py [--seconds 5] [--rounds 2] [--json trust.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.classify import (  # noqa: E402
    MODEL,
    drive,
    machine_line,
    make_jpegs,
    percentile,
    publish,
    start_server,
    timed_loop,
)
from bench.explain import timed_calls  # noqa: E402
from bench.targets import report  # noqa: E402
from perito.v1 import classify_pb2, image_pb2, service_pb2_grpc  # noqa: E402
from perito_core.explain import Occlusion  # noqa: E402
from perito_core.imaging import decode_image_with_info  # noqa: E402
from perito_core.models.manifest import ModelManifest  # noqa: E402
from perito_core.models.provenance import (  # noqa: E402
    ServedVersion,
    provenance_record,
    sha256_hex,
)
from perito_core.quality import DEFAULT_THRESHOLDS, find_issues, measure  # noqa: E402
from tests.processes import Proc, free_port  # noqa: E402

LOGS = {"off": "log off", "local": "log on, local folder", "dead": "log on, dead store"}
"""The prediction log of each server measured at concurrency 16: none, a local folder, a
store that refuses connections; and how the table names it."""


STEADY = 1.25
"""The most one server's c16 windows may differ (fastest / slowest) for the log's ratios to
mean anything: over it, other work on the machine came and went during the run."""

SETTLE_S = 30.0
"""The longest wait after a window for that server's prediction log to settle."""


def round_order(index: int) -> list[str]:
    """The servers (`LOGS`) in the order measured in round `index` (from 0): forward in even
    rounds, backward in odd ones."""
    order = list(LOGS)
    return order if index % 2 == 0 else order[::-1]


def provenance_seconds(jpegs: list[bytes], manifest: ModelManifest, seconds: float) -> float:
    """Seconds per image of what provenance adds to an answer: the sha256 of the bytes as
    received, the `Provenance` message built as `InferenceService.answer` builds it, and its
    serialization; over `jpegs` in turn for `seconds`."""
    served = ServedVersion.of(manifest)
    cursor = [0]

    def step() -> int:
        data = jpegs[cursor[0] % len(jpegs)]
        cursor[0] += 1
        message = classify_pb2.Provenance(
            **provenance_record(
                served,
                input_sha256=sha256_hex(data),
                model=manifest.name,
                model_version=manifest.version,
                form="torchscript-fp32",
                confidence_threshold=served.confidence_threshold,
                request_id="0123456789abcdef0123456789abcdef",
            )
        )
        message.SerializeToString()
        return 1

    rate, _ = timed_loop(seconds, step)
    return 1 / rate


def quality_seconds(jpegs: list[bytes], manifest: ModelManifest, seconds: float) -> float:
    """Seconds per photo of the quality measures and issues, on each of `jpegs` decoded as the
    server decodes it (`load_model_input_with_info`: at least the model's resize size)."""
    spec = manifest.input.spec()
    target = spec.resize_size if spec.resize_mode == "center_crop" else max(spec.height, spec.width)
    decoded = [decode_image_with_info(d, min_size=(target, target)) for d in jpegs]
    side = min(spec.height, spec.width)
    cursor = [0]

    def step() -> int:
        image, info = decoded[cursor[0] % len(decoded)]
        cursor[0] += 1
        find_issues(measure(image, side, size=(info.width, info.height)), DEFAULT_THRESHOLDS)
        return 1

    rate, _ = timed_loop(seconds, step)
    return 1 / rate


async def classify_load(
    target: str, jpegs: list[bytes], concurrency: int, seconds: float
) -> dict[str, float]:
    """`Classify`, one JPEG a call, from `concurrency` callers for `seconds` (`drive`): its
    figures, with `calls` (every call made, warm-up included) and `failed` (calls that raised
    or answered no prediction)."""
    requests = [
        classify_pb2.ClassifyRequest(model=MODEL, images=[image_pb2.Image(id=str(i), content=d)])
        for i, d in enumerate(jpegs)
    ]
    calls = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = service_pb2_grpc.PeritoStub(channel)  # type: ignore[no-untyped-call]

        async def call(index: int) -> bool:
            nonlocal calls
            calls += 1
            try:
                response = await stub.Classify(requests[index % len(requests)], timeout=60)
            except grpc.aio.AioRpcError:
                return False
            return len(response.results) == 1 and len(response.results[0].predictions) > 0

        figures = await drive(call, concurrency, seconds)
    figures["failed"] = figures.pop("wrong_answers")
    figures["calls"] = calls
    return figures


def log_counts(metrics_port: int) -> dict[str, float]:
    """The prediction log's counters from a server's /metrics: `written`, `queued` and
    `dropped_<reason>` for each reason seen."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    counts: dict[str, float] = {"written": 0.0, "queued": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "perito_prediction_log_records_total":
                counts["written"] += sample.value
            elif sample.name == "perito_prediction_log_queued":
                counts["queued"] += sample.value
            elif sample.name == "perito_prediction_log_dropped_total":
                key = f"dropped_{sample.labels.get('reason', '')}"
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def drained(metrics_port: int, calls: int, timeout: float = 60) -> dict[str, float]:
    """`log_counts` once every one of `calls` records is written or dropped and none is
    queued (or `timeout` seconds passed; then as they stand)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = log_counts(metrics_port)
        settled = sum(v for k, v in counts.items() if k != "queued")
        if (settled >= calls and not counts["queued"]) or time.monotonic() > deadline:
            return counts
        time.sleep(0.25)


def server_env(log: str, work: Path, metrics_port: int) -> dict[str, str]:
    """`perito serve`'s settings for the prediction log `log` (`LOGS`)."""
    env = {"PERITO_METRICS_PORT": str(metrics_port)}
    if log == "local":
        env["PERITO_PREDICTION_LOG_URI"] = str(work / "prediction-log")
    elif log == "dead":
        env |= {
            "PERITO_PREDICTION_LOG_URI": "s3://prediction-log/perito/",
            # A port nothing listens on: every connection is refused, as a store that is down.
            "PERITO_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
            "PERITO_S3_ACCESS_KEY_ID": "bench",
            "PERITO_S3_SECRET_ACCESS_KEY": "bench",
        }
    return env


def measure_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, in one run (the module docstring): the figures."""
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="perito-bench-trust-") as tmp:
        work = Path(tmp)
        jpegs = make_jpegs(work, args.images)
        registry = publish("efficientnet-lite0", work)
        manifest = registry.manifest(MODEL, "1")
        figures["provenance_ms"] = provenance_seconds(jpegs, manifest, args.seconds) * 1000
        figures["quality_ms"] = quality_seconds(jpegs, manifest, args.seconds) * 1000

        servers: dict[str, tuple[Proc, int, int]] = {}
        try:
            for log in LOGS:
                port, metrics_port = free_port(), free_port()
                proc = start_server(work, port, server_env(log, work, metrics_port))
                servers[log] = (proc, port, metrics_port)
            rounds: dict[str, list[dict[str, float]]] = {log: [] for log in LOGS}
            figures["c16_order"] = [round_order(index) for index in range(args.rounds)]
            for order in figures["c16_order"]:
                for log in order:
                    target = f"127.0.0.1:{servers[log][1]}"
                    rounds[log].append(asyncio.run(classify_load(target, jpegs, 16, args.seconds)))
                    if log != "off":  # its writer's work done before another's window
                        calls = int(sum(w["calls"] for w in rounds[log]))
                        drained(servers[log][2], calls, SETTLE_S)
                    time.sleep(1.0)
            for log in LOGS:
                windows = rounds[log]
                calls = int(sum(w["calls"] for w in windows))
                ratios = [
                    w["images_per_s"] / off["images_per_s"]
                    for w, off in zip(windows, rounds["off"], strict=True)
                ]
                figures[f"c16_{log}"] = {
                    "images_per_s": float(np.mean([w["images_per_s"] for w in windows])),
                    "ratios": ratios,
                    "p50_ms": float(np.median([w["p50_ms"] for w in windows])),
                    "p99_ms": float(np.median([w["p99_ms"] for w in windows])),
                    "calls": calls,
                    "failed": int(sum(w["failed"] for w in windows)),
                    "rounds": [w["images_per_s"] for w in windows],
                    "log": drained(servers[log][2], calls) if log != "off" else {},
                }

            target = f"127.0.0.1:{servers['off'][1]}"
            figures["c1"] = asyncio.run(classify_load(target, jpegs, 1, args.seconds))
            with grpc.insecure_channel(
                target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
            ) as channel:
                stub = service_pb2_grpc.PeritoStub(channel)  # type: ignore[no-untyped-call]
                plain = timed_calls(stub, jpegs, args.explain_calls, explain=False)
                explained = timed_calls(stub, jpegs, args.explain_calls, explain=True)
            figures["explain"] = {
                "passes": Occlusion().passes,
                "plain_p50_ms": percentile(plain, 50) * 1000,
                "explain_p50_ms": percentile(explained, 50) * 1000,
                "explain_p99_ms": percentile(explained, 99) * 1000,
                "calls": len(explained),
            }
        finally:
            for proc, _, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _, _ in servers.values():
                proc.stop(60)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="per measuring window")
    parser.add_argument(
        "--rounds", type=int, default=2, help="c16 windows per server, taken in turn"
    )
    parser.add_argument("--images", type=int, default=48, help="distinct JPEGs to cycle through")
    parser.add_argument(
        "--explain-calls", type=int, default=10, help="c1 calls with and without explain"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    print(machine_line())
    print(
        f"# efficientnet-lite0, 640x480 JPEGs, {args.seconds:g} s windows, "
        f"{args.rounds} c16 rounds per server",
        flush=True,
    )
    figures = measure_all(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return print_figures(figures)


def print_figures(figures: dict[str, Any]) -> int:
    """The table, the ratios and the targets of `measure_all`'s figures: the exit status."""
    c16 = {log: figures[f"c16_{log}"] for log in LOGS}
    c1, explained = figures["c1"], figures["explain"]
    base = c16["off"]["images_per_s"]
    print("| what | images/s | p50 ms | p99 ms | ratio to log off |")
    print("|---|---|---|---|---|")
    for log, name in LOGS.items():
        figs = c16[log]
        print(
            f"| Classify c16, {name} | {figs['images_per_s']:.1f} | {figs['p50_ms']:.1f} "
            f"| {figs['p99_ms']:.1f} | {figs['images_per_s'] / base:.3f} |"
        )
    print(
        f"| Classify c1, log off | {c1['images_per_s']:.1f} | {c1['p50_ms']:.1f} "
        f"| {c1['p99_ms']:.1f} | |"
    )
    print(
        f"| Classify c1, explain on / off ({explained['calls']} calls each) | "
        f"| {explained['explain_p50_ms']:.1f} / {explained['plain_p50_ms']:.1f} "
        f"| {explained['explain_p99_ms']:.1f} | |"
    )
    rounds = "; ".join(
        f"{log} " + " / ".join(f"{rate:.1f}" for rate in c16[log]["rounds"]) for log in LOGS
    )
    orders = "; ".join(", ".join(order) for order in figures["c16_order"])
    print(f"\nc16 windows, images/s, round by round: {rounds} (orders: {orders})")
    for log in ("local", "dead"):
        ratios = c16[log]["ratios"]
        print(
            f"c16 {log} / off, each round: "
            + " / ".join(f"{ratio:.3f}" for ratio in ratios)
            + f"; median {np.median(ratios):.3f}, mean {np.mean(ratios):.3f}"
        )
    spread = max(max(c16[log]["rounds"]) / min(c16[log]["rounds"]) for log in LOGS)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")

    provenance_ms, quality_ms = figures["provenance_ms"], figures["quality_ms"]
    c16_image_ms = 1000 / base
    provenance_share = provenance_ms / c16_image_ms
    print(
        f"provenance: {provenance_ms:.3f} ms an image in-process (sha256 of the bytes, "
        f"Provenance built and serialized) / {c16_image_ms:.2f} ms an image at c16 (log off) "
        f"= {provenance_share:.2%}"
    )
    local, dead = c16["local"], c16["dead"]
    local_cost = 1 - local["images_per_s"] / base
    dead_cost = 1 - dead["images_per_s"] / base
    local_median = 1 - float(np.median(local["ratios"]))
    dead_median = 1 - float(np.median(dead["ratios"]))
    print(f"prediction log, local folder: {local['calls']} calls; {_counts(local['log'])}")
    print(
        f"prediction log, dead store: {dead['calls']} calls, {dead['failed']} failed; "
        f"{_counts(dead['log'])}"
    )
    quality_share = quality_ms / c1["p50_ms"]
    print(
        f"quality: {quality_ms:.3f} ms a photo in-process (measures and issues) / c1 p50 "
        f"{c1['p50_ms']:.1f} ms = {quality_share:.2%}"
    )
    explain_ms = explained["explain_p50_ms"] - explained["plain_p50_ms"]
    print(
        f"explanation: {explain_ms:.0f} ms an image at c1 p50 ({explained['passes']} forward "
        f"passes, {explain_ms / explained['passes']:.1f} ms each): "
        f"{explained['explain_p50_ms'] / explained['plain_p50_ms']:.1f} x a plain call"
    )
    dropped = sum(v for k, v in dead["log"].items() if k.startswith("dropped_"))
    failed = sum(c16[log]["failed"] for log in LOGS) + c1["failed"]
    return report(
        [
            (
                f"provenance at c16: {provenance_share:.2%} of an image's time (target <= 2%)",
                provenance_share <= 0.02,
            ),
            (
                f"prediction log at c16, local folder: {local_cost:.1%} of throughput, "
                f"{local_median:.1%} by the rounds' median (target <= 5%)",
                local_cost <= 0.05,
            ),
            (
                f"prediction log at c16, dead store: {dead_cost:.1%} of throughput, "
                f"{dead_median:.1%} by the rounds' median (target <= 5%)",
                dead_cost <= 0.05,
            ),
            (
                f"dead store: {dropped:.0f} of {dead['calls']} records dropped and counted, "
                f"{dead['failed']} calls failed (target: every record counted, no call failed)",
                dropped == dead["calls"] and not dead["failed"],
            ),
            (
                f"quality at c1: {quality_share:.2%} of p50 latency (target <= 10%)",
                quality_share <= 0.10,
            ),
            (f"Classify calls failed or without a prediction: {failed} (target 0)", not failed),
            (
                f"c16 windows of one server differ by up to {spread:.2f} x (target <= "
                f"{STEADY:.2f}; over it, other work on the machine moved the figures: rerun)",
                spread <= STEADY,
            ),
        ]
    )


def _counts(counts: dict[str, float]) -> str:
    """`log_counts` in words: `written 812, dropped storage_error 0, queued 0`."""
    return ", ".join(f"{k.replace('_', ' ', 1)} {v:.0f}" for k, v in sorted(counts.items()))


if __name__ == "__main__":
    sys.exit(main())
