"""Choose, verify and load the form of a model version that serves on this machine.

A version's `model.pt` (TorchScript FP32) is the reference; its manifest may list compiled
forms (OpenVINO IR in FP32, BF16 or INT8; ONNX Runtime in FP32 or INT8) that passed the
accuracy gate at publish (`perito_core.models.gate`). `load_model` honours `PERITO_PRECISION`:

- `auto`: every compiled form this CPU can run is loaded and timed on a short warm-up at the
  largest batch the caller will use; the fastest serves. Measured rather than ruled, because
  the order changes with the silicon and the network: on an AMX Xeon OpenVINO INT8 ran
  ResNet-18 at 8x TorchScript and BF16 at 4.8x; on an AVX2-only EPYC (no VNNI, no BF16) INT8
  gains only about 1.2-1.4x over OpenVINO FP32 (README), and a partly quantized network
  (depthwise convolutions kept FP32) may not beat FP32 at all.
- `fp32` / `bf16` / `int8`: that precision's compiled form (`fp32` without one: TorchScript).
- `torchscript`: the reference itself.

Every compiled file is sha256-verified before it loads, like `model.pt`; a form that is
missing, tampered with, needs CPU features this machine lacks, or fails to load or to honour
the contract is passed over with a logged reason, and TorchScript answers when none is left.
The engines are optional (`perito[serve]` pins them): without them every version serves
TorchScript. Each form is opened by its engine (`perito_core.models.engines.ENGINES`).

A version imported from ONNX (`artifact.format == "onnx"`) has no `model.pt`: its verified
`model.onnx` is the reference and the only form, served by ONNX Runtime on the CPU
(`perito_core.models.engines.onnxruntime.OnnxModel`, form `onnxruntime-fp32`) whatever the
precision asked.
"""

from __future__ import annotations

import logging
import time

from perito_core.errors import InvalidArgument, ModelLoadError, PeritoError
from perito_core.models.engines import ENGINES, unsupported_reason
from perito_core.models.engines.base import LoadedModel, pick_device
from perito_core.models.engines.onnxruntime import OnnxModel
from perito_core.models.engines.torchscript import TorchScriptModel
from perito_core.models.manifest import PRECISIONS, CompiledForm, ModelManifest
from perito_core.models.registry import LocalArtifact, ModelRegistry

log = logging.getLogger(__name__)

# From the least exact choice to the most: `auto` lets INT8 serve; `torchscript` is model.pt.
EXACTNESS = {"auto": 0, "int8": 1, "bf16": 2, "fp32": 3, "torchscript": 4}


def requested_precision(requested: str, default: str) -> str:
    """The precision to serve one request with: the caller's `requested` one, or the server's
    `default` (`PERITO_PRECISION`) when it asks for none.

    A caller may ask only for a form at least as exact as the server's setting (operators
    choose speed, a caller who needs exactness opts into it): `fp32` or
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


# Seconds of timed warm-up per form when `auto` chooses.
AUTO_TIMING_S = 0.6


def load_form(registry: ModelRegistry, manifest: ModelManifest, form: CompiledForm) -> LoadedModel:
    """Fetch, verify, open and check one compiled form, by its engine.

    Raises:
        PeritoError: a file is missing or tampered with, or the form breaks the contract.
    """
    reason = unsupported_reason(form)
    if reason is not None:
        raise ModelLoadError(reason)
    local = registry.fetch_form(manifest, form.name)
    engine = ENGINES[form.engine]
    path = next((path for path in local.paths if path.suffix == engine.suffix), None)
    if path is None:
        raise ModelLoadError(f"{form.name} lists no {engine.suffix} file")
    return engine.load(path, manifest, form)


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
        NotFound, ArtifactIntegrityError, ModelLoadError: as `TorchScriptModel.load` for
            model.pt.
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
        chosen = TorchScriptModel.load(
            artifact.path,
            manifest,
            device=device,
            optimize=optimize,
            warmup_batch_sizes=warmup_batch_sizes,
        )
    else:
        chosen.warm(warmup_batch_sizes)
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
