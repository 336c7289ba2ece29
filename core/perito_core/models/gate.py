"""The accuracy gate: build each engine's candidate forms of a TorchScript artifact, run them
against `model.pt` on held-out images, and keep only those that pass.

`build_forms` hands the artifact to every engine asked for (`perito_core.models.engines`:
OpenVINO's FP32 IR, BF16 and NNCF INT8; ONNX Runtime's FP32 and INT8) and measures what they
built. A form whose top-1 agreement with the reference is under `min_agreement`, or whose
accuracy (when labels are known) drops more than `max_accuracy_drop`, is refused with the
reason recorded. Used by `perito publish` (training) and `perito models import` (server): it
lives in the shared package so neither imports the other.

The gate decides on the point estimates and reports how far they can be trusted
(`GateFigures`): the 95% Wilson lower bound of the agreement and, with labels, the 95% paired
(Newcombe) interval of the accuracy change, recorded in each form's card entry and printed; a
gate on fewer than `MIN_GATE_IMAGES` held-out images says it is weak. Why not decide on the
bound: it cannot reach 99% before about 380 images all agree (200 of 200 give 98.1%), so a
bound rule would refuse every form on the 200 images the gate asks for; the point estimate
against 99% on at least 200 images refuses a form that disagrees on more than 2 of them, and
the bound beside it says what that shows.

The compiled network takes images already at the contract's input size (what serving always
hands over): the artifact's resize branch for other sizes is TorchScript control flow no
converter takes, so the form wraps the artifact's own `network`, `scale`, `shift` and
`temperature` (see `perito_training.export.ImageClassifier`). A TorchScript file without them
(an imported module of another shape) is converted as it is, or skipped with the reason.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perito.v1.vocabulary import ACCURACY_CONTROL_ATTEMPT
from perito_core.imaging import InputSpec
from perito_core.models.calibration import (
    confidence_threshold,
    expected_calibration_error,
    fit_temperature,
    log_probabilities,
)
from perito_core.models.calibration import rescale as calibration_rescale
from perito_core.models.engines import ENGINE_NAMES, ENGINES
from perito_core.models.engines.base import (
    MAX_CALIBRATION_IMAGES,
    BuildContext,
    BuiltForms,
    Candidate,
    isa_summary,
)
from perito_core.models.engines.torchscript import load_module, reference_probabilities
from perito_core.models.manifest import (
    FORM_PRECISIONS,
    MAX_ACCURACY_DROP,
    MIN_AGREEMENT,
    MIN_GATE_IMAGES,
    CompiledForm,
    FormFile,
    InputContract,
    sha256_file,
)
from perito_core.stats import paired_difference_interval, wilson_interval

log = logging.getLogger(__name__)


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
    engines: Sequence[str] = ENGINE_NAMES,
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
        engines: which of `ENGINE_NAMES` to build them for: OpenVINO (FP32 IR, BF16, NNCF INT8)
            and ONNX Runtime (FP32, static QDQ INT8); an engine that is not installed, or
            cannot take the module, is skipped with the reason.
        accuracy_control: when the gate refuses plain post-training INT8, quantize again with
            NNCF's accuracy control (`openvino.quantize`): quantized operations are reverted to FP32
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
    engines = [engine for engine in ENGINE_NAMES if engine in engines]
    if len(holdout) == 0:
        reason = "no held-out images to verify it on"
        built.skipped = {f"{e}-{p}": reason for e in engines for p in precisions}
        return built
    reference_module = load_module(model_path)
    host = f"{platform.machine()} ({isa_summary()})"
    images = calibration[:MAX_CALIBRATION_IMAGES]
    candidates: list[Candidate] = []
    build = BuildContext(
        reference_module,
        contract,
        out_dir,
        precisions,
        images,
        built,
        candidates,
        validation=validation,
        control_agreement=min_agreement if control_agreement is None else control_agreement,
        control_metric=control_metric,
    )
    for engine in engines:
        ENGINES[engine].build(build)
    if not candidates:  # nothing built to compare with model.pt: no reference pass
        build.remove_unkept()
        return built
    reference = reference_probabilities(reference_module, holdout)
    labelled = holdout_targets is not None and len(holdout_targets) > 0
    weak = weak_gate_warning(len(holdout))
    if weak:
        log.warning("%s", weak)
    seconds: dict[str, float] = {}  # each candidate's forward time on the held-out images
    for candidate in candidates:
        name = candidate.name
        candidate.predict(holdout[:1])  # opens (compiles) it: not timed
        start = time.perf_counter()
        probabilities = candidate.predict(holdout)
        seconds[name] = time.perf_counter() - start
        fp32_seconds = seconds.get(f"{candidate.engine}-fp32")
        figures = gate_figures(probabilities, reference, holdout_targets if labelled else None)
        agreement, accuracy = figures.agreement, figures.accuracy
        reference_accuracy = figures.reference_accuracy
        ece = None
        fit = Refit()
        if holdout_targets is not None and labelled:
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
        speedup = (
            fp32_seconds / seconds[name] if fp32_seconds and candidate.precision != "fp32" else None
        )
        if refused:
            reason = (
                f"{refused} ({len(holdout)} {evaluated_on}; "
                + refusal_detail(
                    probabilities,
                    reference,
                    min_agreement,
                    fp32_layers=candidate.fp32_layers,
                    speedup=speedup,
                    accuracy_change_interval=figures.accuracy_change_interval,
                )
                + ")"
                + (f"; {weak}" if weak else "")
            )
            if candidate.quantization == "accuracy-control":
                reason = f"{built.skipped[name]}; {ACCURACY_CONTROL_ATTEMPT}{reason}"
            built.skipped[name] = reason
            if candidate.retry is not None and accuracy_control:
                log.warning("%s refused: %s; trying accuracy control", name, refused)
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
                agreement_lower=figures.agreement_lower,
                accuracy_change_lower=figures.accuracy_change_interval[0]
                if figures.accuracy_change_interval
                else None,
                accuracy_change_upper=figures.accuracy_change_interval[1]
                if figures.accuracy_change_interval
                else None,
                gate_warning=weak,
                fp32_layers=candidate.fp32_layers,
                speedup=speedup,
            )
            built.forms.append((form, candidate.folder))
            continue
        # One line as the build goes; the figures and why once, in the build's summary.
        attempt = ACCURACY_CONTROL_ATTEMPT if candidate.quantization == "accuracy-control" else ""
        log.warning(
            "%s refused by the gate: %s%s (why, in figures: below, and in `perito models show`)",
            name,
            attempt,
            refused,
        )
    build.remove_unkept()
    return built


@dataclass(frozen=True)
class GateFigures:
    """What the gate measured of one form on N held-out images.

    Attributes:
        images: N.
        agreement: the share of images whose top-1 class is model.pt's.
        agreement_lower: its 95% Wilson lower bound (`perito_core.stats.wilson_interval`).
        accuracy, reference_accuracy: the form's and model.pt's top-1 accuracy, with labels.
        accuracy_change_interval: the 95% interval of `accuracy - reference_accuracy`, paired
            (same images) by Newcombe's method 10 (`paired_difference_interval`), with labels.
    """

    images: int
    agreement: float
    agreement_lower: float
    accuracy: float | None = None
    reference_accuracy: float | None = None
    accuracy_change_interval: tuple[float, float] | None = None


def gate_figures(
    probabilities: np.ndarray, reference: np.ndarray, targets: np.ndarray | None = None
) -> GateFigures:
    """The gate's figures of a form's probabilities against model.pt's.

    Args:
        probabilities: the form's float probabilities (N, C).
        reference: model.pt's on the same images (N, C).
        targets: their class indices (N,), when known.

    Raises:
        ValueError: shapes that differ, or targets of another length.
    """
    if probabilities.shape != reference.shape:
        raise ValueError(f"probabilities {probabilities.shape} against {reference.shape}")
    images = len(reference)
    agreed = int(np.sum(probabilities.argmax(1) == reference.argmax(1)))
    lower = wilson_interval(agreed, images)[0]
    if targets is None:
        return GateFigures(images, agreed / images if images else 0.0, lower)
    if len(targets) != images:
        raise ValueError(f"{len(targets)} targets for {images} images")
    right = probabilities.argmax(1) == targets
    reference_right = reference.argmax(1) == targets
    interval = paired_difference_interval(
        int(np.sum(right & reference_right)),
        int(np.sum(right & ~reference_right)),
        int(np.sum(~right & reference_right)),
        int(np.sum(~right & ~reference_right)),
    )
    return GateFigures(
        images,
        agreed / images if images else 0.0,
        lower,
        accuracy=float(np.mean(right)) if images else None,
        reference_accuracy=float(np.mean(reference_right)) if images else None,
        accuracy_change_interval=interval,
    )


# A disagreement is a near-tie when model.pt's own top-1 and top-2 probabilities on that image
# differ by less than this: there any quantization noise can swap them, and the form's answer
# was barely model.pt's either.
NEAR_TIE_MARGIN = 0.05


def refusal_detail(
    probabilities: np.ndarray,
    reference: np.ndarray,
    min_agreement: float = MIN_AGREEMENT,
    *,
    fp32_layers: Sequence[str] = (),
    speedup: float | None = None,
    accuracy_change_interval: tuple[float, float] | None = None,
    near_tie: float = NEAR_TIE_MARGIN,
) -> str:
    """By how much and why a form missed the agreement gate, for its refusal (the CLI and the
    card's skipped reason): the images agreed on and the 95% lower bound, how many more had
    to agree to reach `min_agreement`, how many disagreements were near-ties in model.pt
    (its top-1 minus top-2 probability under `near_tie`), the accuracy change's interval
    with labels, the layers kept FP32 and the speed-up over the same engine's FP32 form the
    form would have given.

    Args:
        probabilities: the form's float probabilities (N, C).
        reference: model.pt's on the same images (N, C), C >= 2.
        fp32_layers: the layers the form kept in FP32 (`Candidate.fp32_layers`).
        speedup: its forward-time speed-up over the FP32 form; None: not measured.
        accuracy_change_interval: the 95% interval of its accuracy change (fractions), with
            labels (`GateFigures`): a loss of one image in 210 is 0.48 points, over the
            gate's 0.3, and the interval shows what the images can tell.

    Raises:
        ValueError: shapes that differ.
    """
    if probabilities.shape != reference.shape:
        raise ValueError(f"probabilities {probabilities.shape} against {reference.shape}")
    images = len(reference)
    disagree = probabilities.argmax(1) != reference.argmax(1)
    agreed = images - int(disagree.sum())
    needed = math.ceil(round(min_agreement * images, 9))
    top2 = np.sort(reference, axis=1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    ties = int(np.sum(disagree & (margins < near_tie)))
    text = f"{agreed} of {images} agree, 95% lower bound {wilson_interval(agreed, images)[0]:.2%}"
    if agreed < needed:
        text += f"; {needed - agreed} more had to agree for {min_agreement:.0%}"
    if disagree.any():
        count = int(disagree.sum())
        text += (
            f"; {ties} of the {count} disagreement{'s' if count > 1 else ''} "
            f"{'were' if count > 1 else 'was'} near-ties in model.pt (top-1 minus top-2 "
            f"probability under {near_tie:g}), the largest margin flipped "
            f"{float(margins[disagree].max()):.3f}"
        )
    if accuracy_change_interval is not None:
        low, high = accuracy_change_interval
        text += f"; accuracy change 95% interval {100 * low:+.2f} to {100 * high:+.2f} points"
    if fp32_layers:
        shown = ", ".join(fp32_layers[:4]) + (", ..." if len(fp32_layers) > 4 else "")
        plural = "s" if len(fp32_layers) > 1 else ""
        text += f"; {len(fp32_layers)} layer{plural} kept FP32 ({shown})"
    if speedup is not None:
        text += f"; it would have run at {speedup:.2f}x the FP32 form's images/s"
        if speedup <= 1.0:
            text += " (no faster than FP32: `auto` would not have served it had it passed)"
    return text


def weak_gate_warning(images: int) -> str:
    """The warning of a gate on fewer than `MIN_GATE_IMAGES` held-out images ('' when it has
    enough), saying what even full agreement on them would show."""
    if images >= MIN_GATE_IMAGES:
        return ""
    best = wilson_interval(images, images)[0]
    return (
        f"weak gate: {images} held-out images, under {MIN_GATE_IMAGES}: even 100% agreement "
        f"on them only shows above {best:.1%} (95% lower bound)"
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
    """Why the publish gate refuses a form with these figures, or None when it passes.

    The rule is on the point estimates (agreement at least `min_agreement`, accuracy at most
    `max_accuracy_drop` under model.pt's), not on their 95% bounds: a bound of 99% needs
    about 380 images that all agree, so it would refuse everything on the 200 held-out images
    the gate asks for (module docstring). The bounds are reported beside the decision."""
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
    accuracy_control: bool = True,
) -> BuiltForms:
    """`build_forms` for an imported model: the user's folder of images (no labels), prepared
    by the serving code.

    A folder holding the two subfolders `calibration/` and `held-out/` (as
    `perito_core.models.gate_images.GateImages.write` makes) is split by them: INT8 is
    calibrated on the first (at most `MAX_CALIBRATION_IMAGES`) and every form verified on the
    second (at most `limit` minus those), so the user decides what the gate never saw. Any
    other folder's images (sorted by path, at most `limit`) alternate: calibration, held-out.

    `accuracy_control` is on, as at publish: it is bounded in time
    (`openvino.ACCURACY_CONTROL_SECONDS`), and EfficientNet-Lite0's whole OpenVINO build and
    gate, accuracy control included, took 109 s on a 2-core EPYC limited to AVX2 (it took
    6-20 minutes unbounded)."""
    spec = contract.spec()
    split = (folder / "calibration").is_dir() and (folder / "held-out").is_dir()
    if split:
        calibration = _read_images(folder / "calibration", spec, MAX_CALIBRATION_IMAGES)
        holdout = _read_images(folder / "held-out", spec, limit - len(calibration))
        evaluated_on = f"images of {folder.name}/held-out"
    else:
        images = _read_images(folder, spec, limit)
        calibration, holdout = images[0::2], images[1::2]
        evaluated_on = f"images of {folder.name} not used for calibration"
    if not calibration or not holdout:
        reason = (
            f"{folder}/calibration or {folder}/held-out holds no readable image"
            if split
            else f"{folder} holds fewer than 2 readable images to calibrate and verify on"
        )
        return BuiltForms(skipped={f"{e}-{p}": reason for e in ENGINE_NAMES for p in precisions})
    return build_forms(
        model_path,
        contract,
        out_dir,
        calibration=np.stack(calibration),
        holdout=np.stack(holdout),
        evaluated_on=evaluated_on,
        accuracy_control=accuracy_control,
        precisions=precisions,
        min_agreement=min_agreement,
        max_accuracy_drop=max_accuracy_drop,
    )


def _read_images(folder: Path, spec: InputSpec, limit: int) -> list[np.ndarray]:
    """The readable images under `folder` (sorted by path, at most `limit`), prepared for the
    model (uint8 (H, W, 3) each); unreadable ones logged and left out."""
    from perito_core.errors import InvalidImage
    from perito_core.imaging import load_model_input
    from perito_core.jobs.sources import is_ignored_key

    images: list[np.ndarray] = []
    for path in sorted(folder.rglob("*")):
        if len(images) >= limit:
            break
        if path.is_file() and not is_ignored_key(path.relative_to(folder).as_posix()):
            try:
                images.append(load_model_input(path.read_bytes(), spec))
            except InvalidImage as error:
                log.info("calibration: %s left out: %s", path, error.message)
    return images
