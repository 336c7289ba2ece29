"""What the photo-quality gate costs a caller: `Classify` latency at concurrency 1 with and
without the quality measures, in one run (target: at most 10% of c1 latency).

The server always measures each decoded photo (`perito_core.quality.measure`, called by
`load_model_input_with_info`), so two `perito serve` processes are started on the same
registry: one as shipped, and one whose `measure` is replaced, before the server starts, by a
function that returns fixed measures at once (the gate's judging, a few comparisons, still
runs). Sequential one-image `Classify` calls over gRPC (bench/classify.py's photos and model:
EfficientNet-Lite0, 640x480 JPEGs) go to each server in turn, `--rounds` windows of
`--seconds` each, so drift on a shared machine falls on both alike. The cost is the
difference of the two p50s over the p50 without the measures. (bench/trust.py times the
measures alone in-process, beside the other costs of trust in each answer.)

The CPU's ISA flags are printed first. About a minute on 2 cores with the defaults:

    .venv/bin/python bench/quality.py [--seconds 5] [--rounds 3] [--json quality.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.classify import (  # noqa: E402
    MODEL,
    bench_grpc,
    machine_line,
    make_jpegs,
    publish,
    start_server,
)
from bench.targets import report  # noqa: E402
from tests.processes import Proc, free_port  # noqa: E402

TARGET = 0.10
"""The most the measures may add to `Classify`'s p50 at concurrency 1, as a share of it."""

# `perito serve` with the quality measures replaced by fixed ones (a sharp, well-exposed
# 640x480 photo), then the CLI as the `perito` script runs it.
WITHOUT_MEASURES = """
import sys
import perito_core.imaging
from perito_core.quality import QualityMeasures
FIXED = QualityMeasures(500.0, 0.0, 0.0, 128.0, 50.0, 640, 480, 2.0)
perito_core.imaging.measure = lambda *args, **kwargs: FIXED
from perito._cli import main
sys.argv[0] = "perito"
sys.exit(main())
"""


def start_without_measures(work: Path, port: int) -> Proc:
    """`start_server`'s `perito serve`, its quality measures replaced (`WITHOUT_MEASURES`)."""
    env = {
        **os.environ,
        "PERITO_REGISTRY": str(work / "registry"),
        "PERITO_CACHE_DIR": str(work / "server-cache-off"),
        "PYTHONUNBUFFERED": "1",
    }
    args = [sys.executable, "-c", WITHOUT_MEASURES, "serve", "--port", str(port)]
    args += ["--preload", MODEL, "--log-level", "WARNING"]
    return Proc(
        "perito serve (measures off)", args, env, work / "serve-off.log", "serving on"
    ).start()


def measure_all(args: argparse.Namespace) -> dict[str, Any]:
    """Both servers' c1 windows, taken in turn: the figures."""
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="perito-bench-quality-") as tmp:
        work = Path(tmp)
        jpegs = make_jpegs(work, args.images)
        publish("efficientnet-lite0", work)
        servers: dict[str, tuple[Proc, int]] = {}
        try:
            on_port, off_port = free_port(), free_port()
            servers["on"] = (start_server(work, on_port, {}), on_port)
            servers["off"] = (start_without_measures(work, off_port), off_port)
            windows: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
            for _ in range(args.rounds):
                for arm, (_, port) in servers.items():
                    load = bench_grpc(f"127.0.0.1:{port}", jpegs, 1, args.seconds)
                    windows[arm].append(asyncio.run(load))
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _ in servers.values():
                proc.stop(60)
        for arm, taken in windows.items():
            figures[arm] = {
                "p50_ms": float(np.median([w["p50_ms"] for w in taken])),
                "p99_ms": float(np.median([w["p99_ms"] for w in taken])),
                "images_per_s": float(np.mean([w["images_per_s"] for w in taken])),
                "rounds_p50_ms": [w["p50_ms"] for w in taken],
                "wrong_answers": int(sum(w["wrong_answers"] for w in taken)),
            }
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="per window")
    parser.add_argument("--rounds", type=int, default=3, help="windows per server, in turn")
    parser.add_argument("--images", type=int, default=48, help="distinct JPEGs to cycle through")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    print(machine_line())
    figures = measure_all(args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    on, off = figures["on"], figures["off"]
    print("| Classify c1 | images/s | p50 ms | p99 ms | p50 of each window, ms |")
    print("|---|---|---|---|---|")
    for arm, name in (("off", "measures off"), ("on", "measures on (as shipped)")):
        f = figures[arm]
        windows = " / ".join(f"{p:.1f}" for p in f["rounds_p50_ms"])
        print(
            f"| {name} | {f['images_per_s']:.1f} | {f['p50_ms']:.1f} | {f['p99_ms']:.1f} "
            f"| {windows} |"
        )
    share = (on["p50_ms"] - off["p50_ms"]) / off["p50_ms"]
    wrong = on["wrong_answers"] + off["wrong_answers"]
    return report(
        [
            (
                f"quality: c1 p50 {on['p50_ms']:.1f} ms with the measures, {off['p50_ms']:.1f} "
                f"ms without: {share:+.2%} (target <= {TARGET:.0%})",
                share <= TARGET,
            ),
            (f"every call answered right: {wrong} wrong", wrong == 0),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
