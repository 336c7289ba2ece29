"""FP16 on a CUDA device, served only where it agrees with FP32: the check at load.

A version's compiled forms were gated at publish (`perito_core.models.gate`); a GPU runs
`model.pt` itself, and half precision there is decided when a worker loads it
(`serve_fp16`): the FP16 form (`TorchScriptModel.reduced`, `torchscript-fp16`) and the FP32
model that loaded answer the same held-out images, and FP16 serves only if the publish gate's
rule passes it (`gate.gate_reason`: top-1 agreement with FP32 at least `MIN_AGREEMENT`, 99%),
its figures logged with their 95% Wilson lower bound (`gate.gate_figures`) and the weak-gate
warning under `MIN_GATE_IMAGES`. A form that does not pass (or cannot be made) is passed over
with the reason (`LoadedModel.passed_over`, as `selection` records its forms), and FP32
serves.

The held-out images (`held_out_images`): the gate's own (`gate_images`: 240 framings of the
six held-out sample photos and of generated scenes) where scikit-image and scikit-learn are
installed (the dev extra); elsewhere (the serve install of a GPU worker) 240 framings of
generated scenes at the held-out seeds. Neither is the version's own data: the registry keeps
no images of a version. Both are far from most models' training images, where their answers
are least certain and reduced precision flips top-1 most easily, so a pass on them is not a
lenient test.

Only `auto` lets FP16 serve (the caller asks `serve_fp16` only then): `fp32` and `torchscript`
name FP32, and FP16 is less exact than any precision a request can name.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from perito_core.imaging import InputSpec, load_model_input
from perito_core.models.engines.base import BATCH_SIZE, LoadedModel
from perito_core.models.engines.torchscript import (
    REDUCED_FORMS,
    TORCHSCRIPT_FORM,
    TorchScriptModel,
)
from perito_core.models.gate import gate_figures, gate_reason, refusal_detail, weak_gate_warning
from perito_core.models.gate_images import HELD_OUT_SEED, frame, gate_images, scene
from perito_core.models.manifest import MIN_AGREEMENT

log = logging.getLogger(__name__)

# Held-out images the check runs on: as many as the gate's (`gate_images`' default).
HELD_OUT_IMAGES = 240


def _scene_framings(count: int) -> dict[str, bytes]:
    """`count` framings of generated scenes at the gate's held-out seeds, as JPEG bytes
    (`gate_images`' scenes, without its photos)."""
    rng = np.random.default_rng(0)
    files = {}
    for seed in range(HELD_OUT_SEED, HELD_OUT_SEED + count):
        files[f"scene-{seed}.jpg"] = frame(scene(seed), rng)
    return files


@functools.cache
def held_out_images(spec: InputSpec) -> tuple[np.ndarray, str]:
    """The held-out images the check runs on, prepared for `spec` as serving prepares images
    (`load_model_input`): uint8 (240, H, W, 3), and what they are, for the log. Made once per
    process and recipe (about 2 s on one core)."""
    try:
        files = gate_images().held_out
        what = "gate held-out images (framings of sample photos and generated scenes)"
    except RuntimeError:  # scikit-image or scikit-learn not installed: scenes only
        files = _scene_framings(HELD_OUT_IMAGES)
        what = "held-out framings of generated scenes"
    images = np.stack([load_model_input(data, spec) for data in files.values()])
    return images, what


def probabilities(model: LoadedModel, images: np.ndarray) -> np.ndarray:
    """`model`'s probabilities, float32 (N, classes), for uint8 `images` (N, H, W, 3), in
    batches of `BATCH_SIZE`."""
    return np.concatenate(
        [model.predict(images[i : i + BATCH_SIZE]) for i in range(0, len(images), BATCH_SIZE)]
    )


def agreement_verdict(
    reference: np.ndarray,
    candidate: np.ndarray,
    what: str,
    min_agreement: float = MIN_AGREEMENT,
) -> tuple[str, str | None]:
    """The gate's rule on a reduced-precision form's probabilities against FP32's.

    Args:
        reference: the FP32 model's probabilities (N, C) on the held-out images.
        candidate: the reduced form's on the same images (N, C).
        what: what the images are, for the text.
        min_agreement: the top-1 agreement it needs.

    Returns:
        The evidence in one line (agreement, 95% lower bound, images, the weak-gate warning),
        and the refusal (with `gate.refusal_detail`'s account of the disagreements), or None
        when it passes.

    Raises:
        ValueError: shapes that differ.
    """
    figures = gate_figures(candidate, reference)
    weak = weak_gate_warning(figures.images)
    evidence = (
        f"top-1 agreement with FP32 {figures.agreement:.2%} on {figures.images} {what} "
        f"(95% lower bound {figures.agreement_lower:.2%})" + (f"; {weak}" if weak else "")
    )
    refused = gate_reason(figures.agreement, None, None, min_agreement)
    if refused is None:
        return evidence, None
    detail = refusal_detail(candidate, reference, min_agreement)
    return evidence, f"{refused} ({figures.images} {what}; {detail})"


def serve_verified(
    reference: LoadedModel,
    candidate: LoadedModel,
    images: np.ndarray,
    what: str,
    min_agreement: float = MIN_AGREEMENT,
) -> LoadedModel:
    """`candidate` (a reduced-precision form of `reference`'s model) where it agrees with
    `reference` on `images` (`agreement_verdict`), else `reference`, with why `candidate` was
    passed over in its `passed_over`. Either way logged with the evidence.

    Args:
        reference: the FP32 model that loaded.
        candidate: the same model in reduced precision, on the same device.
        images: uint8 (N, H, W, 3) held-out images at the manifest's input size.
        what: what the images are, for the log and the reason.
        min_agreement: the top-1 agreement `candidate` needs.
    """
    label = f"{reference.manifest.name}@{reference.manifest.version}"
    evidence, refused = agreement_verdict(
        probabilities(reference, images), probabilities(candidate, images), what, min_agreement
    )
    if refused is not None:
        reference.passed_over[candidate.form] = refused
        log.warning("%s: not serving %s: %s", label, candidate.form, refused)
        return reference
    candidate.passed_over = dict(reference.passed_over)
    candidate.load_seconds = reference.load_seconds
    log.info("%s: %s serves on %s: %s", label, candidate.form, candidate.device, evidence)
    return candidate


def serve_fp16(model: LoadedModel, warmup_batch_sizes: Sequence[int] = (1,)) -> LoadedModel:
    """The model a worker serves at `auto`, given `model` as `selection.load_model` loaded
    it: on a CUDA device, its FP16 form where that agrees with it (`serve_reduced`), else
    `model` with the reason in `passed_over`; `model` itself on the CPU (FP16 convolutions
    there are no faster: the CPU path's fast forms are the compiled ones).

    Args:
        model: the loaded model.
        warmup_batch_sizes: the batch sizes the FP16 form is warmed at, as `model` was.
    """
    if model.device.type != "cuda":
        return model
    return serve_reduced(model, warmup_batch_sizes)


def serve_reduced(
    model: LoadedModel,
    warmup_batch_sizes: Sequence[int] = (1,),
    *,
    dtype: torch.dtype = torch.float16,
    images: tuple[np.ndarray, str] | None = None,
) -> LoadedModel:
    """`model`'s `dtype` form where it agrees with `model` (`serve_verified`), else `model`
    with the reason in `passed_over`, on whatever device `model` is (`serve_fp16` asks only
    on CUDA; the tests, on the CPU). `model` itself when it is not TorchScript's `model.pt`
    (a compiled form, an ONNX model): those were gated at publish.

    Args:
        model: the loaded model.
        warmup_batch_sizes: the batch sizes the reduced form is warmed at.
        dtype: the reduced precision (`REDUCED_FORMS`).
        images: the held-out images (uint8 (N, H, W, 3)) and what they are; default
            `held_out_images` of the manifest's recipe.
    """
    if not isinstance(model, TorchScriptModel) or model.form != TORCHSCRIPT_FORM:
        return model
    form = REDUCED_FORMS.get(dtype, str(dtype))
    label = f"{model.manifest.name}@{model.manifest.version}"
    start = time.perf_counter()
    try:
        candidate = model.reduced(dtype, tuple(warmup_batch_sizes))
        held_out, what = images or held_out_images(model.manifest.input.spec())
    except Exception as error:  # noqa: BLE001 - FP32 serves whatever kept the form from the check
        reason = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
        model.passed_over[form] = reason
        log.warning("%s: not serving %s: %s", label, form, reason)
        served: LoadedModel = model
    else:
        served = serve_verified(model, candidate, held_out, what)
    served.load_seconds = model.load_seconds + time.perf_counter() - start  # the check's too
    return served
