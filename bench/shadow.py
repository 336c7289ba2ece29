"""What a shadow costs the callers: `Classify` p99 at concurrency 16 on an alias shadowed at
sample 1.0, over the same server's p99 on an alias without a shadow, in one run.

The same photos and model as bench/classify.py (EfficientNet-Lite0 from the offline weights,
640x480 JPEGs cut from the sample photos), `Classify` through gRPC, one image a call, to one
`perito serve` in its own process with a real redis-server (where the shadow's counts go). The
model is published twice: version 1 serves two aliases, `production` (shadowed by version 2,
the same network, so the shadow's work is as heavy as the answer's) and `plain` (no shadow).
Rounds alternate which alias is measured first (`--rounds` of `--seconds` windows each), and
after a shadowed window the next waits until the shadow's queue has drained (its compared and
shed counts stop moving, at most `SETTLE_S`), so its leftover work never falls into the plain
window. The CPU's ISA flags are printed first.

Target: the shadowed p99 at most 1.10 x the plain p99 (the ratio of the windows' medians, and
each round's ratio printed). The images the shadow compared and shed (by reason) are read
from /metrics: at c16 the callers keep the server busy, so the shadow's queue
(`shadow_queue_images`) fills during a window, what does not fit is shed, and the queue is run
once the window ends (its drain is counted with the window); a longer window sheds a larger
share. That is the design: shadow work runs only between callers' requests.

    .venv/bin/python bench/shadow.py [--seconds 10] [--rounds 3] [--json shadow.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

from bench.classify import MODEL, drive, machine_line, make_jpegs, publish, start_server  # noqa: E402
from bench.targets import report  # noqa: E402
from perito.v1 import classify_pb2, image_pb2, service_pb2_grpc  # noqa: E402
from tests.processes import free_port, redis_proc  # noqa: E402

ALIASES = {"plain": "no shadow", "production": "shadow at sample 1.0"}
"""The aliases measured, both served by version 1, and how the table names them."""

TARGET = 1.10
SETTLE_S = 30.0
"""The longest wait after a shadowed window for the shadow's queue to drain."""


async def classify_load(
    target: str, alias: str, jpegs: list[bytes], concurrency: int, seconds: float
) -> dict[str, float]:
    """`Classify` of `MODEL@alias`, one JPEG a call, from `concurrency` callers for `seconds`
    (`drive`): its figures, with `failed` (calls that raised or answered no prediction) and
    `versions` (the versions that answered, sorted, joined by commas)."""
    requests = [
        classify_pb2.ClassifyRequest(
            model=MODEL, version=alias, images=[image_pb2.Image(id=str(i), content=d)]
        )
        for i, d in enumerate(jpegs)
    ]
    versions: set[str] = set()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = service_pb2_grpc.PeritoStub(channel)  # type: ignore[no-untyped-call]

        async def call(index: int) -> bool:
            try:
                response = await stub.Classify(requests[index % len(requests)], timeout=60)
            except grpc.aio.AioRpcError:
                return False
            versions.add(response.model_version)
            return len(response.results) == 1 and len(response.results[0].predictions) > 0

        figures: dict[str, Any] = await drive(call, concurrency, seconds)
    figures["failed"] = figures.pop("wrong_answers")
    figures["versions"] = ",".join(sorted(versions))
    return figures


def shadow_counts(metrics_port: int) -> dict[str, float]:
    """The shadow's counters from the server's /metrics: `compared`, `agreed` and
    `shed_<reason>` for each reason seen."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    counts: dict[str, float] = {"compared": 0.0, "agreed": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "perito_shadow_compared_total":
                counts["compared"] += sample.value
            elif sample.name == "perito_shadow_agreed_total":
                counts["agreed"] += sample.value
            elif sample.name == "perito_shadow_shed_total":
                key = f"shed_{sample.labels.get('reason', '')}"
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def settled(metrics_port: int, timeout: float = SETTLE_S) -> dict[str, float]:
    """`shadow_counts` once they stop moving for half a second (the shadow's queue drained),
    or as they stand after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    before = shadow_counts(metrics_port)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = shadow_counts(metrics_port)
        if now == before:
            return now
        before = now
    return before


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both aliases' c16 windows in alternating rounds (the module docstring): the figures."""
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="perito-bench-shadow-") as tmp:
        work = Path(tmp)
        jpegs = make_jpegs(work, args.images)
        registry = publish("efficientnet-lite0", work)
        first = registry.manifest(MODEL, "1")
        registry.publish(MODEL, work / "model.pt", labels=first.labels, input=first.input)
        registry.set_alias(MODEL, "plain", "1")
        registry.set_alias(MODEL, "production", "1")
        registry.set_shadow(MODEL, "production", "2", 1.0)

        redis_port, port, metrics_port = free_port(), free_port(), free_port()
        store = redis_proc(redis_port, work / "redis.log", {}).start(30)
        server = None
        try:
            server = start_server(
                work,
                port,
                {
                    "PERITO_METRICS_PORT": str(metrics_port),
                    "PERITO_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                },
            )
            target = f"127.0.0.1:{port}"
            rounds: dict[str, list[dict[str, Any]]] = {alias: [] for alias in ALIASES}
            figures["order"] = [
                list(ALIASES) if index % 2 == 0 else list(reversed(ALIASES))
                for index in range(args.rounds)
            ]
            during = {"compared": 0.0, "agreed": 0.0}
            for order in figures["order"]:
                for alias in order:
                    before = settled(metrics_port)
                    window = asyncio.run(classify_load(target, alias, jpegs, 16, args.seconds))
                    rounds[alias].append(window)
                    after = settled(metrics_port)
                    if alias == "production":
                        for key, value in after.items():
                            during[key] = during.get(key, 0.0) + value - before.get(key, 0.0)
            for alias, windows in rounds.items():
                figures[alias] = {
                    "images_per_s": float(np.mean([w["images_per_s"] for w in windows])),
                    "p50_ms": float(np.median([w["p50_ms"] for w in windows])),
                    "p99_ms": float(np.median([w["p99_ms"] for w in windows])),
                    "p99_rounds": [w["p99_ms"] for w in windows],
                    "failed": int(sum(w["failed"] for w in windows)),
                    "versions": sorted({w["versions"] for w in windows}),
                }
            figures["shadow"] = during
        finally:
            if server is not None:
                server.send_signal(signal.SIGTERM)
                server.stop(60)
            store.stop(10)
    return figures


def print_figures(figures: dict[str, Any]) -> int:
    """The table, the ratio and the target of `measure`'s figures: the exit status."""
    print("| alias | images/s | p50 ms | p99 ms | p99 per round | failed | answered by |")
    print("|---|---|---|---|---|---|---|")
    for alias, what in ALIASES.items():
        f = figures[alias]
        per_round = ", ".join(f"{p:.1f}" for p in f["p99_rounds"])
        print(
            f"| {alias} ({what}) | {f['images_per_s']:.1f} | {f['p50_ms']:.1f} | "
            f"{f['p99_ms']:.1f} | {per_round} | {f['failed']} | v{' v'.join(f['versions'])} |"
        )
    plain, shadowed = figures["plain"], figures["production"]
    ratio = shadowed["p99_ms"] / plain["p99_ms"]
    rounds = [s / p for s, p in zip(shadowed["p99_rounds"], plain["p99_rounds"], strict=True)]
    shadow = figures["shadow"]
    shed = {k.removeprefix("shed_"): int(v) for k, v in shadow.items() if k.startswith("shed_")}
    offered = shadow["compared"] + sum(shed.values())
    print(
        f"# shadow windows and their drains: {int(shadow['compared'])} images compared "
        f"({shadow['compared'] / offered:.0%} of those offered), agreement "
        f"{shadow['agreed'] / max(shadow['compared'], 1):.3f}, shed {shed or 'none'}"
        if offered
        else "# shadow windows: nothing offered"
    )
    print(f"# p99 ratio per round: {', '.join(f'{r:.3f}' for r in rounds)}")
    return report(
        [
            (
                f"c16 p99 with a shadow at sample 1.0: {ratio:.3f} x without "
                f"(target <= {TARGET:.2f})",
                ratio <= TARGET,
            ),
            (
                "calls failed: "
                f"{plain['failed'] + shadowed['failed']} (target 0), every answer from v1",
                plain["failed"] + shadowed["failed"] == 0
                and plain["versions"] == shadowed["versions"] == ["1"],
            ),
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per measuring window")
    parser.add_argument("--rounds", type=int, default=3, help="windows per alias, in turn")
    parser.add_argument("--images", type=int, default=48, help="distinct JPEGs to cycle through")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    print(machine_line())
    print(
        f"# efficientnet-lite0, 640x480 JPEGs, c16, {args.seconds:g} s windows, "
        f"{args.rounds} rounds per alias",
        flush=True,
    )
    figures = measure(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return print_figures(figures)


if __name__ == "__main__":
    sys.exit(main())
