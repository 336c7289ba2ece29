"""TorchScript: `model.pt`, the reference every compiled form is measured against and the form
that serves when no other does.

At load the module is frozen and optimised for inference (conv/batch-norm folding, oneDNN
layouts: about twice the CPU throughput at batch 4-8), checked against the unoptimised module,
and warmed up at every batch size it will see, so that no request pays for TorchScript's
first-shape profiling. At build, it gives the reference probabilities the gate compares each
candidate form with.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from perito_core.errors import ModelLoadError
from perito_core.models.engines.base import LoadedModel, in_batches, pick_device
from perito_core.models.manifest import ModelManifest

log = logging.getLogger(__name__)

# The reference form: model.pt as TorchScript, FP32.
TORCHSCRIPT_FORM = "torchscript-fp32"


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


class TorchScriptModel(LoadedModel):
    """model.pt loaded by TorchScript, on the CPU or a CUDA device."""

    def __init__(
        self, module: torch.jit.ScriptModule, manifest: ModelManifest, device: torch.device
    ) -> None:
        super().__init__(manifest, device, TORCHSCRIPT_FORM)
        self.module = module

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
        probe = model._random_batch(2)
        reference = model._forward(probe)
        model._check_output(reference, 2)
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

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            output: torch.Tensor = self.module(batch.to(self.device, non_blocking=True))
        return output.float().cpu()
