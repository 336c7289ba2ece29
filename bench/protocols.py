"""Benchmark the front doors against each other: perito.v1 `Classify`, the Open Inference
Protocol over gRPC (`ModelInfer`), the HTTP JSON API (`POST /v1/models/{m}:classify`) and OIP
over HTTP (binary tensors), one `perito serve` (gRPC and `--http-port`) in its own process,
measured in the same run on the same machine.

Each door gets `--callers` concurrent callers (16 by default) in this process, one
640x480 JPEG per request, for `--seconds`, in `--rounds` interleaved rounds (so drift in the
machine's load hits every door alike); the figure is the mean images/s over the rounds (and
the range of the per-round ratios to that round's `Classify`), with p50 / p99 latency, the
server process's CPU time per image (user + system, all threads, from /proc: on a shared
machine the rates move with other load, the CPU cost per image much less, so it says what each
door itself costs) and this process's (the callers'). Callers: grpc.aio stubs for both gRPC doors
(the OIP one sends `raw_input_contents`, as tritonclient does), aiohttp for HTTP (JSON with
base64 images; OIP binary with `Inference-Header-Content-Length`; aiohttp's C parser keeps
the callers' own CPU, which shares the machine with the server, near gRPC's). Every answer is
checked: its top-1 class must be the one the published model gives that JPEG in this process
(a wrong answer is counted, not taken as throughput; a malformed one stops the run).
Targets: each door >= 0.9 x `Classify`, and no wrong answer from any door; exits 1 when one
is missed.

    .venv/bin/python bench/protocols.py            # EfficientNet-Lite0, 16 callers
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import struct
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.classify import MODEL, drive, machine_line, make_jpegs, publish  # noqa: E402
from bench.targets import report  # noqa: E402
from perito.v1 import classify_pb2, image_pb2, service_pb2_grpc  # noqa: E402
from perito_core.imaging import load_model_input  # noqa: E402
from perito_core.models.engines.torchscript import TorchScriptModel  # noqa: E402
from perito_core.models.registry import ModelRegistry  # noqa: E402
from perito_server._oip import grpc_service_pb2 as oip_pb2  # noqa: E402
from tests.processes import Proc, free_port, wait_for_port  # noqa: E402

Call = Callable[[int], Awaitable[bool]]

# An answer is right when its top-1 class is one the model, run in this process, gives within
# this much of its own top-1 probability (batching may reorder a near tie, nothing more).
TIE = 1e-3


def expected_answers(
    registry: ModelRegistry, jpegs: list[bytes]
) -> tuple[list[set[int]], list[str]]:
    """For each JPEG, the class indices a right answer may name first (`TIE`), from the
    published model run in this process; and the model's labels."""
    artifact = registry.fetch(MODEL, "1")
    model = TorchScriptModel.load(artifact.path, artifact.manifest, warmup_batch_sizes=(1,))
    spec = artifact.manifest.input.spec()
    right = []
    for data in jpegs:
        probabilities = model.predict(load_model_input(data, spec)[None])[0]
        right.append(set(np.flatnonzero(probabilities >= probabilities.max() - TIE).tolist()))
    return right, list(artifact.manifest.labels)


def top_class(raw: bytes, classes: int) -> int:
    """The most probable class in one image's `probabilities` (little-endian FP32, [1, C])."""
    probabilities = np.frombuffer(raw, dtype="<f4")
    if probabilities.size != classes:
        return -1
    return int(probabilities.argmax())


async def measure(
    grpc_target: str,
    http_base: str,
    jpegs: list[bytes],
    callers: int,
    seconds: float,
    rounds: int,
    server_pid: int,
    right: list[set[int]],
    labels: list[str],
) -> dict[str, list[dict[str, float]]]:
    """Each door driven (`drive`) in interleaved rounds; every answer's top-1 class checked
    against `right` (per JPEG), a wrong one counted in `wrong_answers`."""
    classify = [
        classify_pb2.ClassifyRequest(model=MODEL, images=[image_pb2.Image(id=str(i), content=d)])
        for i, d in enumerate(jpegs)
    ]
    infer = [
        oip_pb2.ModelInferRequest(
            model_name=MODEL,
            inputs=[oip_pb2.ModelInferRequest.InferInputTensor(
                name="images", datatype="BYTES", shape=[1]
            )],
            outputs=[oip_pb2.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")],
            raw_input_contents=[struct.pack("<I", len(d)) + d],
        )
        for d in jpegs
    ]  # fmt: skip
    bodies = [
        json.dumps({"images": [{"content": base64.b64encode(d).decode(), "id": str(i)}]})
        for i, d in enumerate(jpegs)
    ]
    headers = [
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 4 + len(d)},
                    }
                ],
                "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
            }
        ).encode()
        for d in jpegs
    ]
    connector = aiohttp.TCPConnector(limit=callers)
    async with (
        grpc.aio.insecure_channel(grpc_target) as channel,
        aiohttp.ClientSession(
            http_base, connector=connector, timeout=aiohttp.ClientTimeout(total=60)
        ) as http,
    ):
        perito_stub = service_pb2_grpc.PeritoStub(channel)
        model_infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=oip_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=oip_pb2.ModelInferResponse.FromString,
        )

        def named_right(index: int, label: str) -> bool:
            return label in {labels[c] for c in right[index % len(jpegs)]}

        async def call_classify(index: int) -> bool:
            answer = await perito_stub.Classify(classify[index % len(jpegs)], timeout=60)
            [result] = answer.results
            return named_right(index, result.predictions[0].label)

        async def call_oip_grpc(index: int) -> bool:
            answer = await model_infer(infer[index % len(jpegs)], timeout=60)
            found = top_class(answer.raw_output_contents[0], len(labels))
            return found in right[index % len(jpegs)]

        async def call_json(index: int) -> bool:
            async with http.post(
                f"/v1/models/{MODEL}:classify",
                data=bodies[index % len(jpegs)],
                headers={"content-type": "application/json"},
            ) as response:
                response.raise_for_status()
                [result] = (await response.json())["results"]
            return named_right(index, result["predictions"][0]["label"])

        async def call_oip_http(index: int) -> bool:
            data = jpegs[index % len(jpegs)]
            header = headers[index % len(jpegs)]
            async with http.post(
                f"/v2/models/{MODEL}/infer",
                data=header + struct.pack("<I", len(data)) + data,
                headers={
                    "content-type": "application/octet-stream",
                    "inference-header-content-length": str(len(header)),
                },
            ) as response:
                response.raise_for_status()
                body = await response.read()
                length = int(response.headers["Inference-Header-Content-Length"])
            [output] = json.loads(body[:length])["outputs"]
            found = top_class(body[length:], len(labels))
            return output["name"] == "probabilities" and found in right[index % len(jpegs)]

        doors: dict[str, Call] = {
            "perito.v1 Classify (gRPC)": call_classify,
            "OIP ModelInfer (gRPC)": call_oip_grpc,
            "JSON API classify (HTTP)": call_json,
            "OIP infer, binary (HTTP)": call_oip_http,
        }
        figures: dict[str, list[dict[str, float]]] = {name: [] for name in doors}
        for round_index in range(rounds):
            order = list(doors.items())
            if round_index % 2:
                order.reverse()
            for name, call in order:
                figures[name].append(await drive(call, callers, seconds, server_pid))
                print(f"# round {round_index + 1}: {name}: "
                      f"{figures[name][-1]['images_per_s']:.1f} images/s, "
                      f"{figures[name][-1]['wrong_answers']:.0f} wrong", flush=True)  # fmt: skip
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", choices=["efficientnet-lite0", "resnet18"], default="efficientnet-lite0"
    )
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0, help="per door and round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--images", type=int, default=48, help="distinct JPEGs to cycle through")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    print(machine_line())
    print(
        f"# {args.arch}, 640x480 JPEGs, one per request, {args.callers} callers, "
        f"{args.rounds} x {args.seconds:g} s per door"
    )
    with tempfile.TemporaryDirectory(prefix="perito-bench-") as tmp:
        work = Path(tmp)
        jpegs = make_jpegs(work, args.images)
        right, labels = expected_answers(publish(args.arch, work), jpegs)
        port, http_port = free_port(), free_port()
        env = {
            **os.environ,
            "PERITO_REGISTRY": str(work / "registry"),
            "PERITO_CACHE_DIR": str(work / "server-cache"),
            "PYTHONUNBUFFERED": "1",
        }
        command = [
            str(Path(sys.executable).parent / "perito"), "serve", "--port", str(port),
            "--http-port", str(http_port), "--preload", MODEL, "--log-level", "WARNING",
        ]  # fmt: skip
        server = Proc("perito serve", command, env, work / "serve.log", "HTTP on").start()
        try:
            wait_for_port(http_port, process=server)
            figures = asyncio.run(
                measure(
                    f"127.0.0.1:{port}",
                    f"http://127.0.0.1:{http_port}",
                    jpegs,
                    args.callers,
                    args.seconds,
                    args.rounds,
                    server.pid,
                    right,
                    labels,
                )
            )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)

    def mean(runs: list[dict[str, float]], key: str) -> float:
        return sum(run[key] for run in runs) / len(runs)

    reference = mean(figures["perito.v1 Classify (gRPC)"], "images_per_s")
    reference_cpu = mean(figures["perito.v1 Classify (gRPC)"], "server_cpu_ms_per_image")
    print(
        f"\n| door, {args.callers} callers | images/s | p50 ms | p99 ms | ratio to Classify "
        "(rounds' range) "
        "| server CPU ms / image | ratio to Classify | callers' CPU ms / image |"
    )
    print("|---|---|---|---|---|---|---|---|")
    targets = []
    for name, runs in figures.items():
        rate = mean(runs, "images_per_s")
        cpu = mean(runs, "server_cpu_ms_per_image")
        per_round = [
            run["images_per_s"] / classify["images_per_s"]
            for run, classify in zip(runs, figures["perito.v1 Classify (gRPC)"], strict=True)
        ]
        print(
            f"| {name} | {rate:.1f} | {mean(runs, 'p50_ms'):.1f} | {mean(runs, 'p99_ms'):.1f} "
            f"| {rate / reference:.2f} ({min(per_round):.2f}-{max(per_round):.2f}) "
            f"| {cpu:.1f} | {cpu / reference_cpu:.2f} "
            f"| {mean(runs, 'caller_cpu_ms_per_image'):.1f} |"
        )
        wrong = sum(run["wrong_answers"] for run in runs)
        targets.append((f"{name}: {wrong:.0f} wrong answers (target 0)", wrong == 0))
        if not name.startswith("perito.v1"):
            ratio = f"{name}: {rate / reference:.2f} x Classify (target >= 0.90)"
            targets.append((ratio, rate >= 0.9 * reference))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"arch": args.arch, **figures}, indent=2))
    print()
    return report(targets)


if __name__ == "__main__":
    sys.exit(main())
