"""INT8 by plain NNCF post-training quantization against INT8 with NNCF's accuracy control.

For each network (ImageNet EfficientNet-Lite0 with its real weights; ResNet-18 with random
weights), in one run:

- build FP32 and plain post-training INT8 with `perito_core.models.gate.build_forms`, then INT8
  by `nncf.quantize_with_accuracy_control` for each `--control` metric (`agreement`: top-1
  agreement with the FP32 IR at least 99%; `fidelity`: its largest probability difference
  under 0.01 on average), tuned on the calibration images (the gate's 200, framings of other
  scikit-image pictures and generated scenes: `perito_core.models.gate_images`); the gate's
  figure, agreement with `model.pt` and its 95% lower bound, is measured on the 240 held-out
  framings of the six sample photos and other scenes, which no quantization saw;
- time the forward pass of FP32, plain INT8 and each controlled INT8 as the server compiles them
  (`perito_core.models.engines.openvino.OpenVinoModel`), at batch 1 and 8, in interleaved
  rounds (the median kept, every round printed) with the load average beside them: the
  machine is shared.

With `--model RUN_DIR` (a finished `perito train` run: its `config.yaml` and `model.pt`)
it gates that model's forms as `perito publish` does (`build_run_forms`: both engines' FP32
and INT8, calibrated on the validation split, gated on the test split with its labels, plain
INT8 first, then OpenVINO's accuracy control when the gate refuses it), prints each form's
agreement, 95% lower bound, accuracy change, FP32 layers and speed-up (or the refusal, with
by how much and why), then times the forms that passed. `--avx2` limits oneDNN (OpenVINO) to
AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`) as on a CPU without VNNI; ONNX Runtime ignores it.
`--import-gate` puts each `--arch` through OpenVINO's gate as `perito models import` does
(plain INT8, then accuracy control, bounded in time, when the gate refuses it), timed.

Usage: .venv/bin/python bench/int8_accuracy.py [--arch efficientnet-lite0,resnet18]
    [--control agreement,fidelity] [--seconds 2] [--rounds 3]
       .venv/bin/python bench/int8_accuracy.py --model runs/fashion-mnist-resnet18 --avx2
       .venv/bin/python bench/int8_accuracy.py --import-gate --arch efficientnet-lite0 --avx2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.classify import forward_rate, machine_line, random_images  # noqa: E402
from perito_core.models.engines import openvino as openvino_engine  # noqa: E402
from perito_core.models.engines import torchscript  # noqa: E402
from perito_core.models.engines.base import LoadedModel  # noqa: E402
from perito_core.models.engines.openvino import OpenVinoModel  # noqa: E402
from perito_core.models.gate import build_forms  # noqa: E402
from perito_core.models.gate_images import gate_images  # noqa: E402
from perito_core.models.manifest import (  # noqa: E402
    Artifact,
    CompiledForm,
    FormFile,
    InputContract,
    ModelManifest,
)
from perito_core.stats import wilson_interval  # noqa: E402


def _network(arch: str, work: Path) -> tuple[Path, InputContract, list[str]]:
    from perito_training.export import export_torchscript
    from perito_training.pretrained import EFFICIENTNET_LITE0_INPUT, efficientnet_lite0_imagenet

    if arch == "efficientnet-lite0":
        network, labels = efficientnet_lite0_imagenet()
        contract = EFFICIENTNET_LITE0_INPUT
    else:
        import torch
        import torchvision

        torch.manual_seed(0)
        network = torchvision.models.resnet18(weights=None).eval()
        labels = [f"class-{i}" for i in range(1000)]
        contract = EFFICIENTNET_LITE0_INPUT.model_copy(
            update={"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
        )
    path = work / f"{arch}.pt"
    export_torchscript(network, contract, path)
    return path, contract, labels


def _controlled(
    path: Path,
    contract: InputContract,
    calibration: np.ndarray,
    holdout: np.ndarray,
    metric: str,
    work: Path,
    key: str,
) -> OpenVinoModel:
    """INT8 by accuracy control (always, whatever plain INT8 scored), its gate figure printed."""
    import openvino

    start = time.perf_counter()
    module = torchscript.load_module(path)
    reference = torchscript.reference_probabilities(module, holdout)
    quantized = openvino_engine.quantize(
        openvino_engine.convert(module, contract),
        calibration,
        validation=calibration,
        min_agreement=0.99,
        metric=metric,
    )
    folder = work / key
    folder.mkdir(exist_ok=True)
    openvino.save_model(quantized, str(folder / "model.xml"), compress_to_fp16=False)
    took = time.perf_counter() - start
    compiled = openvino.Core().compile_model(str(folder / "model.xml"), "CPU")
    probabilities = openvino_engine.probabilities(compiled, holdout)
    agreed = int(np.sum(probabilities.argmax(1) == reference.argmax(1)))
    kept = sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize")
    print(
        f"{key}: agreement with model.pt {agreed / len(holdout):.2%} ({agreed}/{len(holdout)}, "
        f"95% lower bound {wilson_interval(agreed, len(holdout))[0]:.2%}), "
        f"max |dp| {float(np.abs(probabilities - reference).max()):.3f}, built in {took:.0f} s, "
        f"{kept} FakeQuantize left"
    )
    form = CompiledForm(
        name="openvino-int8",
        engine="openvino",
        engine_version=openvino.__version__,
        precision="int8",
        files=[FormFile(file="model.xml", sha256="0" * 64, size_bytes=0)],
        agreement=agreed / len(holdout),
        max_abs_diff=0.0,
        images=len(holdout),
    )
    manifest = ModelManifest(
        name=key,
        version="1",
        labels=[str(i) for i in range(reference.shape[1])],
        input=contract,
        artifact=Artifact(sha256="0" * 64, size_bytes=0),
    )
    return OpenVinoModel(manifest, form, folder / "model.xml")


def _import_gate(arch: str, work: Path) -> None:
    """OpenVINO's FP32 and INT8 of `arch` through the gate as `perito models import` builds
    them on the demo's images (200 calibration, 240 held-out), plain INT8 then bounded
    accuracy control when the gate refuses it; the time it took and each form's line."""
    path, contract, _ = _network(arch, work)
    calibration, holdout = gate_images().prepared(contract.spec())
    start = time.perf_counter()
    built = build_forms(
        path,
        contract,
        work / f"{arch}-gate",
        calibration=calibration,
        holdout=holdout,
        evaluated_on="held-out gate images",
        precisions=("fp32", "int8"),
        engines=("openvino",),
        accuracy_control=True,
    )
    print(f"\n## {arch}: built and gated in {time.perf_counter() - start:.0f} s")
    for line in built.summary():
        print(line)
    for form, _ in built.forms:
        if form.precision == "int8":
            print(f"{form.name}: speed-up {form.speedup or 0:.2f}x, FP32 {form.fp32_layers}")
    built.remove_files()


def median_rates(
    models: Mapping[str, LoadedModel], rounds: int, seconds: float, size: int
) -> dict[str, float]:
    """Forward images/s of each model at batch 1 and 8 (keys `"{name} b1"`, `"{name} b8"`),
    the median of `rounds` interleaved rounds of `seconds` each on random `size` x `size`
    images; each round's figures printed with the load average."""
    rates: dict[str, list[float]] = {f"{k} b{b}": [] for k in models for b in (1, 8)}
    for round_ in range(rounds):
        load = os.getloadavg()[0]
        line = []
        for batch in (1, 8):
            for key, model in models.items():
                rate = forward_rate(model, random_images(batch, size), seconds)
                rates[f"{key} b{batch}"].append(rate)
                line.append(f"{key} b{batch} {rate:.1f}")
        print(f"round {round_ + 1} (load average {load:.1f}): " + ", ".join(line))
    return {key: statistics.median(values) for key, values in rates.items()}


def _gate_run(run_dir: Path, seconds: float, rounds: int) -> None:
    """Gate a trained run's FP32 and INT8 forms as `perito publish` does, print the figures,
    then time the forms that passed (interleaved rounds, batch 1 and 8, medians)."""
    from perito_core.models.engines import ENGINES
    from perito_training.pipeline import build_run_forms, load_run

    config, card = load_run(run_dir)
    contract = card.input
    start = time.perf_counter()
    built = build_run_forms(config, contract, run_dir, ("fp32", "int8"))
    print(f"built and gated in {time.perf_counter() - start:.0f} s")
    for form, _ in built.forms:
        if form.precision == "int8":
            print(
                f"{form.name} ({form.quantization}): speed-up {form.speedup or 0:.2f}x its FP32 "
                f"form; FP32 layers {form.fp32_layers}"
            )
    manifest = ModelManifest(
        name=run_dir.name,
        version="1",
        labels=card.labels,
        input=contract,
        artifact=Artifact(sha256="0" * 64, size_bytes=0),
    )
    models: dict[str, LoadedModel] = {
        "torchscript-fp32": torchscript.TorchScriptModel.load(run_dir / "model.pt", manifest)
    }
    for form, folder in built.forms:
        engine = ENGINES[form.engine]
        opened = next(f.file for f in form.files if f.file.endswith(engine.suffix))
        models[form.name] = engine.load(folder / opened, manifest, form)
    median = median_rates(models, rounds, seconds, contract.height)
    print("| form | b1 images/s | b8 images/s | b8 vs TorchScript |")
    print("|---|---|---|---|")
    for key in models:
        b1, b8 = median[f"{key} b1"], median[f"{key} b8"]
        print(f"| {key} | {b1:.0f} | {b8:.0f} | {b8 / median['torchscript-fp32 b8']:.2f}x |")
    built.remove_files()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="efficientnet-lite0,resnet18")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--control", default="agreement,fidelity", help="accuracy control metrics to build"
    )
    parser.add_argument("--model", type=Path, help="a perito train run folder to gate")
    parser.add_argument(
        "--avx2", action="store_true", help="limit oneDNN (OpenVINO) to AVX2, as without VNNI"
    )
    parser.add_argument(
        "--import-gate",
        action="store_true",
        help="gate each --arch as perito models import does, with accuracy control, timed",
    )
    args = parser.parse_args()
    if args.avx2:  # before OpenVINO is first imported (it reads it once)
        os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    print(machine_line() + f"; ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}")
    if args.model is not None:
        _gate_run(args.model, args.seconds, args.rounds)
        return
    if args.import_gate:
        with tempfile.TemporaryDirectory() as tmp:
            for arch in args.arch.split(","):
                _import_gate(arch, Path(tmp))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for arch in args.arch.split(","):
            path, contract, labels = _network(arch, work)
            calibration, holdout = gate_images().prepared(contract.spec())
            print(f"\n## {arch}: {len(calibration)} calibration, {len(holdout)} held-out images")
            models: dict[str, OpenVinoModel] = {}
            manifest = ModelManifest(
                name=arch,
                version="1",
                labels=labels,
                input=contract,
                artifact=Artifact(sha256="0" * 64, size_bytes=0),
            )
            start = time.perf_counter()
            built = build_forms(
                path,
                contract,
                work / arch,
                calibration=calibration,
                holdout=holdout,
                evaluated_on="held-out gate images",
                precisions=("fp32", "int8"),
                min_agreement=0.0,  # printed here, not gated
                accuracy_control=False,
            )
            took = time.perf_counter() - start
            for form, folder in built.forms:
                key = "fp32" if form.precision == "fp32" else "int8-plain"
                print(
                    f"{key}: agreement with model.pt {form.agreement:.2%} "
                    f"({round(form.agreement * form.images)}/{form.images}, "
                    f"95% lower bound {form.agreement_lower or 0:.2%}), "
                    f"max |dp| {form.max_abs_diff:.3f}"
                    + (f", built in {took:.0f} s" if key != "fp32" else "")
                )
                models[key] = OpenVinoModel(manifest, form, folder / "model.xml")
            for metric in args.control.split(","):
                key = f"int8-{metric}"
                models[key] = _controlled(path, contract, calibration, holdout, metric, work, key)
            median = median_rates(models, args.rounds, args.seconds, contract.height)
            print("| form | b1 images/s | b8 images/s | b1 vs fp32 | b8 vs fp32 |")
            print("|---|---|---|---|---|")
            for key in models:
                b1, b8 = median[f"{key} b1"], median[f"{key} b8"]
                print(
                    f"| {key} | {b1:.1f} | {b8:.1f} | {b1 / median['fp32 b1']:.2f}x "
                    f"| {b8 / median['fp32 b8']:.2f}x |"
                )


if __name__ == "__main__":
    main()
