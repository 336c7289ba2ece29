"""Choose, verify and load the form of a model version that serves on this machine.

A version's `model.pt` (TorchScript FP32) is the reference; its manifest may list compiled
forms (OpenVINO IR in FP32, BF16 or INT8; ONNX Runtime in FP32 or INT8) that passed the
accuracy gate at publish (`perito_core.models.gate`). Which form serves is one rule, the
table in docs/models.md#precision, written here once: `requested_precision` reads the
request's word against the server's setting, `check_precision` refuses what a version cannot
honour (at job submission from the manifest; on this machine before and after loading), and
`load_model` loads:

- `auto`: every compiled form this CPU can run is loaded and timed on a short warm-up at the
  largest batch the caller will use; the fastest serves. Measured rather than ruled, because
  the order changes with the silicon and the network: on an AMX Xeon OpenVINO INT8 ran
  ResNet-18 at 8x TorchScript and BF16 at 4.8x; on an AVX2-only EPYC (no VNNI, no BF16) INT8
  gains only about 1.2-1.4x over OpenVINO FP32 (README), and a partly quantized network
  (depthwise convolutions kept FP32) may not beat FP32 at all.
- `fp32` / `bf16` / `int8` named by a request (`Asked.required`): a form of that precision
  (`fp32`: an FP32 compiled form, else model.pt, which is FP32) or `PrecisionUnavailable`,
  never another precision.
- The same words as the server's setting (a request that names none) are a preference: that
  precision's forms, else the fastest more exact compiled form, else model.pt.
- `torchscript`: the reference itself.

Every compiled file is sha256-verified before it loads, like `model.pt`; a form that is
missing, tampered with, needs CPU features this machine lacks, or fails to load or to honour
the contract is passed over with a logged reason. The engines are optional (`perito[serve]`
pins them): without them every version serves TorchScript, and a request naming `bf16` or
`int8` is refused. Each form is opened by its engine (`perito_core.models.engines.ENGINES`).

A version imported from ONNX (`artifact.format == "onnx"`) has no `model.pt`: its verified
`model.onnx` is the reference and the only form, served by ONNX Runtime on the CPU
(`perito_core.models.engines.onnxruntime.OnnxModel`). Its precision is its input tensor's
(`TensorContract.precision`): `onnxruntime-fp16` for a float16 input, else `onnxruntime-fp32`.
`auto` and the server's setting serve it whatever they are; a request naming a precision it is
not (`fp32` of an FP16 graph, `int8`, `bf16`, `torchscript`) is refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from perito_core.errors import FailedPrecondition, InvalidArgument, ModelLoadError, PeritoError
from perito_core.models.batching import measure_images_per_second
from perito_core.models.engines import ENGINES, unsupported_reason
from perito_core.models.engines.base import LoadedModel, pick_device
from perito_core.models.engines.onnxruntime import OnnxModel, onnx_form_name
from perito_core.models.engines.torchscript import TORCHSCRIPT_FORM, TorchScriptModel
from perito_core.models.manifest import PRECISIONS, CompiledForm, ModelManifest
from perito_core.models.registry import LocalArtifact, ModelRegistry

log = logging.getLogger(__name__)

# From the least exact choice to the most: `auto` lets INT8 serve; `torchscript` is model.pt.
EXACTNESS = {"auto": 0, "int8": 1, "bf16": 2, "fp32": 3, "torchscript": 4}


class PrecisionUnavailable(FailedPrecondition, reason="PRECISION_UNAVAILABLE"):
    """A precision the caller named that this version cannot serve: it has no form of it, or
    that form failed the publish gate, cannot run on this machine or failed to load. `field`
    is `precision`; the message lists the forms the version has."""


@dataclass(frozen=True)
class Asked:
    """The precision one request or job is served at.

    Attributes:
        precision: one of `PRECISIONS`.
        required: the caller named it: a form of that precision answers, or the call is
            refused (`PrecisionUnavailable`). False for `auto` and for the server's setting
            (a preference: a more exact form answers where the version lacks it).
    """

    precision: str
    required: bool = False


def requested_precision(requested: str, default: str) -> Asked:
    """The precision to serve one request with: the caller's `requested` one (required), or
    the server's `default` (`PERITO_PRECISION`, a preference) when it names none.

    A caller may ask only for a form at least as exact as the server's setting (operators
    choose speed, a caller who needs exactness opts into it): `fp32` or
    `torchscript` on a server set to `auto` or `int8`, never `int8` on one set to `fp32`.

    Raises:
        InvalidArgument: (field `precision`) not a precision, or less exact than `default`.
    """
    if not requested:
        return Asked(default)
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
    return Asked(requested, required=requested != "auto")


def reference_form(manifest: ModelManifest) -> str:
    """The form that needs no compiled file: `torchscript-fp32` (model.pt), or an imported ONNX
    graph's own (`onnxruntime-fp32`, `onnxruntime-fp16`)."""
    if manifest.tensor is not None:  # set exactly for an ONNX artifact
        return onnx_form_name(manifest.tensor)
    return TORCHSCRIPT_FORM


def honours(form: str, precision: str) -> bool:
    """Whether the form named `form` (`openvino-int8`, `torchscript-fp32`, ...) serves a
    request that names `precision`: its precision is the name's last part."""
    if precision == "auto":
        return True
    if precision == "torchscript":
        return form == TORCHSCRIPT_FORM
    return form.rpartition("-")[2] == precision


def check_precision(
    manifest: ModelManifest,
    asked: Asked,
    *,
    device: str | None = None,
    served: LoadedModel | None = None,
) -> None:
    """Refuse a required precision this version cannot honour; the one check every door,
    job submission and worker makes (a preference is never refused).

    Args:
        manifest: the version's.
        asked: from `requested_precision`.
        device: this machine's device setting, when the check is for this machine: compiled
            forms count only on the CPU and where this CPU can run them (`unsupported_reason`).
            None (job submission): the manifest alone, as the workers' CPUs may differ.
        served: the model loaded for `asked.precision`, when one is: refused unless its form
            honours it (a form that failed to load here was passed over for another).

    Raises:
        PrecisionUnavailable: (field `precision`) naming the precision, why, and the forms the
            version has.
    """
    if not asked.required:
        return
    precision = asked.precision
    if served is not None and honours(served.form, precision):
        return
    reasons = {n: why for n, why in manifest.skipped_forms.items() if honours(n, precision)}
    if served is not None:
        passed_over = served.passed_over.items()
        reasons.update({n: why for n, why in passed_over if honours(n, precision)})
        raise _unavailable(manifest, precision, reasons, here=True)
    if honours(reference_form(manifest), precision):
        return
    for form in manifest.forms:
        if not honours(form.name, precision):
            continue
        if device is None:
            return
        reason = (
            "compiled forms serve on the CPU only"
            if pick_device(device).type != "cpu"
            else unsupported_reason(form)
        )
        if reason is None:
            return
        reasons[form.name] = reason
    raise _unavailable(manifest, precision, reasons, here=device is not None)


def _unavailable(
    manifest: ModelManifest, precision: str, reasons: Mapping[str, str], *, here: bool
) -> PrecisionUnavailable:
    forms = [reference_form(manifest), *(form.name for form in manifest.forms)]
    why = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
    return PrecisionUnavailable(
        f"precision {precision}: {manifest.name}@{manifest.version} has no {precision} form"
        f"{' that serves here' if here else ''}; its forms: {', '.join(forms)} (ask for one "
        f"of their precisions, or auto){f'. {why}' if why else ''}",
        field="precision",
    )


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


def candidate_forms(manifest: ModelManifest, precision: str) -> list[list[CompiledForm]]:
    """The compiled forms that may serve `precision`, in tiers tried in turn: the first tier
    where a form loads serves (the fastest of it); `precision`'s own forms, then the more
    exact ones. TorchScript answers when no tier does."""
    if precision == "torchscript":
        return []
    if precision == "auto":
        return [list(manifest.forms)] if manifest.forms else []
    floor = EXACTNESS[precision]
    tiers = [
        [form for form in manifest.forms if form.precision == precision],
        [form for form in manifest.forms if EXACTNESS[form.precision] > floor],
    ]
    return [tier for tier in tiers if tier]


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
    """Load the form of `name@version` that `precision` prefers: its forms, else the fastest
    more exact one, else TorchScript (an imported ONNX version: its one form). A caller that
    requires `precision` (a request named it) refuses with `check_precision` before loading
    (from the manifest and this machine) and after (the form that loaded).

    `model.pt` is always fetched and verified (it is the fallback and the reference); compiled
    forms only serve on the CPU. The returned model says which form it is (`model.form`) and
    why others were passed over (`model.passed_over`).

    Raises:
        NotFound, ArtifactIntegrityError, ModelLoadError: as `TorchScriptModel.load` for
            model.pt.
        ValueError: `precision` is not one of `PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    start = time.perf_counter()
    artifact = registry.fetch(name, version)
    manifest = artifact.manifest
    if manifest.artifact.format == "onnx":
        return _load_onnx(artifact, precision, device, warmup_batch_sizes, start)
    passed_over: dict[str, str] = {}
    tiers = candidate_forms(manifest, precision)
    if tiers and pick_device(device).type != "cpu":
        passed_over = {f.name: "compiled forms serve on the CPU only" for t in tiers for f in t}
        tiers = []
    chosen: LoadedModel | None = None
    for tier in tiers:
        chosen = _fastest(registry, manifest, tier, passed_over, warmup_batch_sizes)
        if chosen is not None:
            break
    if chosen is None:
        if tiers:
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
    log.info("%s@%s: serving form %s (precision %s)", name, version, chosen.form, precision)
    return chosen


def _fastest(
    registry: ModelRegistry,
    manifest: ModelManifest,
    forms: list[CompiledForm],
    passed_over: dict[str, str],
    warmup_batch_sizes: tuple[int, ...],
) -> LoadedModel | None:
    """The fastest of `forms` that loads, timed at the largest batch when several do; None
    when none loads. Why each other form was passed over goes into `passed_over`."""
    label = f"{manifest.name}@{manifest.version}"
    loaded: list[LoadedModel] = []
    for form in forms:
        try:
            loaded.append(load_form(registry, manifest, form))
        except PeritoError as error:
            passed_over[form.name] = error.message
            log.warning("%s: not serving %s: %s", label, form.name, error.message)
    if len(loaded) <= 1:
        return loaded[0] if loaded else None
    batch = max(warmup_batch_sizes)
    rates = {model.form: _images_per_second(model, batch) for model in loaded}
    chosen = max(loaded, key=lambda model: rates[model.form])
    summary = ", ".join(f"{form} {rate:.0f}" for form, rate in rates.items())
    log.info("%s: images/s at batch %d: %s", label, batch, summary)
    passed_over.update(
        {m.form: f"slower here ({rates[m.form]:.0f} images/s)" for m in loaded if m is not chosen}
    )
    return chosen


def _load_onnx(
    artifact: LocalArtifact,
    precision: str,
    device: str,
    warmup_batch_sizes: tuple[int, ...],
    start: float,
) -> LoadedModel:
    """An imported ONNX version: its one form, on the CPU, whatever `precision` prefers."""
    manifest = artifact.manifest
    model = OnnxModel.open(artifact.path, manifest, warmup_batch_sizes=warmup_batch_sizes)
    label = f"{manifest.name}@{manifest.version}"
    if not honours(model.form, precision):
        model.passed_over[precision] = "an imported ONNX model has only its own form"
        log.info("%s: precision %s preferred; an ONNX model serves as imported", label, precision)
    if pick_device(device).type != "cpu":
        model.passed_over[str(pick_device(device))] = "ONNX models serve on the CPU"
        log.info("%s: ONNX Runtime serves on the CPU, not %s", label, device)
    model.load_seconds = time.perf_counter() - start
    log.info("%s: serving form %s", label, model.form)
    return model


def _images_per_second(model: LoadedModel, batch_size: int) -> float:
    """A short timed run at `batch_size` (`measure_images_per_second`, one round of at least
    `AUTO_TIMING_S` and two passes) after one untimed batch."""
    images = model._random_batch(batch_size)
    model._forward(images)
    rates = measure_images_per_second(
        lambda _: model._forward(images),
        [batch_size],
        rounds=1,
        round_seconds=AUTO_TIMING_S,
        min_passes=2,
    )
    return rates[batch_size]
