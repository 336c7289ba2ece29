"""Loading artifacts and reading their outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from perito_core.errors import ModelLoadError
from perito_core.models.engines.torchscript import TorchScriptModel
from perito_core.models.manifest import Artifact, ModelManifest, sha256_file
from perito_core.models.summary import summarize
from perito_training.export import export_torchscript
from tests.helpers import TINY_INPUT, tiny_network, unpublished_manifest


def manifest_for(path: Path, labels: list[str]) -> ModelManifest:
    artifact = Artifact(sha256=sha256_file(path), size_bytes=path.stat().st_size)
    return unpublished_manifest(labels, artifact=artifact)


def test_optimised_module_gives_the_same_probabilities_as_eager(tmp_path: Path) -> None:
    network = tiny_network(3)
    path = tmp_path / "model.pt"
    export_torchscript(network, TINY_INPUT, path)
    model = TorchScriptModel.load(
        path, manifest_for(path, ["a", "b", "c"]), device="cpu", warmup_batch_sizes=(1, 2)
    )
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    expected = torch.softmax(
        network(torch.from_numpy(images).permute(0, 3, 1, 2).float() / (255 * 0.25) - 2.0), dim=1
    )
    np.testing.assert_allclose(model.predict(images), expected.detach().numpy(), atol=1e-4)


def test_label_count_that_does_not_match_the_output_is_refused(tiny_model_file: Path) -> None:
    with pytest.raises(ModelLoadError, match="2 labels"):
        TorchScriptModel.load(
            tiny_model_file, manifest_for(tiny_model_file, ["a", "b"]), device="cpu"
        )


def test_a_file_that_is_not_torchscript_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(ModelLoadError, match="not a loadable TorchScript"):
        TorchScriptModel.load(path, manifest_for(path, ["a", "b", "c"]), device="cpu")


def test_a_module_returning_logits_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "logits.pt"
    scripted = torch.jit.script(_Logits())
    scripted.save(str(path))
    with pytest.raises(ModelLoadError, match="outputs are not probabilities"):
        TorchScriptModel.load(path, manifest_for(path, ["a", "b", "c"]), device="cpu")


class _SumsToOne(torch.nn.Module):
    """Rows that sum to 1 with values outside [0, 1]: not probabilities."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        row = torch.tensor([1.5, -0.5, 0.0])
        return row.expand(images.shape[0], 3) + 0 * images.float().mean()


class _BatchMean(torch.nn.Module):
    """The softmax of the batch's mean colour: each image's answer leans on the others'."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        colour = images.float().mean(dim=(2, 3)) / 64.0  # (N, 3)
        return torch.softmax(colour.mean(dim=0, keepdim=True).expand_as(colour), dim=1)


def test_a_module_whose_rows_sum_to_one_outside_zero_and_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "skewed.pt"
    torch.jit.script(_SumsToOne()).save(str(path))
    with pytest.raises(ModelLoadError, match=r"run from -0.5 to 1.5 and sum to 1"):
        TorchScriptModel.load(path, manifest_for(path, ["a", "b", "c"]), device="cpu")


def test_a_module_whose_answer_depends_on_its_batch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "batch-mean.pt"
    torch.jit.script(_BatchMean()).save(str(path))
    with pytest.raises(ModelLoadError, match="depends on the other images of its batch"):
        TorchScriptModel.load(path, manifest_for(path, ["a", "b", "c"]), device="cpu")


def test_a_module_written_for_float_input_is_refused_in_one_line(tmp_path: Path) -> None:
    """A plain scripted network taking float NCHW printed TorchScript's 80-line traceback at
    import; it is refused saying what the contract's input is and the real error."""
    path = tmp_path / "float.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.Flatten())).save(
        str(path)
    )
    with pytest.raises(ModelLoadError) as refused:
        TorchScriptModel.load(path, manifest_for(path, ["a", "b", "c"]), device="cpu")
    message = str(refused.value)
    assert "fails on a batch of 3 uint8 images" in message and "normalise inside" in message
    assert "RuntimeError: " in message and "Traceback" not in message
    assert "\n" not in message


class _Logits(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(2, 3)) * 3.0


def test_summary_ranks_classes_and_measures_uncertainty() -> None:
    labels = ["minor", "moderate", "severe"]
    confident = summarize(np.array([0.02, 0.03, 0.95]), labels, top_k=2, threshold=0.6)
    assert [p.label for p in confident.predictions] == ["severe", "moderate"]
    assert confident.margin == pytest.approx(0.92)
    assert not confident.uncertain
    torn = summarize(np.array([0.45, 0.44, 0.11]), labels, top_k=5, threshold=0.6)
    assert len(torn.predictions) == 3
    assert torn.uncertain
    assert torn.margin == pytest.approx(0.01)
    assert torn.normalized_entropy > confident.normalized_entropy
    uniform = summarize(np.full(3, 1 / 3), labels, top_k=1, threshold=None)
    assert uniform.normalized_entropy == pytest.approx(1.0)
    assert not uniform.uncertain
