"""What every engine shares: the loaded-model interface, the engine protocol, and what a build
hands to each engine and gets back (`BuildContext`, `Candidate`).

The artifact contract every loaded model honours: uint8 RGB images (N, H, W, 3) at the
manifest's input size in, float32 class probabilities (N, labels) out.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from perito.v1.vocabulary import refusal_paragraphs
from perito_core.errors import ModelLoadError
from perito_core.models.manifest import MIN_AGREEMENT, CompiledForm, InputContract, ModelManifest
from perito_core.models.summary import output_faults

# At most this many calibration images go to a quantizer (NNCF's own default subset is 300).
MAX_CALIBRATION_IMAGES = 300
# The forms and model.pt run the held-out and calibration images this many at a time.
BATCH_SIZE = 32
# At load, how far an image's probabilities may move between it alone and in a batch
# (`LoadedModel._check_contract`): kernels chosen per batch size differ by about 1e-6 in
# FP32 and 1e-3 in FP16; a model that mixes its batch's images moves them by far more.
BATCH_INDEPENDENCE_ATOL = 5e-3

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


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` takes the first CUDA device when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class LoadedModel:
    """A form of a model version in memory, ready for `predict`.

    Not thread-safe for concurrent `predict` calls by design: a model runs one batch at a
    time on its device, and callers (the server's batcher, a worker) serialise the calls.
    Each engine's subclass implements `_forward`.
    """

    def __init__(self, manifest: ModelManifest, device: torch.device, form: str) -> None:
        self.manifest = manifest
        self.device = device
        self.labels = manifest.labels
        self.load_seconds = 0.0
        # Which form answers (`torchscript-fp32`, `openvino-int8`, ...), and why the faster
        # ones were passed over (form name -> reason), for logs and `GetModel`.
        self.form = form
        self.passed_over: dict[str, str] = {}

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Probabilities, float32 (N, labels) on the CPU, for uint8 images (N, 3, H, W)."""
        raise NotImplementedError

    def _random_batch(self, batch_size: int) -> torch.Tensor:
        spec = self.manifest.input
        return torch.randint(0, 256, (batch_size, 3, spec.height, spec.width), dtype=torch.uint8)

    def _probe_batch(self) -> torch.Tensor:
        """The images a model is checked on at load (`_check_contract`): uint8 (3, 3, H, W),
        noise over all levels, dark red noise (R 128-191, G and B 0-63) and bright yellow
        noise (R and G 192-255, B 64-127): unlike each other in level and colour, so that an
        answer leaning on its batch shows."""
        probe = self._random_batch(3) // 4  # 0-63
        probe[0] *= 4
        probe[1, 0] += 128
        probe[2, :2] += 192
        probe[2, 2] += 64
        return probe

    def _check_contract(self, probe: torch.Tensor, output: torch.Tensor) -> None:
        """Raises ModelLoadError when `output`, the model's answer for the batch `probe`, is not
        (N, labels) probabilities (`_check_output`), or when an image of `probe` run alone is
        answered otherwise than in the batch (by more than `BATCH_INDEPENDENCE_ATOL`): dynamic
        batching puts different callers' (and tenants') images in one batch, so an answer
        must depend on its own image only."""
        self._check_output(output, len(probe))
        alone = torch.cat([self._forward(probe[i : i + 1]) for i in range(len(probe))])
        difference = float((alone - output).abs().max())
        if not difference <= BATCH_INDEPENDENCE_ATOL:
            raise ModelLoadError(
                f"{self.manifest.name}@{self.manifest.version}: an image's answer depends on "
                f"the other images of its batch (a probability moved by {difference:.4f} "
                "between the image alone and in a batch of 3); every image must be answered "
                "on its own (a batch statistic, such as BatchNorm in training mode, inside "
                "the model?)"
            )

    def _check_output(self, output: torch.Tensor, batch_size: int) -> None:
        """Raises ModelLoadError when `output` is not (batch_size, labels) probabilities: each
        value in [0, 1] and each row summing to 1, within `summary.PROBABILITY_TOLERANCE`."""
        expected = (batch_size, len(self.labels))
        if tuple(output.shape) != expected:
            raise ModelLoadError(
                f"{self.manifest.name}@{self.manifest.version}: the module returns shape "
                f"{tuple(output.shape)} for a batch of {batch_size}; the manifest's "
                f"{len(self.labels)} labels need {expected}"
            )
        faults = output_faults(list(output.numpy()))
        if faults:
            row = output[next(iter(faults))]
            raise ModelLoadError(
                f"{self.manifest.name}@{self.manifest.version}: outputs are not probabilities "
                f"(one image's run from {float(row.min()):.4g} to {float(row.max()):.4g} and "
                f"sum to {float(row.sum()):.4g}); the artifact contract is probabilities, "
                "each in [0, 1] and summing to 1 (softmax inside the module)"
            )

    def warm(self, batch_sizes: Sequence[int]) -> None:
        """Run random batches twice at each size, so that no request pays for a first run."""
        for batch_size in batch_sizes:
            for _ in range(2):
                self._forward(self._random_batch(batch_size))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities for a batch of prepared images.

        Args:
            images: uint8 array (N, H, W, 3) at the manifest's input size.

        Returns:
            float32 array (N, number of labels).
        """
        if not images.flags.writeable:  # PIL's arrays are read-only; torch wants to own one
            images = images.copy()
        batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        return self._forward(batch).numpy()


def nchw(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) images as a C-contiguous (N, 3, H, W) array."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def in_batches(images: np.ndarray, run: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`run`'s probabilities for uint8 `images` (N, H, W, 3), handed to it as uint8 NCHW
    batches of `BATCH_SIZE`, concatenated."""
    batches = (nchw(images[i : i + BATCH_SIZE]) for i in range(0, len(images), BATCH_SIZE))
    return np.concatenate([run(batch) for batch in batches])


@dataclass
class BuiltForms:
    """What a build made: the forms that passed the gate (with their folders; OpenVINO's BF16
    and FP32 share one), and why not others."""

    forms: list[tuple[CompiledForm, Path]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def remove_files(self) -> None:
        """Delete the forms' folders (once published)."""
        for _, folder in self.forms:
            shutil.rmtree(folder, ignore_errors=True)

    def summary(self) -> list[str]:
        """One line per form built: the gate's evidence (`CompiledForm.evidence`: agreement,
        its 95% lower bound, accuracy change); for a form not built, why, one wrapped
        paragraph per attempt as `perito models show` prints it (`refusal_paragraphs`)."""
        lines = [f"{form.name}: {form.evidence()}" for form, _ in self.forms]
        for name, reason in self.skipped.items():
            lines.append(f"{name}: not built:")
            lines += refusal_paragraphs(reason, indent="  ")
        return lines


@dataclass
class Candidate:
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
    # The layers an INT8 form keeps in FP32 (`CompiledForm.fp32_layers`).
    fp32_layers: list[str] = field(default_factory=list)
    # What builds the form again when the gate refuses it (plain OpenVINO INT8: quantized
    # again with accuracy control); None: nothing.
    retry: Callable[[], Candidate | None] | None = None

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
class BuildContext:
    """What each engine builds its forms from, and where they go: the TorchScript reference,
    its contract, the output folder, the precisions asked for, the calibration images (uint8
    (N, H, W, 3), at most `MAX_CALIBRATION_IMAGES`); the built candidates into `candidates`,
    the reasons for any not built into `built.skipped`, and every folder made (`folder`) into
    `made`, for `remove_unkept` to remove those no kept form is in.

    For OpenVINO's accuracy control (`openvino.quantize`): `validation`, the images it tunes
    on (default the calibration images), `control_agreement`, the agreement it aims at, and
    `control_metric` (`agreement` or `fidelity`)."""

    module: torch.jit.ScriptModule
    contract: InputContract
    out_dir: Path
    precisions: Sequence[str]
    images: np.ndarray
    built: BuiltForms
    candidates: list[Candidate]
    made: list[Path] = field(default_factory=list)
    validation: np.ndarray | None = None
    control_agreement: float = MIN_AGREEMENT
    control_metric: str = "agreement"

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


class Engine(Protocol):
    """One engine of compiled forms (`CompiledForm.engine`): how it is named, whether it is
    installed here, how it opens a stored form, and how it builds candidates from model.pt."""

    @property
    def name(self) -> str:
        """As in form names and `CompiledForm.engine`: `openvino`, `onnxruntime`."""
        ...

    @property
    def title(self) -> str:
        """For people: `OpenVINO`, `ONNX Runtime`."""
        ...

    @property
    def suffix(self) -> str:
        """The suffix of the file a stored form is opened by: `.xml`, `.onnx`."""
        ...

    def version(self) -> str | None:
        """The installed engine's version, or None when it is not installed."""
        ...

    def load(self, path: Path, manifest: ModelManifest, form: CompiledForm) -> LoadedModel:
        """Open the verified form file at `path`, check it honours the contract.

        Raises:
            ModelLoadError: the form does not open here or breaks the contract.
        """
        ...

    def build(self, build: BuildContext) -> None:
        """The engine's forms of `build.module` at `build.precisions` into `build.candidates`,
        or why not into `build.built.skipped` (never raises for a form it cannot build)."""
        ...
