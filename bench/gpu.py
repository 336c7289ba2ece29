"""Benchmark bulk on a GPU: ResNet-50 from JPEG bytes on a CUDA device, GPU decode and FP16.

In one run, on one CUDA device, the same 640x480 JPEGs (`bench.classify.make_jpegs`), batch
`--batch`, images/s over `--seconds`:

- for each form, FP32 (`torchscript-fp32`, as `selection.load_model` loads model.pt on CUDA)
  and the form a worker serves at `auto` (`reduced_precision.serve_fp16`: `torchscript-fp16`
  where it agrees with FP32 on the held-out images, else FP32 again, with the reason printed):
  - raw: the raw overlapped in-process pipeline (`bench.classify.raw_overlapped`): Pillow
    decodes and resizes on two threads while the previous batch's forward pass runs on the
    device: the reference, as `bench/bulk.py` measures the CPU path;
  - device decode: the worker's GPU path in this process (`imaging_device.prepare_batch` on
    two threads, the bytes already in memory): the JPEGs of a batch decoded together by
    nvJPEG (`torchvision.io.decode_jpeg`) and resized on the device, the quality measures on
    the CPU as the worker takes them (the raw pipeline takes none, as in `bench/bulk.py`), the
    next batch prepared while this one computes;
- with `--job`: `perito worker` on the device (`PERITO_DEVICE=cuda`, `PERITO_BATCH_SIZE` the
  batch, GPU decode on) classifying a job of the JPEGs from a local folder after a warm-up job,
  images/s from the job's start to its end, beside the raw pipeline of the form its log names
  (`bench.bulk`'s stack: redis-server, the worker, `perito serve`).

It prints the device, the decode path (or why JPEGs do not decode there), the FP16 check's
evidence, and how far the device's model inputs are from Pillow's on these JPEGs. The
network's weights are random (seeded: no download), which changes no timing. On a machine
without CUDA it says so and exits 0, nothing measured. No figure of it has been measured yet:
no GPU was lent to the work that wrote it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.bulk import served_form, stack_env, start_stack  # noqa: E402
from bench.classify import (  # noqa: E402
    MODEL,
    machine_line,
    make_jpegs,
    overlapped_rate,
    raw_overlapped,
)
from perito_core.imaging import ImageLimits, load_model_input  # noqa: E402
from perito_core.imaging_device import (  # noqa: E402
    DeviceDecoded,
    decode_device,
    device_decode_refusal,
    prepare_batch,
)
from perito_core.models.engines.base import LoadedModel  # noqa: E402
from perito_core.models.registry import ModelRegistry  # noqa: E402
from perito_core.models.selection import load_model  # noqa: E402
from tests.processes import free_port  # noqa: E402


def publish_resnet50(work: Path) -> ModelRegistry:
    """torchvision's ResNet-50 (random weights, seeded), ImageNet's 224-pixel recipe, as
    MODEL version 1 in `work/registry`."""
    import torchvision

    from perito_training.export import export_torchscript
    from perito_training.pretrained import EFFICIENTNET_LITE0_INPUT

    torch.manual_seed(0)
    network = torchvision.models.resnet50(weights=None).eval()
    contract = EFFICIENTNET_LITE0_INPUT.model_copy(
        update={"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    )
    path = work / "model.pt"
    export_torchscript(network, contract, path)
    registry = ModelRegistry.open(str(work / "registry"), cache_dir=work / "cache")
    labels = [f"class-{i}" for i in range(1000)]
    registry.publish(MODEL, path, labels=labels, input=contract)
    return registry


def device_pipeline(
    model: LoadedModel, jpegs: list[bytes], batch: int, seconds: float, device: torch.device
) -> float:
    """Images/s of the worker's GPU path in this process: `batch` JPEGs through
    `prepare_batch` on two threads (decoded together on `device`, the rest by Pillow), the
    next batch prepared while this one's forward pass runs, for `seconds`."""
    spec, limits = model.manifest.input.spec(), ImageLimits()
    cursor = [0]

    def prepare(fetched: Callable[[], bytes], decoded: DeviceDecoded | None) -> np.ndarray:
        if decoded is not None:
            return decoded.with_quality(spec)[0]
        return load_model_input(fetched(), spec, limits)

    def submit(pool: ThreadPoolExecutor) -> list[Future[np.ndarray]]:
        start = cursor[0]
        cursor[0] = (start + batch) % len(jpegs)
        datas = [jpegs[(start + i) % len(jpegs)] for i in range(batch)]
        fetches = [(lambda d=d: d) for d in datas]
        return prepare_batch(pool, fetches, [prepare] * batch, spec, limits, device)

    return overlapped_rate(model, submit, seconds)


def input_differences(model: LoadedModel, jpegs: list[bytes], device: torch.device) -> str:
    """How far the device path's model inputs are from Pillow's on `jpegs`, in grey levels:
    the largest mean over an image and the largest single difference."""
    from perito_core.imaging_device import decode_jpeg_batch, inspect_jpeg

    spec = model.manifest.input.spec()
    means, largest, left = [], 0, 0
    for data in jpegs:
        header = inspect_jpeg(data)
        if isinstance(header, str):
            left += 1
            continue
        (decoded,) = decode_jpeg_batch([(data, header)], spec, device)
        if decoded is None:
            left += 1
            continue
        diff = np.abs(decoded.pixels.astype(int) - load_model_input(data, spec).astype(int))
        means.append(float(diff.mean()))
        largest = max(largest, int(diff.max()))
    return (
        f"{len(means)} JPEGs decoded on {device}, {left} left to Pillow; model inputs against "
        f"Pillow's: mean difference up to {max(means, default=0):.2f} grey levels, largest "
        f"{largest}"
    )


def run_job(work: Path, jpegs: list[bytes], batch: int) -> tuple[float, str, int]:
    """A job of `jpegs` from a local folder through `perito worker` on the CUDA device (GPU
    decode on, `auto`, batch `batch`), after a 20-image warm-up job: (images/s from the job's
    start to its end, the form and batch size the worker's log names)."""
    import perito

    photos = work / "job"
    photos.mkdir()
    for index, data in enumerate(jpegs):
        (photos / f"{index:05d}.jpg").write_bytes(data)
    redis_port, port = free_port(), free_port()
    env = stack_env(work, redis_port, "auto", str(batch))
    worker_env = {**env, "PERITO_DEVICE": "cuda", "PERITO_POOL": "solo", "PERITO_GPU_DECODE": "1"}
    processes = start_stack(work, {**env, "PERITO_DEVICE": "cpu"}, worker_env, redis_port, port)
    try:
        with perito.Client(f"127.0.0.1:{port}", timeout=600) as client:
            client.submit_job([str(p) for p in sorted(photos.iterdir())[:20]], model=MODEL).wait()
            job = client.submit_job(photos, model=MODEL).wait()
            assert job.succeeded == len(jpegs), job
            span = (job.finished - job.started).total_seconds()  # type: ignore[operator]
    finally:
        for process in reversed(processes):
            process.stop(60)
    form, worker_batch = served_form(work / "worker.log")
    return len(jpegs) / span, form, worker_batch


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=512, help="distinct JPEGs")
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--job", action="store_true", help="also a job through perito worker")
    args = parser.parse_args()

    print(machine_line())
    if not torch.cuda.is_available():
        print("# no CUDA device here (torch.cuda.is_available() is False): nothing measured")
        return 0
    device = torch.device("cuda")
    print(
        f"# device: {torch.cuda.get_device_name(device)}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}); batch {args.batch}, {args.images} 640x480 JPEGs"
    )
    refusal = device_decode_refusal(str(device))
    print(f"# decode path: {refusal or 'nvJPEG on the device (torchvision.io.decode_jpeg)'}")

    from perito_core.models.reduced_precision import serve_fp16

    with tempfile.TemporaryDirectory(prefix="perito-gpu-bench-") as tmp:
        work = Path(tmp)
        jpegs = make_jpegs(work, args.images)
        registry = publish_resnet50(work)
        warm = (args.batch,)
        fp32 = load_model(registry, MODEL, "1", precision="torchscript", device="cuda")
        fp32.warm(warm)
        served = serve_fp16(fp32, warm)
        for form, reason in served.passed_over.items():
            print(f"# {form} passed over: {reason}")
        forms = [fp32] if served is fp32 else [fp32, served]
        decoding = decode_device(True, device, fp32.manifest.input.spec())
        if decoding is not None:
            print(f"# {input_differences(fp32, jpegs[:64], decoding)}")
        print("| form | decode | images/s | ratio to raw of the form |")
        print("|---|---|---|---|")
        raws: dict[str, float] = {}
        for model in forms:
            raw = raw_overlapped(model, jpegs, args.batch, args.seconds)
            raws[model.form] = raw
            print(f"| {model.form} | Pillow on 2 CPU threads (raw, reference) | {raw:.1f} | 1.00 |")
            if decoding is not None:
                rate = device_pipeline(model, jpegs, args.batch, args.seconds, decoding)
                print(
                    f"| {model.form} | {device} (worker's path) | {rate:.1f} | {rate / raw:.2f} |"
                )
        del forms, served, fp32
        torch.cuda.empty_cache()
        if args.job:
            started = time.monotonic()
            rate, form, batch = run_job(work, jpegs, args.batch)
            raw = raws.get(form, float("nan"))
            print(
                f"| {form} | perito worker job, batch {batch} "
                f"({time.monotonic() - started:.0f} s with start-up) | {rate:.1f} | "
                f"{rate / raw:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
