"""Load a TorchScript model version and run batches through it.

The module honours the artifact contract (uint8 NCHW RGB in, probabilities out). At load it is
frozen and optimised for inference (conv/batch-norm folding, oneDNN layouts: about twice the
CPU throughput at batch 4-8), checked against the unoptimised module, and warmed up at every
batch size it will see, so that no request pays for TorchScript's first-shape profiling.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from perito_core.errors import ModelLoadError
from perito_core.models.manifest import ModelManifest

log = logging.getLogger(__name__)

# The reference form: model.pt as TorchScript, FP32.
TORCHSCRIPT_FORM = "torchscript-fp32"


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` takes the first CUDA device when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class LoadedModel:
    """A model version in memory, ready for `predict`.

    Not thread-safe for concurrent `predict` calls by design: a model runs one batch at a
    time on its device, and callers (the server's batcher, a worker) serialise the calls.
    """

    def __init__(
        self, module: torch.jit.ScriptModule, manifest: ModelManifest, device: torch.device
    ) -> None:
        self.module = module
        self.manifest = manifest
        self.device = device
        self.labels = manifest.labels
        self.load_seconds = 0.0
        # Which form answers (`torchscript-fp32`, `openvino-int8`, ...), and why the faster
        # ones were passed over (form name -> reason), for logs and `GetModel`.
        self.form = TORCHSCRIPT_FORM
        self.passed_over: dict[str, str] = {}

    @classmethod
    def load(
        cls,
        path: Path,
        manifest: ModelManifest,
        *,
        device: str = "auto",
        optimize: bool = True,
        warmup_batch_sizes: tuple[int, ...] = (1,),
    ) -> LoadedModel:
        """Load, check and warm a TorchScript file that has already been sha256-verified.

        Raises:
            ModelLoadError: the file is not TorchScript, or its output breaks the contract.
        """
        start = time.perf_counter()
        target = pick_device(device)
        try:
            with warnings.catch_warnings():
                # torch 2.14 marks TorchScript deprecated; it is our artifact format (DESIGN.md).
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location=target).eval()  # type: ignore[no-untyped-call]
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
        for batch_size in warmup_batch_sizes:
            for _ in range(2):
                model._forward(model._random_batch(batch_size))
        model.load_seconds = time.perf_counter() - start
        return model

    def _random_batch(self, batch_size: int) -> torch.Tensor:
        spec = self.manifest.input
        return torch.randint(0, 256, (batch_size, 3, spec.height, spec.width), dtype=torch.uint8)

    def _check_output(self, output: torch.Tensor, batch_size: int) -> None:
        expected = (batch_size, len(self.labels))
        if tuple(output.shape) != expected:
            raise ModelLoadError(
                f"{self.manifest.name}@{self.manifest.version}: the module returns shape "
                f"{tuple(output.shape)} for a batch of {batch_size}; the manifest's "
                f"{len(self.labels)} labels need {expected}"
            )
        sums = output.sum(dim=1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            raise ModelLoadError(
                f"{self.manifest.name}@{self.manifest.version}: outputs do not sum to 1; the "
                "artifact contract is probabilities (softmax inside the module)"
            )

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            output: torch.Tensor = self.module(batch.to(self.device, non_blocking=True))
        return output.float().cpu()

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
