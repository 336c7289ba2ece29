"""The same network as TorchScript (`model.pt`) and as an imported ONNX model, side by side.

ImageNet EfficientNet-Lite0 (real weights) is exported twice: as Perito's TorchScript artifact
(uint8 in, normalisation and softmax inside) and, with `torch.onnx.export`, as an ONNX graph
that takes NCHW float32 already normalised and returns logits, the way a model trained
elsewhere arrives. Both are published into a temporary registry and loaded by
`perito_core.models.selection.load_model`, as the server and the workers load them; then, in
one run:

- agreement: top-1 (with its 95% lower bound) and the largest probability difference on the
  gate's 240 held-out images (`perito_core.models.gate_images`: framings of the sample photos
  and generated scenes), prepared once by the shared `load_model_input`;
- speed: `predict` (contract normalisation + forward + softmax) images/s at batch 1, 4 and 8,
  and end to end at batch 4 with two threads decoding and resizing 640x480 JPEGs alongside
  (as the server's decode pool does); interleaved rounds, the median kept.

Usage: .venv/bin/python bench/onnx_forms.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.classify import forward_rate, machine_line, make_jpegs  # noqa: E402
from perito_core.imaging import load_model_input  # noqa: E402
from perito_core.models.engines.base import LoadedModel  # noqa: E402
from perito_core.models.engines.onnxruntime import export_onnx  # noqa: E402
from perito_core.models.gate_images import gate_images  # noqa: E402
from perito_core.models.manifest import TensorContract  # noqa: E402
from perito_core.models.registry import ModelRegistry  # noqa: E402
from perito_core.models.selection import load_model  # noqa: E402
from perito_core.stats import wilson_interval  # noqa: E402


def _overlapped_rate(model: LoadedModel, jpegs: list[bytes], seconds: float) -> float:
    """Images/s at batch 4 with the next batch decoding on two threads meanwhile."""
    spec = model.manifest.input.spec()
    batch, cursor = 4, 0
    with ThreadPoolExecutor(2) as pool:

        def submit() -> list[Future[np.ndarray]]:
            nonlocal cursor
            start, cursor = cursor, cursor + batch
            return [pool.submit(load_model_input, jpegs[(start + i) % len(jpegs)], spec)
                    for i in range(batch)]  # fmt: skip

        pending = submit()
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            images = np.stack([future.result() for future in pending])
            pending = submit()
            model.predict(images)
            done += batch
        for future in pending:
            future.result()
    return done / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args(argv)

    from perito_training.export import export_torchscript
    from perito_training.pretrained import EFFICIENTNET_LITE0_INPUT, efficientnet_lite0_imagenet

    contract = EFFICIENTNET_LITE0_INPUT
    assert contract.mean is not None and contract.std is not None
    tensor = TensorContract(
        layout="NCHW", scale=1 / 255, mean=contract.mean, std=contract.std, output="logits"
    )
    print(machine_line())
    print("# efficientnet-lite0")
    with tempfile.TemporaryDirectory(prefix="perito-onnx-bench-") as tmp:
        work = Path(tmp)
        network, labels = efficientnet_lite0_imagenet()
        export_torchscript(network, contract, work / "model.pt")
        example = torch.zeros(1, 3, contract.height, contract.width)
        export_onnx(network, example, work / "model.onnx", output_name="logits")
        registry = ModelRegistry.open(str(work / "registry"), cache_dir=work / "cache")
        registry.publish("lite0-ts", work / "model.pt", labels=labels, input=contract)
        registry.publish(
            "lite0-onnx",
            work / "model.onnx",
            labels=labels,
            input=contract,
            artifact_format="onnx",
            tensor=tensor,
        )
        sizes = (1, 4, 8)
        models = {
            "torchscript-fp32 (model.pt)": load_model(
                registry, "lite0-ts", "1", precision="torchscript", warmup_batch_sizes=sizes
            ),
            "onnxruntime-fp32 (model.onnx)": load_model(
                registry, "lite0-onnx", "1", warmup_batch_sizes=sizes
            ),
        }
        spec = contract.spec()
        _, images = gate_images().prepared(spec)
        ts, onnx = (model.predict(images) for model in models.values())
        agreed = int(np.sum(ts.argmax(1) == onnx.argmax(1)))
        print(
            f"\nagreement on the gate's {len(images)} held-out images: top-1 "
            f"{agreed / len(images):.1%} (95% lower bound "
            f"{wilson_interval(agreed, len(images))[0]:.1%}), largest probability difference "
            f"{float(np.abs(ts - onnx).max()):.2e}"
        )
        jpegs = make_jpegs(work / "jpegs", 32)
        rates: dict[str, dict[int, list[float]]] = {n: {b: [] for b in sizes} for n in models}
        overlapped: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for batch in sizes:
                for name, model in models.items():
                    rates[name][batch].append(forward_rate(model, images[:batch], args.seconds))
            for name, model in models.items():
                overlapped[name].append(_overlapped_rate(model, jpegs, args.seconds))
        base = next(iter(models))
        columns = " | ".join(f"predict b{b}" for b in sizes)
        print(f"\n| form (images/s) | {columns} | b4 vs TorchScript | JPEGs end to end b4 |")
        print("|---|" + "---|" * (len(sizes) + 2))
        for name in models:
            medians = [statistics.median(rates[name][b]) for b in sizes]
            ratio = medians[1] / statistics.median(rates[base][4])
            cells = " | ".join(f"{m:.1f}" for m in medians)
            end_to_end = statistics.median(overlapped[name])
            print(f"| {name} | {cells} | {ratio:.2f}x | {end_to_end:.1f} |")
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
