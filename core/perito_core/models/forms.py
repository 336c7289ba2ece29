"""Choose, verify and load the form of a model version that serves on this machine.

A version's `model.pt` (TorchScript FP32) is the reference; its manifest may list compiled
forms (OpenVINO IR in FP32, BF16 or INT8) that passed the accuracy gate at publish
(`perito_core.models.compile`). `load_model` honours `PERITO_PRECISION`:

- `auto`: every compiled form this CPU can run is loaded and timed on a short warm-up at the
  largest batch the caller will use; the fastest serves. Measured rather than ruled, because
  the order changes with the silicon and the network: on an AMX Xeon OpenVINO INT8 ran
  ResNet-18 at 8x TorchScript and BF16 at 4.8x (shared/PERFORMANCE.md); on an AVX2-only EPYC
  (no VNNI, no BF16) INT8 gains only about 1.2-1.4x over OpenVINO FP32 (README), and a
  partly quantized network (depthwise convolutions kept FP32) may not beat FP32 at all.
- `fp32` / `bf16` / `int8`: that precision's compiled form (`fp32` without one: TorchScript).
- `torchscript`: the reference itself.

Every compiled file is sha256-verified before it loads, like `model.pt`; a form that is
missing, tampered with, needs CPU features this machine lacks, or fails to load or to honour
the contract is passed over with a logged reason, and TorchScript answers when none is left.
OpenVINO is optional (`perito[serve]` pins it): without it every version serves TorchScript.

A version imported from ONNX (`artifact.format == "onnx"`) has no `model.pt`: its verified
`model.onnx` is the reference and the only form, served by ONNX Runtime on the CPU
(`perito_core.models.onnx_model.OnnxModel`, form `onnxruntime-fp32`) whatever the precision asked.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perito_core.errors import InvalidArgument, ModelLoadError, PeritoError
from perito_core.models.calibration import rescale
from perito_core.models.manifest import PRECISIONS, CompiledForm, ModelManifest
from perito_core.models.registry import LocalArtifact, ModelRegistry
from perito_core.models.runtime import LoadedModel, pick_device

log = logging.getLogger(__name__)

# From the least exact choice to the most: `auto` lets INT8 serve; `torchscript` is model.pt.
EXACTNESS = {"auto": 0, "int8": 1, "bf16": 2, "fp32": 3, "torchscript": 4}


def requested_precision(requested: str, default: str) -> str:
    """The precision to serve one request with: the caller's `requested` one, or the server's
    `default` (`PERITO_PRECISION`) when it asks for none.

    A caller may ask only for a form at least as exact as the server's setting (issue 19:
    operators choose speed, a caller who needs exactness opts into it): `fp32` or
    `torchscript` on a server set to `auto` or `int8`, never `int8` on one set to `fp32`.

    Raises:
        InvalidArgument: (field `precision`) not a precision, or less exact than `default`.
    """
    if not requested or requested == default:
        return default
    if requested not in EXACTNESS:
        raise InvalidArgument(
            f"precision must be one of {', '.join(PRECISIONS)}, or empty for the server's "
            f"({default})",
            field="precision",
        )
    if EXACTNESS[requested] < EXACTNESS[default]:
        raise InvalidArgument(
            f"precision {requested} is less exact than this server's {default}: a request may "
            "ask only for a more exact form",
            field="precision",
        )
    return requested


# Flags worth printing beside a benchmark: what makes INT8 and BF16 fast on x86.
ISA_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)

# Seconds of timed warm-up per form when `auto` chooses.
AUTO_TIMING_S = 0.6


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def isa_summary() -> str:
    """The inference-relevant ISA flags this CPU reports, e.g. `avx2 avx512_vnni amx_tile`."""
    flags = cpu_flags()
    present = [flag for flag in ISA_FLAGS if flag in flags]
    return " ".join(present) or "none of " + " ".join(ISA_FLAGS)


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__)


def unsupported_reason(form: CompiledForm) -> str | None:
    """Why this machine cannot run `form` at its precision, or None when it can."""
    if form.engine == "openvino" and openvino_version() is None:
        return "OpenVINO is not installed (pip install 'perito[serve]')"
    if form.engine == "onnxruntime":
        from perito_core.models.onnx_model import onnxruntime_version

        if onnxruntime_version() is None:
            return "ONNX Runtime is not installed (pip install 'perito[serve]')"
    if form.requires and not cpu_flags() & set(form.requires):
        return f"this CPU lacks {' or '.join(form.requires)} (has: {isa_summary()})"
    return None


class OpenVinoModel(LoadedModel):
    """A compiled OpenVINO IR form: the same contract, compiled for this CPU at load.

    The IR holds no ISA-specific code: `compile_model` picks oneDNN kernels for the CPU it runs
    on, so a form built on one machine loads on any x86-64 CPU. The precision hint is always
    explicit: on CPUs with BF16 OpenVINO would otherwise run an FP32 or INT8 IR's float parts
    in BF16, which is not what the accuracy gate measured.

    A form whose calibration was re-fitted at publish (`CompiledForm.temperature`,
    `confidence_threshold`) serves `softmax(log(p) / temperature)` of the IR's probabilities
    p, and its `manifest` carries the form's `uncertain` threshold in place of the version's,
    so the server and the workers apply the served form's own.
    """

    def __init__(self, manifest: ModelManifest, form: CompiledForm, xml: Path) -> None:
        import openvino

        super().__init__(None, manifest.served_by(form), torch.device("cpu"))  # type: ignore[arg-type]
        self.temperature = form.temperature
        core = openvino.Core()
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if form.precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": max(1, torch.get_num_threads()),
        }
        self._compiled = core.compile_model(str(xml), "CPU", config)
        self._request = self._compiled.create_infer_request()
        self.form = form.name

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        result = self._request.infer([np.ascontiguousarray(batch.numpy())])
        probabilities = np.array(result[0], dtype=np.float32, copy=True)
        return torch.from_numpy(rescale(probabilities, self.temperature))


def load_form(registry: ModelRegistry, manifest: ModelManifest, form: CompiledForm) -> LoadedModel:
    """Fetch, verify, compile and check one compiled form.

    Raises:
        PeritoError: a file is missing or tampered with, or the form breaks the contract.
    """
    reason = unsupported_reason(form)
    if reason is not None:
        raise ModelLoadError(reason)
    local = registry.fetch_form(manifest, form.name)
    suffix = ".onnx" if form.engine == "onnxruntime" else ".xml"
    path = next((path for path in local.paths if path.suffix == suffix), None)
    if path is None:
        raise ModelLoadError(f"{form.name} lists no {suffix} file")
    if form.engine == "onnxruntime":
        from perito_core.models.onnx_model import OnnxModel

        return OnnxModel.open_form(path, manifest, form)
    try:
        model = OpenVinoModel(manifest, form, path)
    except Exception as exc:  # noqa: BLE001 - any engine failure here is a bad or foreign form
        raise ModelLoadError(f"{form.name} does not compile here: {exc}") from None
    model._check_output(model._forward(model._random_batch(2)), 2)
    return model


def candidate_forms(manifest: ModelManifest, precision: str) -> list[CompiledForm]:
    """The compiled forms `precision` may serve, most preferred first."""
    if precision == "torchscript":
        return []
    if precision == "auto":
        return list(manifest.forms)
    return [form for form in manifest.forms if form.precision == precision]


def load_model(
    registry: ModelRegistry,
    name: str,
    version: str,
    *,
    precision: str = "auto",
    device: str = "auto",
    optimize: bool = True,
    warmup_batch_sizes: tuple[int, ...] = (1,),
) -> LoadedModel:
    """Load the form of `name@version` that `precision` asks for, falling back to TorchScript.

    `model.pt` is always fetched and verified (it is the fallback and the reference); compiled
    forms only serve on the CPU. The returned model says which form it is (`model.form`) and
    why others were passed over (`model.passed_over`).

    Raises:
        NotFound, ArtifactIntegrityError, ModelLoadError: as `LoadedModel.load` for model.pt.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    start = time.perf_counter()
    artifact = registry.fetch(name, version)
    manifest = artifact.manifest
    if manifest.artifact.format == "onnx":
        return _load_onnx(artifact, precision, device, warmup_batch_sizes, start)
    passed_over: dict[str, str] = {}
    loaded: list[LoadedModel] = []
    candidates = candidate_forms(manifest, precision)
    if candidates and pick_device(device).type != "cpu":
        passed_over = {form.name: "compiled forms serve on the CPU only" for form in candidates}
        candidates = []
    for form in candidates:
        try:
            loaded.append(load_form(registry, manifest, form))
        except PeritoError as error:
            passed_over[form.name] = error.message
            log.warning("%s@%s: not serving %s: %s", name, version, form.name, error.message)
    chosen: LoadedModel | None = None
    if len(loaded) == 1:
        chosen = loaded[0]
    elif loaded:
        batch = max(warmup_batch_sizes)
        rates = {model.form: _images_per_second(model, batch) for model in loaded}
        chosen = max(loaded, key=lambda model: rates[model.form])
        summary = ", ".join(f"{form} {rate:.0f}" for form, rate in rates.items())
        log.info("%s@%s: images/s at batch %d: %s", name, version, batch, summary)
        passed_over.update(
            {
                m.form: f"slower here ({rates[m.form]:.0f} images/s)"
                for m in loaded
                if m is not chosen
            }
        )
    if chosen is None:
        if candidates:
            log.warning("%s@%s: no compiled form loads; serving TorchScript", name, version)
        chosen = LoadedModel.load(
            artifact.path,
            manifest,
            device=device,
            optimize=optimize,
            warmup_batch_sizes=warmup_batch_sizes,
        )
    else:
        for batch_size in warmup_batch_sizes:
            for _ in range(2):
                chosen._forward(chosen._random_batch(batch_size))
    chosen.passed_over = passed_over
    chosen.load_seconds = time.perf_counter() - start
    log.info("%s@%s: serving form %s", name, version, chosen.form)
    return chosen


def _load_onnx(
    artifact: LocalArtifact,
    precision: str,
    device: str,
    warmup_batch_sizes: tuple[int, ...],
    start: float,
) -> LoadedModel:
    """An imported ONNX version: its one form, whatever `precision` asked, on the CPU."""
    from perito_core.models.onnx_model import OnnxModel

    manifest = artifact.manifest
    model = OnnxModel.open(artifact.path, manifest, warmup_batch_sizes=warmup_batch_sizes)
    label = f"{manifest.name}@{manifest.version}"
    if precision not in ("auto", "fp32"):
        model.passed_over[precision] = "an imported ONNX model has only its own form"
        log.info("%s: precision %s asked; an ONNX model serves as imported", label, precision)
    if pick_device(device).type != "cpu":
        model.passed_over[str(pick_device(device))] = "ONNX models serve on the CPU"
        log.info("%s: ONNX Runtime serves on the CPU, not %s", label, device)
    model.load_seconds = time.perf_counter() - start
    log.info("%s: serving form %s", label, model.form)
    return model


def _images_per_second(model: LoadedModel, batch_size: int) -> float:
    """A short timed run at `batch_size` after one untimed batch."""
    images = model._random_batch(batch_size)
    model._forward(images)
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < AUTO_TIMING_S or done < 2 * batch_size:
        model._forward(images)
        done += batch_size
    return done / elapsed
