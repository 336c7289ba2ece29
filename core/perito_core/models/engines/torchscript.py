"""TorchScript: `model.pt`, the reference every compiled form is measured against and the form
that serves when no other does.

At load the module is frozen and optimised for inference (conv/batch-norm folding, oneDNN
layouts: about twice the CPU throughput at batch 4-8), checked against the unoptimised module,
and warmed up at every batch size it will see, so that no request pays for TorchScript's
first-shape profiling. At build, it gives the reference probabilities the gate compares each
candidate form with.

On a CUDA device the same file may also run in half precision (`TorchScriptModel.reduced`,
form `torchscript-fp16`): the artifact's `network` cast to float16, its input scaled in
float32 and cast, its logits softmaxed in float32 (`ReducedPrecisionClassifier`). It serves
only once it agrees with FP32 on held-out images
(`perito_core.models.reduced_precision.serve_fp16`).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from perito_core.errors import ModelLoadError, describe_exception
from perito_core.models.engines.base import LoadedModel, in_batches, pick_device
from perito_core.models.manifest import ModelManifest

log = logging.getLogger(__name__)

# The reference form: model.pt as TorchScript, FP32.
TORCHSCRIPT_FORM = "torchscript-fp32"
# model.pt's network in a reduced precision (`TorchScriptModel.reduced`), by dtype.
REDUCED_FORMS = {torch.float16: "torchscript-fp16", torch.bfloat16: "torchscript-bf16"}
# What an artifact exposes for its network to run alone (`perito_training.export`).
_PARTS = ("network", "scale", "shift", "temperature")


def load_module(path: Path, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript file at `path` in eval mode on `device`. torch marks TorchScript
    deprecated (a FutureWarning); it is the artifact format, so the warning is not shown.

    Raises:
        Whatever `torch.jit.load` raises for a file that is not TorchScript.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module: torch.jit.ScriptModule = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
    return module.eval()


def reference_probabilities(module: torch.jit.ScriptModule, images: np.ndarray) -> np.ndarray:
    """model.pt's probabilities, float32 (N, classes), for uint8 `images` (N, H, W, 3)."""
    with torch.inference_mode():
        return in_batches(images, lambda batch: module(torch.from_numpy(batch)).float().numpy())


class ReducedPrecisionClassifier(nn.Module):
    """uint8 (N, 3, H, W) images -> float32 (N, classes) probabilities, the artifact's own
    `network` run in `dtype` (float16 or bfloat16): `softmax(network((images * scale +
    shift).to(dtype)).float() / temperature)`. The scaling and the softmax stay float32, as
    autocast keeps them (PyTorch's autocast op lists): they are cheap, and a softmax in float16
    would round probabilities the answers report to 3 decimal digits.

    Args:
        artifact: a TorchScript artifact with `network`, `scale`, `shift` and `temperature`
            (`perito_training.export.ImageClassifier`); its network is cast in place, so pass
            a copy of your own.
        dtype: the network's precision.
    """

    scale: torch.Tensor
    shift: torch.Tensor
    temperature: torch.Tensor

    def __init__(self, artifact: torch.jit.ScriptModule, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.network: nn.Module = artifact.network.to(dtype)
        for name in ("scale", "shift", "temperature"):
            buffer: torch.Tensor = getattr(artifact, name)
            self.register_buffer(name, buffer.detach().clone().float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() * self.scale + self.shift).to(self.dtype)
        logits: torch.Tensor = self.network(x)
        return torch.softmax(logits.float() / self.temperature, dim=1)


class TorchScriptModel(LoadedModel):
    """model.pt loaded by TorchScript, on the CPU or a CUDA device."""

    def __init__(
        self,
        module: torch.jit.ScriptModule | nn.Module,
        manifest: ModelManifest,
        device: torch.device,
        form: str = TORCHSCRIPT_FORM,
    ) -> None:
        super().__init__(manifest, device, form)
        self.module = module
        # The verified file it was loaded from (`load`), which `reduced` opens again.
        self.path: Path | None = None

    @classmethod
    def load(
        cls,
        path: Path,
        manifest: ModelManifest,
        *,
        device: str = "auto",
        optimize: bool = True,
        warmup_batch_sizes: tuple[int, ...] = (1,),
    ) -> TorchScriptModel:
        """Load, check and warm a TorchScript file that has already been sha256-verified.

        Raises:
            ModelLoadError: the file is not TorchScript, or its output breaks the contract.
        """
        start = time.perf_counter()
        target = pick_device(device)
        try:
            module = load_module(path, target)
        except Exception as exc:  # noqa: BLE001 - any failure here is a bad artifact
            raise ModelLoadError(
                f"{manifest.name}@{manifest.version}: not a loadable TorchScript file: {exc}"
            ) from None
        model = cls(module, manifest, target)
        model.path = path
        probe = model._probe_batch()
        try:
            reference = model._forward(probe)
        except Exception as exc:  # noqa: BLE001 - a module that cannot take the contract's input
            raise ModelLoadError(
                f"{manifest.name}@{manifest.version}: the module fails on a batch of 3 uint8 "
                f"images (3, 3, {manifest.input.height}, {manifest.input.width}), the artifact "
                f"contract's input ({describe_exception(exc)}); a module written for float "
                "input must take uint8 and normalise inside (docs/models.md, Publishing a "
                "model)"
            ) from None
        model._check_contract(probe, reference)
        if optimize:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    optimized = torch.jit.optimize_for_inference(torch.jit.freeze(module))
                model.module = optimized
                if not torch.allclose(model._forward(probe), reference, atol=1e-3):
                    raise ValueError("optimised output differs from the original")
            except Exception as exc:  # noqa: BLE001 - fall back, never fail on an optimisation
                log.warning("%s: serving unoptimised (%s)", manifest.name, exc)
                model.module = module
        model.warm(warmup_batch_sizes)
        model.load_seconds = time.perf_counter() - start
        return model

    def reduced(
        self, dtype: torch.dtype = torch.float16, warmup_batch_sizes: tuple[int, ...] = (1,)
    ) -> TorchScriptModel:
        """The same file on the same device with its network in `dtype`
        (`ReducedPrecisionClassifier`), checked against the contract and warmed; named by
        `REDUCED_FORMS` (`torchscript-fp16`). Not verified against FP32 here: that is
        `perito_core.models.reduced_precision`'s.

        Raises:
            ModelLoadError: the model was not loaded from a file, the file does not expose
                `network`, `scale`, `shift` and `temperature` (an imported TorchScript module
                of another shape), or the reduced network fails or breaks the contract.
        """
        what = f"{self.manifest.name}@{self.manifest.version}"
        form = REDUCED_FORMS.get(dtype, f"torchscript-{dtype}")
        if self.path is None:
            raise ModelLoadError(f"{what}: {form} needs the file the model was loaded from")
        artifact = load_module(self.path, self.device)
        missing = [part for part in _PARTS if not hasattr(artifact, part)]
        if missing:
            raise ModelLoadError(
                f"{what}: {form} runs the artifact's network alone, and this module has no "
                f"{', '.join(missing)} (not a perito_training export)"
            )
        model = TorchScriptModel(
            ReducedPrecisionClassifier(artifact, dtype).eval(), self.manifest, self.device, form
        )
        model.path = self.path
        try:
            probe = model._probe_batch()
            model._check_contract(probe, model._forward(probe))
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - a network that cannot run in dtype
            raise ModelLoadError(f"{what}: {form} fails on a batch of 3: {exc}") from None
        model.warm(warmup_batch_sizes)
        return model

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            output: torch.Tensor = self.module(batch.to(self.device, non_blocking=True))
        return output.float().cpu()
