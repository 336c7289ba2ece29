"""What an explanation costs per image: `Classify` with and without `explain`, one image per
call, through gRPC to `perito serve` in its own process (EfficientNet-Lite0, 640x480 JPEGs).

Prints the forward passes per image (`Occlusion().passes`), p50 and p99 of each kind of call,
and the difference of the p50s: what explaining one image adds. The explanation's forward
passes run in the server's low-priority lane, in batches of `PERITO_MAX_BATCH_SIZE` (set it
with `--server-env`), so on an idle server this is the whole cost.

    .venv/bin/python bench/explain.py --calls 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.classify import (  # noqa: E402
    MODEL,
    machine_line,
    make_jpegs,
    percentile,
    publish,
    start_server,
)
from perito.v1 import classify_pb2, image_pb2, service_pb2_grpc  # noqa: E402
from perito_core.explain import Occlusion  # noqa: E402
from tests.processes import free_port  # noqa: E402


def timed_calls(
    stub: service_pb2_grpc.PeritoStub, jpegs: list[bytes], calls: int, explain: bool
) -> list[float]:
    """Seconds of each of `calls` sequential one-image calls (after two unmeasured ones)."""
    times = []
    for index in range(calls + 2):
        request = classify_pb2.ClassifyRequest(
            model=MODEL,
            images=[image_pb2.Image(content=jpegs[index % len(jpegs)])],
            explain=explain,
        )
        started = time.perf_counter()
        response = stub.Classify(request, timeout=120)
        elapsed = time.perf_counter() - started
        if explain and not response.results[0].explanation.overlay_png:
            raise RuntimeError("explain asked, no explanation answered")
        if index >= 2:
            times.append(elapsed)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20, help="measured calls of each kind")
    parser.add_argument(
        "--server-env", action="append", default=[], help="KEY=VALUE for perito serve"
    )
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.server_env)
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="perito-bench-explain-") as folder:
        work = Path(folder)
        jpegs = make_jpegs(work, 8)
        publish("efficientnet-lite0", work)
        port = free_port()
        server = start_server(work, port, extra)
        try:
            with grpc.insecure_channel(
                f"127.0.0.1:{port}",
                options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
            ) as channel:
                stub = service_pb2_grpc.PeritoStub(channel)  # type: ignore[no-untyped-call]
                plain = timed_calls(stub, jpegs, args.calls, explain=False)
                explained = timed_calls(stub, jpegs, args.calls, explain=True)
        finally:
            server.stop(10)
    passes = Occlusion().passes
    print(f"forward passes per explained image: {passes}")
    for name, times in (("plain", plain), ("explain", explained)):
        print(
            f"{name:8s} p50 {percentile(times, 50) * 1000:8.1f} ms   "
            f"p99 {percentile(times, 99) * 1000:8.1f} ms   ({len(times)} calls)"
        )
    extra_ms = (percentile(explained, 50) - percentile(plain, 50)) * 1000
    print(f"explaining one image adds {extra_ms:.0f} ms at p50 ({extra_ms / passes:.1f} ms a pass)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
