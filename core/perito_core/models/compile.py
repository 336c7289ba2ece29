"""Build compiled forms of a TorchScript artifact, and keep only those that pass the gate.

`build_forms` converts `model.pt` to OpenVINO IR in FP32 (weights kept FP32, not the FP16
default of `ov.save_model`), quantizes it to INT8 with NNCF post-training quantization on
calibration images (the training run's validation split, or a folder the user gives), and,
on a CPU that can run it, measures BF16 (the FP32 IR with OpenVINO's `bf16` precision hint).
Every form is run against `model.pt` on held-out images: a form whose top-1 agreement with the
reference is under `min_agreement`, or whose accuracy (when labels are known) drops more than
`max_accuracy_drop`, is refused with the reason recorded. Used by `perito publish` (training)
and `perito models import` (server): it lives in the shared package so neither imports the
other. OpenVINO and NNCF are imported only here and only when called.

The compiled network takes images already at the contract's input size (what serving always
hands over): the artifact's resize branch for other sizes is TorchScript control flow no
converter takes, so the form wraps the artifact's own `network`, `scale`, `shift` and
`temperature` (see `perito_training.export.ImageClassifier`). A TorchScript file without them
(an imported module of another shape) is converted as it is, or skipped with the reason.
"""

from __future__ import annotations

import functools
import logging
import platform
import shutil
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perito_core.models.calibration import (
    confidence_threshold,
    expected_calibration_error,
    fit_temperature,
    log_probabilities,
)
from perito_core.models.calibration import rescale as calibration_rescale
from perito_core.models.fixed_size import fixed_size
from perito_core.models.forms import cpu_flags, isa_summary, openvino_version
from perito_core.models.manifest import (
    FORM_PRECISIONS,
    MAX_ACCURACY_DROP,
    MIN_AGREEMENT,
    CompiledForm,
    FormFile,
    InputContract,
    sha256_file,
)

log = logging.getLogger(__name__)

# At most this many calibration images go to NNCF (its own default subset is 300).
MAX_CALIBRATION_IMAGES = 300
# The forms and model.pt run the held-out and calibration images this many at a time.
BATCH_SIZE = 32
BF16_FLAGS = ["avx512_bf16", "amx_bf16"]
# The engines a form can be built for; `auto` serves whichever verified form runs fastest here.
ENGINES = ("openvino", "onnxruntime")


@dataclass
class BuiltForms:
    """What `build_forms` made: the forms that passed (with their folders; OpenVINO's BF16 and
    FP32 share one), and why not others."""

    forms: list[tuple[CompiledForm, Path]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def remove_files(self) -> None:
        """Delete the forms' folders (once published)."""
        for _, folder in self.forms:
            shutil.rmtree(folder, ignore_errors=True)

    def summary(self) -> list[str]:
        lines = [
            f"{form.name}: top-1 agreement {form.agreement:.2%} on {form.images} images"
            + (f", accuracy {form.accuracy:.4f}" if form.accuracy is not None else "")
            + (f" (reference {form.reference_accuracy:.4f})" if form.reference_accuracy else "")
            for form, _ in self.forms
        ]
        lines += [f"{name}: skipped: {reason}" for name, reason in self.skipped.items()]
        return lines


def build_forms(
    model_path: Path,
    contract: InputContract,
    out_dir: Path,
    *,
    calibration: np.ndarray,
    holdout: np.ndarray,
    holdout_targets: np.ndarray | None = None,
    calibration_targets: np.ndarray | None = None,
    target_accuracy: float | None = None,
    evaluated_on: str = "held-out images",
    precisions: Sequence[str] = FORM_PRECISIONS,
    engines: Sequence[str] = ENGINES,
    min_agreement: float = MIN_AGREEMENT,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
    accuracy_control: bool = True,
    validation: np.ndarray | None = None,
    control_agreement: float | None = None,
    control_metric: str = "agreement",
) -> BuiltForms:
    """Convert, quantize, measure and gate the compiled forms of `model_path`.

    Args:
        model_path: the TorchScript artifact (the reference).
        contract: its input contract (the IR's input is uint8 N x 3 x height x width).
        out_dir: each form's files go to `out_dir/{form name}/`; BF16 has none of its own:
            it is the FP32 IR (`openvino-fp32/`) with another precision hint, published under
            its own name like any form (`ModelRegistry.publish`).
        calibration: uint8 images (N, H, W, 3) for INT8 calibration (validation images).
        holdout: uint8 images (N, H, W, 3) the forms are compared with model.pt on.
        holdout_targets: their class indices (N,), when known: accuracy and ECE are then gated
            and recorded too, and each form's temperature (and, with `target_accuracy`, its
            `uncertain` threshold) is re-fitted on its own outputs (`_refit`).
        calibration_targets: the calibration images' class indices (N,) (the validation
            split's): the re-fit then uses them, as training fitted the artifact's; without
            them it uses the held-out images, and the record says so (its ECE is then measured
            on the data it was fitted on).
        target_accuracy: the accuracy above the threshold the trainer aimed at
            (`calibration.target_accuracy`); None: no per-form threshold.
        precisions: which of fp32, int8, bf16 to build.
        engines: which of `ENGINES` to build them for: OpenVINO (FP32 IR, BF16, NNCF INT8)
            and ONNX Runtime (FP32, static QDQ INT8); an engine that is not installed, or
            cannot take the module, is skipped with the reason.
        accuracy_control: when the gate refuses plain post-training INT8, quantize again with
            NNCF's accuracy control (`_quantize`): quantized operations are reverted to FP32
            until INT8 matches the FP32 IR on `validation` (`control_metric`, within
            `1 - control_agreement`), and that model faces the same gate. Plain INT8 comes
            first because it is the fastest: reverting costs speed (README). Two candidates
            face the gate, so it is tried at most twice; the record says which passed
            (`CompiledForm.quantization`).
        validation: uint8 images (N, H, W, 3) accuracy control tunes on; default the
            calibration images (at most `MAX_CALIBRATION_IMAGES`). Never the held-out
            images: the gate then scores images the reverting did not see.
        control_agreement: the metric accuracy control aims at on `validation` (default
            `min_agreement`; a benchmark that gates at 0 still tunes at 0.99).
        control_metric: `agreement` (top-1 agreement with the FP32 IR) or `fidelity` (1 - the
            largest probability difference from it, averaged: `_fidelity`).

    Returns:
        The forms that passed the gate and, by name, why each other one was not built.

    Raises:
        ValueError: targets whose length differs from their images'.
    """
    for targets, images_ in ((holdout_targets, holdout), (calibration_targets, calibration)):
        if targets is not None and len(targets) != len(images_):
            raise ValueError(f"{len(targets)} targets for {len(images_)} images")
    built = BuiltForms()
    engines = [engine for engine in ENGINES if engine in engines]
    if len(holdout) == 0:
        reason = "no held-out images to verify it on"
        built.skipped = {f"{e}-{p}": reason for e in engines for p in precisions}
        return built
    reference_module = _load_torchscript(model_path)
    host = f"{platform.machine()} ({isa_summary()})"
    images = calibration[:MAX_CALIBRATION_IMAGES]
    candidates: list[_Candidate] = []
    build = _Build(reference_module, contract, out_dir, precisions, images, built, candidates)
    if "openvino" in engines:
        _openvino_candidates(
            build,
            validation=validation,
            control_agreement=min_agreement if control_agreement is None else control_agreement,
            control_metric=control_metric,
        )
    if "onnxruntime" in engines:
        _onnxruntime_candidates(build)
    if not candidates:  # nothing built to compare with model.pt: no reference pass
        build.remove_unkept()
        return built
    reference = _torch_probabilities(reference_module, holdout)
    for candidate in candidates:
        name = candidate.name
        probabilities = candidate.predict(holdout)
        agreement = float(np.mean(probabilities.argmax(1) == reference.argmax(1)))
        accuracy = reference_accuracy = ece = None
        fit = Refit()
        if holdout_targets is not None and len(holdout_targets):
            accuracy = float(np.mean(probabilities.argmax(1) == holdout_targets))
            reference_accuracy = float(np.mean(reference.argmax(1) == holdout_targets))
            if calibration_targets is not None and len(calibration_targets):
                fit_on = candidate.predict(calibration)
                fit = _refit(fit_on, calibration_targets, target_accuracy, "calibration images")
            else:
                where = f"{len(holdout)} {evaluated_on} (also where its ECE is measured)"
                fit = _refit(probabilities, holdout_targets, target_accuracy, where)
            fit.ece_before = expected_calibration_error(probabilities, holdout_targets)
            ece = expected_calibration_error(
                calibration_rescale(probabilities, fit.temperature), holdout_targets
            )
        refused = gate_reason(
            agreement, accuracy, reference_accuracy, min_agreement, max_accuracy_drop
        )
        if refused:
            reason = f"{refused} ({len(holdout)} {evaluated_on})"
            if candidate.quantization == "accuracy-control":
                reason = f"{built.skipped[name]}; with accuracy control: {reason}"
            built.skipped[name] = reason
            if candidate.retry is not None and accuracy_control:
                log.warning("%s refused: %s; trying accuracy control", name, reason)
                built.skipped[name] = f"post-training: {reason}"
                again = candidate.retry()
                if again is not None:
                    candidates.append(again)
                continue
        else:
            built.skipped.pop(name, None)
            files = sorted(p for p in candidate.folder.iterdir() if p.is_file())
            form = CompiledForm(
                name=name,
                engine=candidate.engine,
                engine_version=candidate.engine_version,
                precision=candidate.precision,
                files=[
                    FormFile(file=p.name, sha256=sha256_file(p), size_bytes=p.stat().st_size)
                    for p in files
                ],
                requires=candidate.requires,
                agreement=agreement,
                max_abs_diff=float(np.abs(probabilities - reference).max()),
                evaluated_on=evaluated_on,
                images=len(holdout),
                accuracy=accuracy,
                reference_accuracy=reference_accuracy,
                ece=ece,
                calibration_images=candidate.calibrated,
                built_on=host,
                quantization=candidate.quantization,
                temperature=fit.temperature,
                confidence_threshold=fit.threshold,
                calibration_fitted_on=fit.fitted_on,
                ece_before_fit=fit.ece_before,
            )
            built.forms.append((form, candidate.folder))
            continue
        log.warning("%s refused: %s", name, built.skipped[name])
    build.remove_unkept()
    return built


@dataclass
class _Candidate:
    """A compiled form built and waiting for the gate: its files in `folder`, and how to run
    it (`predict`): `load` opens it (OpenVINO's compiled model, an ONNX Runtime session), on
    first use and once; `run` runs what it opened on uint8 (N, H, W, 3) images, giving
    float32 (N, classes) probabilities."""

    engine: str
    engine_version: str
    precision: str
    folder: Path
    load: Callable[[], Any]
    run: Callable[[Any, np.ndarray], np.ndarray]
    requires: list[str] = field(default_factory=list)
    calibrated: int = 0
    quantization: str = ""
    # What builds the form again when the gate refuses it (plain OpenVINO INT8: quantized
    # again with accuracy control, `build_forms(accuracy_control=True)`); None: nothing.
    retry: Callable[[], _Candidate | None] | None = None

    @property
    def name(self) -> str:
        return f"{self.engine}-{self.precision}"

    @functools.cached_property
    def _loaded(self) -> Any:
        return self.load()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for uint8 `images` (N, H, W, 3): float32 (N, classes)."""
        return self.run(self._loaded, images)


@dataclass(frozen=True)
class _Build:
    """What each engine builds its forms from, and where they go: the TorchScript reference,
    its contract, the output folder, the precisions asked for, the calibration images; the
    built candidates into `candidates`, the reasons for any not built into `built.skipped`,
    and every folder made (`folder`) into `made`, for `remove_unkept` to remove those no
    kept form is in."""

    module: torch.jit.ScriptModule
    contract: InputContract
    out_dir: Path
    precisions: Sequence[str]
    images: np.ndarray
    built: BuiltForms
    candidates: list[_Candidate]
    made: list[Path] = field(default_factory=list)

    def folder(self, name: str) -> Path:
        """`out_dir/name`, created (and recorded in `made`)."""
        folder = self.out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        self.made.append(folder)
        return folder

    def remove_unkept(self) -> None:
        """Remove each folder made that no form in `built.forms` keeps: what the gate refused,
        what failed, and FP32 made only to quantize INT8."""
        kept = {folder for _, folder in self.built.forms}
        for folder in self.made:
            if folder not in kept and folder.is_dir():
                shutil.rmtree(folder)


def _openvino_candidates(
    build: _Build,
    *,
    validation: np.ndarray | None,
    control_agreement: float,
    control_metric: str,
) -> None:
    """OpenVINO's forms of the module into `candidates` (or the reason into `built.skipped`):
    FP32 IR (weights kept FP32, not `save_model`'s FP16 default), BF16 (that IR with the `bf16`
    precision hint, on a CPU that has it) and INT8 (NNCF, `_quantize`; its `retry` quantizes
    again with accuracy control).
    """
    names = [f"openvino-{p}" for p in build.precisions]
    version = openvino_version()
    if version is None:
        build.built.skipped.update({name: "OpenVINO is not installed" for name in names})
        return
    import openvino

    try:
        ov_model = _convert(build.module, build.contract)
    except Exception as exc:  # noqa: BLE001 - a network the converter cannot take is skipped
        reason = f"OpenVINO cannot convert this module: {str(exc).splitlines()[0][:300]}"
        build.built.skipped.update({name: reason for name in names})
        return
    core = openvino.Core()
    fp32_dir = build.folder("openvino-fp32")
    openvino.save_model(ov_model, str(fp32_dir / "model.xml"), compress_to_fp16=False)

    def candidate(precision: str, folder: Path, hint: str, **more: Any) -> _Candidate:
        def compile_form() -> object:  # by the candidate, on first use
            config = {
                "INFERENCE_PRECISION_HINT": hint,
                "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            }
            return core.compile_model(str(folder / "model.xml"), "CPU", config)

        return _Candidate(
            "openvino", version, precision, folder, compile_form, _openvino_probabilities, **more
        )

    if "fp32" in build.precisions:
        build.candidates.append(candidate("fp32", fp32_dir, "f32"))
    if "bf16" in build.precisions:
        if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            # The FP32 IR's own files, compiled with another hint: no copy of them.
            build.candidates.append(candidate("bf16", fp32_dir, "bf16", requires=BF16_FLAGS))
        else:
            build.built.skipped["openvino-bf16"] = (
                f"this CPU cannot run BF16 ({isa_summary()}): built and verified only on one "
                "with avx512_bf16 or AMX"
            )

    def quantize(control: bool) -> _Candidate | None:
        """INT8 (plain, or by accuracy control) written to `openvino-int8`; None when it
        failed."""
        checks = None
        if control:
            checks = build.images if validation is None else validation[:MAX_CALIBRATION_IMAGES]
        try:
            quantized = _quantize(
                ov_model,
                build.images,
                validation=checks,
                min_agreement=control_agreement,
                metric=control_metric,
            )
        except Exception as exc:  # noqa: BLE001 - a failed quantization skips the form only
            build.built.skipped["openvino-int8"] = f"quantization failed: {exc}"
            return None
        int8_dir = build.folder("openvino-int8")
        openvino.save_model(quantized, str(int8_dir / "model.xml"), compress_to_fp16=False)
        return candidate(
            "int8",
            int8_dir,
            "f32",
            calibrated=len(build.images),
            quantization="accuracy-control" if control else "post-training",
            retry=None if control else lambda: quantize(control=True),
        )

    if "int8" in build.precisions:
        plain = quantize(control=False)
        if plain is not None:
            build.candidates.append(plain)


def _onnxruntime_candidates(build: _Build) -> None:
    """ONNX Runtime's forms of the module into `candidates` (or the reason into
    `built.skipped`): the module exported to ONNX (TorchScript-based exporter, opset 17; uint8
    N x 3 x H x W in, probabilities out, a dynamic batch) as FP32, and INT8 by ONNX Runtime's
    static quantization (QDQ, per-channel weights, `_onnxruntime_int8`). BF16 is OpenVINO's
    only.
    """
    from perito_core.models.onnx_model import ONNX_ENGINE, inference_session, onnxruntime_version

    wanted = [p for p in build.precisions if p in ("fp32", "int8")]
    if "bf16" in build.precisions:
        build.built.skipped["onnxruntime-bf16"] = (
            "ONNX Runtime forms are FP32 or INT8 (BF16: OpenVINO)"
        )
    if not wanted:
        return
    version = onnxruntime_version()
    if version is None:
        build.built.skipped.update(
            {f"{ONNX_ENGINE}-{p}": "ONNX Runtime is not installed" for p in wanted}
        )
        return
    fp32_dir = build.folder(f"{ONNX_ENGINE}-fp32")
    try:
        _export_onnx(build.module, build.contract, fp32_dir / "model.onnx")
    except Exception as exc:  # noqa: BLE001 - a module the exporter cannot take is skipped
        reason = f"cannot export this module to ONNX: {str(exc).strip().splitlines()[0][:300]}"
        build.built.skipped.update({f"{ONNX_ENGINE}-{p}": reason for p in wanted})
        return

    def candidate(precision: str, folder: Path, **more: Any) -> _Candidate:
        # The serving runtime's session (`OnnxModel.open`'s), opened on first use.
        open_session = functools.partial(inference_session, folder / "model.onnx")
        return _Candidate(
            ONNX_ENGINE,
            version,
            precision,
            folder,
            open_session,
            _onnxruntime_probabilities,
            **more,
        )

    if "fp32" in wanted:
        build.candidates.append(candidate("fp32", fp32_dir))
    if "int8" in wanted:
        int8_dir = build.folder(f"{ONNX_ENGINE}-int8")
        try:
            mode = _onnxruntime_int8(fp32_dir / "model.onnx", int8_dir / "model.onnx", build.images)
        except Exception as exc:  # noqa: BLE001 - a failed quantization skips the form only
            build.built.skipped[f"{ONNX_ENGINE}-int8"] = f"quantization failed: {exc}"
        else:
            build.candidates.append(
                candidate("int8", int8_dir, calibrated=len(build.images), quantization=mode)
            )


@dataclass
class Refit:
    """A form's calibration re-fitted on its own outputs (`_refit`); identity by default."""

    temperature: float = 1.0
    threshold: float | None = None
    fitted_on: str = ""
    ece_before: float | None = None


def _refit(
    probabilities: np.ndarray, targets: np.ndarray, target_accuracy: float | None, fitted_on: str
) -> Refit:
    """Temperature (Guo et al. 2017) and `uncertain` threshold for a form's probabilities (N, C)
    on labelled images (targets (N,)): as training fits the artifact's, on the form's outputs."""
    temperature = fit_temperature(log_probabilities(probabilities), targets)
    threshold = None
    if target_accuracy is not None:
        scaled = calibration_rescale(probabilities, temperature)
        found = confidence_threshold(scaled, targets, target_accuracy)
        threshold = found["threshold"] if found is not None else None
    return Refit(temperature=temperature, threshold=threshold, fitted_on=fitted_on)


def gate_reason(
    agreement: float,
    accuracy: float | None,
    reference_accuracy: float | None,
    min_agreement: float = MIN_AGREEMENT,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
) -> str | None:
    """Why the publish gate refuses a form with these figures, or None when it passes."""
    if agreement < min_agreement:
        return (
            f"top-1 agreement with model.pt {agreement:.2%} is under the gate's {min_agreement:.2%}"
        )
    if (
        accuracy is not None
        and reference_accuracy is not None
        and reference_accuracy - accuracy > max_accuracy_drop
    ):
        return (
            f"accuracy {accuracy:.4f} is {100 * (reference_accuracy - accuracy):.2f} points "
            f"under model.pt's {reference_accuracy:.4f} (the gate allows "
            f"{100 * max_accuracy_drop:.2f})"
        )
    return None


def build_forms_from_folder(
    model_path: Path,
    contract: InputContract,
    out_dir: Path,
    folder: Path,
    *,
    precisions: Sequence[str] = FORM_PRECISIONS,
    min_agreement: float = MIN_AGREEMENT,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
    limit: int = 2 * MAX_CALIBRATION_IMAGES,
    accuracy_control: bool = False,
) -> BuiltForms:
    """`build_forms` for an imported model: the user's folder of images (no labels), prepared
    by the serving code, alternately for calibration and for the held-out agreement check.

    `accuracy_control` is off by default here: on this 2-core AVX2 EPYC it took 6-20 minutes
    for EfficientNet-Lite0 and did not bring it through the 99% gate (README, "Compiled
    forms"), so an import does not pay for it unless asked."""
    from perito_core.errors import InvalidImage
    from perito_core.imaging import load_model_input
    from perito_core.jobs.sources import is_ignored_key

    spec = contract.spec()
    images: list[np.ndarray] = []
    for path in sorted(folder.rglob("*")):
        if len(images) >= limit:
            break
        if path.is_file() and not is_ignored_key(path.relative_to(folder).as_posix()):
            try:
                images.append(load_model_input(path.read_bytes(), spec))
            except InvalidImage as error:
                log.info("calibration: %s left out: %s", path, error.message)
    if len(images) < 2:
        reason = f"{folder} holds fewer than 2 readable images to calibrate and verify on"
        return BuiltForms(skipped={f"{e}-{p}": reason for e in ENGINES for p in precisions})
    stacked = np.stack(images)
    return build_forms(
        model_path,
        contract,
        out_dir,
        calibration=stacked[0::2],
        holdout=stacked[1::2],
        evaluated_on=f"images of {folder.name} not used for calibration",
        accuracy_control=accuracy_control,
        precisions=precisions,
        min_agreement=min_agreement,
        max_accuracy_drop=max_accuracy_drop,
    )


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module: torch.jit.ScriptModule = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    return module.eval()


def _convert(module: torch.jit.ScriptModule, contract: InputContract) -> object:
    import openvino

    example = torch.randint(0, 256, (1, 3, contract.height, contract.width), dtype=torch.uint8)
    shape = [-1, 3, contract.height, contract.width]
    source = fixed_size(module)
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")
        return openvino.convert_model(
            source, example_input=example, input=[(shape, openvino.Type.u8)]
        )


def _quantize(
    ov_model: object,
    images: np.ndarray,
    *,
    validation: np.ndarray | None = None,
    min_agreement: float = MIN_AGREEMENT,
    metric: str = "agreement",
) -> object:
    """NNCF INT8 of `ov_model` (uint8 N x 3 x H x W input), chosen for an IR that must be exact
    on every x86 CPU.

    - `OverflowFix.ENABLE`: weights get 7 bits. Without VNNI (AVX2-only CPUs) oneDNN's u8 x s8
      products saturate their 16-bit sums; NNCF's default fixes only the first layer, and on
      this AVX2 EPYC EfficientNet-Lite0 then agreed with FP32 on 64% of photo crops, 81% with
      the fix. A form is built once and may serve on either kind of CPU.
    - Depthwise (group) convolutions stay FP32: with them quantized too, Lite0 agreed on 81%
      of 36 photo framings, without 97%; networks without them (ResNet) are unchanged.
    - `MIXED` preset: asymmetric activations (inputs after the normalisation are not centred).

    With `validation` (uint8 images (N, H, W, 3), never the gate's held-out images), NNCF's
    accuracy-aware quantization (`nncf.quantize_with_accuracy_control`; NNCF docs,
    "Post-training Quantization with Accuracy Control") quantizes as above, then reverts the
    most sensitive quantized operations to FP32, one by one in order of their contribution to
    the drop, until the metric drops by at most `1 - min_agreement` (absolute). The metric
    (`metric`) compares with the FP32 IR on `validation`, so no labels are needed: `agreement`,
    top-1 agreement (`_agreement`), or `fidelity`, 1 - the largest probability difference
    (`_fidelity`); both are 1.0 for the FP32 IR itself.

    Returns:
        The quantized `openvino.Model`.

    Raises:
        ValueError: no calibration images.
        nncf errors: as `nncf.quantize` / `nncf.quantize_with_accuracy_control`.
    """
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
    )

    nncf.set_log_level(logging.ERROR)
    batches = [np.ascontiguousarray(image.transpose(2, 0, 1)[None]) for image in images]
    if not batches:
        raise ValueError("no calibration images")
    options: dict[str, object] = {
        "subset_size": len(batches),
        "preset": nncf.QuantizationPreset.MIXED,
        "ignored_scope": nncf.IgnoredScope(types=["GroupConvolution"], validate=False),
    }
    advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
    if validation is None or len(validation) == 0:
        return nncf.quantize(
            ov_model, nncf.Dataset(batches), advanced_parameters=advanced, **options
        )
    import openvino
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    checks = [np.ascontiguousarray(image.transpose(2, 0, 1)[None]) for image in validation]
    fp32 = openvino.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    reference = [np.array(fp32([batch])[0][0], dtype=np.float32) for batch in checks]
    items = list(zip(checks, reference, strict=True))
    return nncf.quantize_with_accuracy_control(
        ov_model,
        nncf.Dataset(batches),
        nncf.Dataset(items, lambda item: item[0]),
        _fidelity if metric == "fidelity" else _agreement,
        max_drop=1.0 - min_agreement,
        drop_type=nncf.DropType.ABSOLUTE,
        advanced_quantization_parameters=advanced,
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
            num_ranking_workers=1
        ),
        **options,
    )


def _agreement(
    compiled: object, items: Iterable[tuple[np.ndarray, np.ndarray]]
) -> tuple[float, list[float]]:
    """Accuracy control's metric: top-1 agreement with the FP32 reference, and per item."""
    hits = [
        float(np.argmax(compiled([batch])[0]) == np.argmax(reference))  # type: ignore[operator]
        for batch, reference in items
    ]
    return (float(np.mean(hits)) if hits else 1.0), hits


def _fidelity(
    compiled: object, items: Iterable[tuple[np.ndarray, np.ndarray]]
) -> tuple[float, list[float]]:
    """Accuracy control's stricter metric: 1 - the largest probability difference from the FP32
    reference, per item and averaged. A top-1 flip needs a difference of at least half the
    reference's top-1 / top-2 margin, so bounding it protects unseen images' top-1 too."""
    values = [
        1.0 - float(np.abs(np.asarray(compiled([batch])[0])[0] - reference).max())  # type: ignore[operator]
        for batch, reference in items
    ]
    return (float(np.mean(values)) if values else 1.0), values


def export_onnx(
    network: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    input_name: str = "input",
    output_name: str = "output",
    dynamic_batch: bool = True,
) -> Path:
    """`network` (a module or a scripted one) as an ONNX graph at `path`: one input and one
    output, named, the batch dimension dynamic unless `dynamic_batch` is False, opset 17. By
    the TorchScript-based exporter (`dynamo=False`: no onnxscript needed, and it takes
    scripted modules, which the dynamo exporter does not)."""
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network,
            (example,),
            str(path),
            dynamo=False,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}
            if dynamic_batch
            else None,
            opset_version=17,
        )
    return path


def _export_onnx(module: torch.jit.ScriptModule, contract: InputContract, path: Path) -> None:
    """The module's fixed-size forward pass (`fixed_size`) as ONNX: uint8 `images`
    (N, 3, H, W) in, `probabilities` out, the batch dynamic. Scripted first: the artifact's
    network is already TorchScript, which tracing cannot step into."""
    example = torch.zeros((1, 3, contract.height, contract.width), dtype=torch.uint8)
    export_onnx(
        torch.jit.script(fixed_size(module)),
        example,
        path,
        input_name="images",
        output_name="probabilities",
    )


def _onnxruntime_int8(source: Path, target: Path, images: np.ndarray) -> str:
    """ONNX Runtime's static INT8 of `source` into `target`, calibrated on uint8 `images`
    (N, H, W, 3); returns how, for the record (`CompiledForm.quantization`).

    QDQ format, weights per channel (`onnxruntime.quantization.quantize_static`, after its
    `quant_pre_process`), asymmetric uint8 activations; weights get 7 bits
    (`reduce_range`) on a CPU without VNNI, where 8-bit products saturate AVX2's 16-bit sums
    (as NNCF's overflow fix in `_quantize`). Measured on EfficientNet-Lite0, 36 crops of the
    sample photos, 72 calibration images, this AVX2 EPYC: top-1 agreement with FP32 83%
    (MinMax or entropy calibration), 81% percentile or QOperator, 78% with 8-bit weights or
    uint8 weights, 56% with the depthwise convolutions left FP32 (which helps NNCF: 97%); the
    gate refuses it there, and `auto` serves another form.

    Raises:
        ValueError: no calibration images; onnxruntime.quantization's errors.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(images) == 0:
        raise ValueError("no calibration images")
    batches = iter([{"images": _nchw(images[i : i + 1])} for i in range(len(images))])

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    reduce_range = not cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}
    prepared = target.with_name("prepared.onnx")
    quant_pre_process(str(source), str(prepared))
    # The softmax stays FP32: quantized, its outputs no longer sum to 1 (the serving contract).
    softmax = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Softmax"]
    try:
        quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=softmax,
        )
    finally:
        prepared.unlink(missing_ok=True)
    return "post-training (QDQ, per-channel" + (", 7-bit weights)" if reduce_range else ")")


def _nchw(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def _in_batches(images: np.ndarray, run: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`run`'s probabilities for uint8 `images` (N, H, W, 3), handed to it as uint8 NCHW
    batches of `BATCH_SIZE`, concatenated."""
    batches = (_nchw(images[i : i + BATCH_SIZE]) for i in range(0, len(images), BATCH_SIZE))
    return np.concatenate([run(batch) for batch in batches])


def _onnxruntime_probabilities(session: Any, images: np.ndarray) -> np.ndarray:
    return _in_batches(
        images,
        lambda batch: np.asarray(session.run(None, {"images": batch})[0], dtype=np.float32),
    )


def _torch_probabilities(module: torch.jit.ScriptModule, images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return _in_batches(images, lambda batch: module(torch.from_numpy(batch)).float().numpy())


def _openvino_probabilities(compiled: object, images: np.ndarray) -> np.ndarray:
    request = compiled.create_infer_request()  # type: ignore[attr-defined]
    # Copied: the request's output tensor is overwritten by its next batch.
    return _in_batches(
        images, lambda batch: np.array(request.infer([batch])[0], dtype=np.float32, copy=True)
    )
