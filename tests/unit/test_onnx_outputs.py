"""Graphs with several outputs: which one serves, and what is refused.

Real ONNX files exported from torch, opened by real ONNX Runtime: a graph whose first output is
an auxiliary head (its top-1 never the class scores' top-1), a converter's `[label,
probabilities]`, and a one-output graph. The served output is the one the manifest's
`tensor.output_name` names; a name that is not an output is refused listing the real ones; a
manifest written before the name was recorded still loads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from perito_core.errors import ModelLoadError
from perito_core.models.engines.onnxruntime import OnnxModel
from perito_core.models.manifest import Artifact, InputContract, ModelManifest, TensorContract
from tests.helpers import unpublished_manifest
from tests.onnx_helpers import (
    WASTE_LABELS,
    auxiliary_first_model,
    keras_rescale,
    label_and_probabilities_model,
    ort_probabilities,
    waste_model,
)

pytest.importorskip("onnxruntime", reason="ONNX Runtime (perito[serve]) not installed")

SIZE = 32
LABELS = ["bolt", "nut", "washer"]
INPUT = InputContract(height=SIZE, width=SIZE, resize_size=SIZE, resize_mode="squash")
ONNX_ARTIFACT = Artifact(file="model.onnx", format="onnx", sha256="0" * 64, size_bytes=0)
RESCALE = TensorContract(layout="NHWC", scale=1 / 255)


def _manifest(
    output_name: str | None, labels: list[str] = LABELS, **contract: str
) -> ModelManifest:
    tensor = RESCALE.model_copy(update={"output_name": output_name, **contract})
    return unpublished_manifest(labels, input=INPUT, artifact=ONNX_ARTIFACT, tensor=tensor)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx-outputs")
    return {
        "heads": auxiliary_first_model(folder / "heads.onnx", SIZE),
        "label": label_and_probabilities_model(folder / "label.onnx", SIZE),
        "waste": waste_model(folder / "waste.onnx", SIZE),
    }


def _images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)


def test_the_named_output_serves_not_the_first(files: dict[str, Path]) -> None:
    images = _images()
    model = OnnxModel.open(files["heads"], _manifest("scores"))
    assert model.output_name == "scores"
    served = model.predict(images)
    scores = ort_probabilities(files["heads"], keras_rescale(images), "scores")
    aux = ort_probabilities(files["heads"], keras_rescale(images), "aux")
    np.testing.assert_allclose(served, scores, atol=1e-5)
    assert (served.argmax(1) != aux.argmax(1)).all()  # the wrong head would show


def test_a_label_then_probabilities_graph_serves_its_probabilities(files: dict[str, Path]) -> None:
    images = _images()
    model = OnnxModel.open(files["label"], _manifest("probabilities"))
    expected = ort_probabilities(files["label"], keras_rescale(images), "probabilities")
    np.testing.assert_allclose(model.predict(images), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("file", "name", "message"),
    [
        (
            "heads",
            "probabilities",
            r"m@1: model.onnx: output name 'probabilities' is not an output of the graph; its "
            r"outputs: 'aux' float32 \[batch, 3\], 'scores' float32 \[batch, 3\]",
        ),
        (
            "label",
            "label",
            r"output 'label' is int64 \[batch\], not class scores \(a float tensor\); its "
            r"outputs: 'label' int64 \[batch\], 'probabilities' float32 \[batch, 3\]",
        ),
    ],
)
def test_a_name_that_cannot_serve_is_refused_listing_the_outputs(
    files: dict[str, Path], file: str, name: str, message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        OnnxModel.open(files[file], _manifest(name))


def test_several_outputs_and_no_name_are_refused_at_import(files: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match=r"has 2 outputs: 'aux' float32 .*--output-name"):
        OnnxModel.open(files["heads"], _manifest(None), require_output_name=True)


def test_a_one_output_graph_needs_no_name_but_a_given_one_must_match(
    files: dict[str, Path],
) -> None:
    unnamed = _manifest(None, WASTE_LABELS, output="sigmoid")
    model = OnnxModel.open(files["waste"], unnamed, require_output_name=True)
    assert model.output_name == "output"
    assert OnnxModel.open(files["waste"], _manifest("output", WASTE_LABELS, output="sigmoid"))
    with pytest.raises(ModelLoadError, match=r"'scores' is not an output .* 'output' float32"):
        OnnxModel.open(files["waste"], _manifest("scores", WASTE_LABELS, output="sigmoid"))


def test_a_manifest_written_before_the_name_was_recorded_still_loads(
    files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Its JSON has no `output_name`: a one-output graph serves as before; one of several
    outputs serves its first, as it was imported and checked, and says so in the log."""
    stored = json.loads(_manifest("scores").model_dump_json())
    del stored["tensor"]["output_name"]
    old = ModelManifest.model_validate(stored)
    assert old.tensor is not None and old.tensor.output_name is None
    images = _images()
    with caplog.at_level(logging.WARNING):
        model = OnnxModel.open(files["heads"], old)
    assert model.output_name == "aux"
    assert "its manifest names none" in caplog.text and "--output-name" in caplog.text
    first = ort_probabilities(files["heads"], keras_rescale(images), "aux")
    np.testing.assert_allclose(model.predict(images), first, atol=1e-5)
