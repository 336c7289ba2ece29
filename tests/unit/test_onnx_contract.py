"""ONNX models' tensor contract: the pure normalisation and output logic, and the refusals.

The arithmetic (`tensor_from_images`, `probabilities_from_output`) and the manifest's rules are
checked on arrays alone; the refusals run real ONNX files (exported from torch here) through
real ONNX Runtime and a real registry folder: a graph whose input contradicts the declared
layout, size or dtype, an output that cannot be the declared kind, a file that is not ONNX, a
tampered `model.onnx`, and a stored manifest with an unknown layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from perito_core.errors import ArtifactIntegrityError, ModelLoadError
from perito_core.models.engines.onnxruntime import (
    OnnxModel,
    probabilities_from_output,
    tensor_from_images,
)
from perito_core.models.manifest import Artifact, InputContract, ModelManifest, TensorContract
from perito_core.models.registry import ModelRegistry
from perito_core.models.selection import load_model
from tests.helpers import unpublished_manifest
from tests.onnx_helpers import (
    CAFFE_MEAN_BGR,
    MINERALS_LABELS,
    WASTE_LABELS,
    NchwLogits,
    caffe_preprocess,
    export_onnx,
    keras_rescale,
    minerals_model,
    ort_probabilities,
    waste_model,
)

pytest.importorskip("onnxruntime", reason="ONNX Runtime (perito[serve]) not installed")

SIZE = 32
INPUT = InputContract(height=SIZE, width=SIZE, resize_size=SIZE, resize_mode="squash")
KERAS = TensorContract(layout="NHWC", scale=1 / 255, output="sigmoid")
CAFFE = TensorContract(layout="NHWC", scale=1.0, mean=CAFFE_MEAN_BGR, channel_order="BGR")
ONNX_ARTIFACT = Artifact(file="model.onnx", format="onnx", sha256="0" * 64, size_bytes=0)


def _images(count: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)


def _manifest(tensor: TensorContract, labels: list[str]) -> ModelManifest:
    return unpublished_manifest(labels, input=INPUT, artifact=ONNX_ARTIFACT, tensor=tensor)


# The arithmetic


def test_a_keras_rescale_contract_feeds_nhwc_pixels_over_255() -> None:
    images = _images()
    tensor = tensor_from_images(images, KERAS)
    assert tensor.shape == (5, SIZE, SIZE, 3) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor, keras_rescale(images), rtol=1e-6)


def test_a_caffe_contract_feeds_bgr_minus_the_mean() -> None:
    images = _images()
    np.testing.assert_allclose(tensor_from_images(images, CAFFE), caffe_preprocess(images))


def test_a_torchvision_contract_feeds_nchw_normalised() -> None:
    images = _images()
    contract = TensorContract(
        layout="NCHW", scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    expected = (images / 255.0 - np.array(contract.mean)) / np.array(contract.std)
    tensor = tensor_from_images(images, contract)
    assert tensor.shape == (5, 3, SIZE, SIZE) and tensor.flags.c_contiguous
    np.testing.assert_allclose(tensor, expected.transpose(0, 3, 1, 2), atol=1e-5)


def test_uint8_and_float16_inputs() -> None:
    images = _images()
    raw = tensor_from_images(images, TensorContract(layout="NCHW", dtype="uint8", scale=1))
    assert raw.dtype == np.uint8
    np.testing.assert_array_equal(raw, images.transpose(0, 3, 1, 2))
    half = tensor_from_images(images, TensorContract(layout="NHWC", dtype="float16", scale=1))
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, images.astype(np.float16))


def test_outputs_become_probabilities() -> None:
    p = np.array([[0.2], [0.9]], dtype=np.float32)
    served = [[0.8, 0.2], [0.1, 0.9]]
    np.testing.assert_allclose(probabilities_from_output(p, KERAS), served, atol=1e-6)
    np.testing.assert_allclose(probabilities_from_output(p[:, 0], KERAS), served, atol=1e-6)
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]], dtype=np.float32)
    softmax = probabilities_from_output(logits, CAFFE.model_copy(update={"output": "logits"}))
    np.testing.assert_allclose(softmax, torch.softmax(torch.from_numpy(logits), 1).numpy())
    np.testing.assert_array_equal(probabilities_from_output(logits, CAFFE), logits)


# The manifest's rules


def test_the_contract_refuses_what_cannot_be_meant() -> None:
    with pytest.raises(ValidationError, match="layout"):
        TensorContract(layout="NCWH", scale=1)
    with pytest.raises(ValidationError, match="dtype uint8 takes the pixels as they are"):
        TensorContract(layout="NHWC", dtype="uint8", scale=1 / 255)
    with pytest.raises(ValidationError, match="std must be positive"):
        TensorContract(layout="NHWC", scale=1, std=(1.0, 0.0, 1.0))
    with pytest.raises(ValidationError, match="scale"):
        TensorContract(layout="NHWC", scale=0)
    with pytest.raises(ValidationError, match="channel_order"):
        TensorContract(layout="NHWC", scale=1, channel_order="GRB")


def test_the_manifest_ties_the_contract_to_the_format() -> None:
    with pytest.raises(ValidationError, match="sigmoid unit serves exactly two labels"):
        _manifest(KERAS, ["a", "b", "c"])
    with pytest.raises(ValidationError, match="needs its tensor contract"):
        unpublished_manifest(["a", "b"], input=INPUT, artifact=ONNX_ARTIFACT)
    with pytest.raises(ValidationError, match="only ONNX artifacts"):
        unpublished_manifest(["a", "b"], input=INPUT, tensor=KERAS)
    for bad in ("../model.onnx", "forms/model.onnx", ".model.onnx"):
        with pytest.raises(ValidationError, match="file"):
            Artifact(file=bad, format="onnx", sha256="0" * 64, size_bytes=0)


# Real files through ONNX Runtime


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    return {
        "waste": waste_model(folder / "waste.onnx", SIZE),
        "minerals": minerals_model(folder / "minerals.onnx", SIZE),
        "logits": export_onnx(NchwLogits(4, seed=3), (1, 3, SIZE, SIZE), folder / "logits.onnx"),
        "batch1": export_onnx(
            NchwLogits(4, seed=3), (1, 3, SIZE, SIZE), folder / "batch1.onnx", dynamic_batch=False
        ),
        "not-onnx": _write(folder / "not.onnx", b"PK\x03\x04 this is a zip, not a graph"),
    }


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_served_probabilities_equal_onnx_runtime_on_the_same_pixels(files: dict[str, Path]) -> None:
    images = _images(7)
    waste = OnnxModel.open(files["waste"], _manifest(KERAS, WASTE_LABELS))
    p = ort_probabilities(files["waste"], keras_rescale(images))
    np.testing.assert_allclose(waste.predict(images), np.concatenate([1 - p, p], 1), atol=1e-6)
    assert waste.form == "onnxruntime-fp32"

    minerals = OnnxModel.open(files["minerals"], _manifest(CAFFE, MINERALS_LABELS))
    expected = ort_probabilities(files["minerals"], caffe_preprocess(images))
    np.testing.assert_allclose(minerals.predict(images), expected, atol=1e-6)
    # The test can fail: the same graph fed Keras-rescaled pixels answers otherwise.
    wrong = ort_probabilities(files["minerals"], keras_rescale(images))
    assert np.abs(wrong - expected).max() > 1e-2


def test_logits_are_softmaxed_and_a_fixed_batch_graph_takes_any_batch(
    files: dict[str, Path],
) -> None:
    contract = TensorContract(layout="NCHW", scale=1 / 255, output="logits")
    images = _images(5)
    tensor = tensor_from_images(images, contract)
    logits = ort_probabilities(files["logits"], tensor)
    expected = torch.softmax(torch.from_numpy(logits), 1).numpy()
    labels = ["a", "b", "c", "d"]
    dynamic = OnnxModel.open(files["logits"], _manifest(contract, labels))
    np.testing.assert_allclose(dynamic.predict(images), expected, atol=1e-6)
    fixed = OnnxModel.open(files["batch1"], _manifest(contract, labels), warmup_batch_sizes=(1, 3))
    np.testing.assert_allclose(fixed.predict(images), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("file", "tensor", "labels", "message"),
    [
        (
            "waste",
            KERAS.model_copy(update={"layout": "NCHW"}),
            WASTE_LABELS,
            r"layout NCHW contradicts input 'input' of shape \[batch, 32, 32, 3\], which is NHWC",
        ),
        (
            "logits",
            TensorContract(layout="NHWC", scale=1, output="logits"),
            ["a", "b", "c", "d"],
            "layout NHWC contradicts input 'input' of shape \\[batch, 3, 32, 32\\], which is NCHW",
        ),
        (
            "waste",
            KERAS.model_copy(update={"dtype": "float16"}),
            WASTE_LABELS,
            r"dtype float16 contradicts input 'input', which is tensor\(float\)",
        ),
        (
            "minerals",
            CAFFE.model_copy(update={"output": "sigmoid"}),
            WASTE_LABELS,
            r"output sigmoid with 2 labels needs \(N, 1\) for one sigmoid unit",
        ),
        ("waste", CAFFE, WASTE_LABELS, r"output probabilities with 2 labels needs \(N, 2\)"),
        ("minerals", CAFFE, MINERALS_LABELS[:9], r"output probabilities with 9 labels"),
        ("logits", TensorContract(layout="NCHW", scale=1), list("abcd"), "not probabilities"),
        (
            "minerals",
            CAFFE.model_copy(update={"output": "logits"}),
            MINERALS_LABELS,
            "output logits, but on every probe image the graph's output is already probabilities",
        ),
        ("not-onnx", KERAS, WASTE_LABELS, "not a loadable ONNX file"),
    ],
)
def test_a_graph_that_contradicts_its_contract_is_refused_naming_the_field(
    files: dict[str, Path], file: str, tensor: TensorContract, labels: list[str], message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        OnnxModel.open(files[file], _manifest(tensor, labels))


def test_another_input_size_is_refused(files: dict[str, Path]) -> None:
    manifest = _manifest(KERAS, WASTE_LABELS).model_copy(
        update={"input": InputContract(height=48, width=48, resize_size=48)}
    )
    with pytest.raises(ModelLoadError, match=r"check the input size \(48x48\)"):
        OnnxModel.open(files["waste"], manifest)


def test_a_tampered_model_onnx_and_an_unknown_stored_layout_are_refused(
    files: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "registry"
    registry = ModelRegistry.open(str(root), cache_dir=tmp_path / "cache")
    manifest = registry.publish(
        "waste", files["waste"], labels=WASTE_LABELS, input=INPUT, artifact_format="onnx",
        tensor=KERAS,
    )  # fmt: skip
    stored = root / "models" / "waste" / "1"
    assert sorted(p.name for p in stored.iterdir()) == ["manifest.json", "model.onnx"]
    assert manifest.artifact.file == "model.onnx"
    assert load_model(registry, "waste", "1").form == "onnxruntime-fp32"
    # PERITO_PRECISION cannot turn an imported graph into another form: it serves as imported.
    asked_int8 = load_model(registry, "waste", "1", precision="int8")
    assert asked_int8.form == "onnxruntime-fp32"
    assert "only its own form" in asked_int8.passed_over["int8"]

    data = bytearray((stored / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (stored / "model.onnx").write_bytes(bytes(data))
    fresh = ModelRegistry.open(str(root), cache_dir=tmp_path / "other-cache")
    with pytest.raises(ArtifactIntegrityError, match=r"model file sha256 .* does not match"):
        load_model(fresh, "waste", "1")

    registry.publish(
        "waste", files["waste"], labels=WASTE_LABELS, input=INPUT, artifact_format="onnx",
        tensor=KERAS,
    )  # fmt: skip
    path = root / "models" / "waste" / "2" / "manifest.json"
    raw = json.loads(path.read_text())
    raw["tensor"]["layout"] = "NCWH"
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=r"manifest.json is invalid(.|\n)*tensor.layout"):
        load_model(registry, "waste", "2")


def test_a_graph_with_its_weights_in_another_file_is_refused_at_import(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """The registry stores `model.onnx` alone: ONNX external data would be lost on publish."""
    onnx = pytest.importorskip("onnx")
    from perito_server.onnx_import import check_onnx_loads

    graph = onnx.load(str(files["waste"]))
    split = tmp_path / "waste.onnx"
    onnx.save_model(
        graph,
        str(split),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="waste.onnx.data",
        size_threshold=0,
    )
    assert (tmp_path / "waste.onnx.data").is_file()
    with pytest.raises(ModelLoadError, match="keeps its weights in a separate file"):
        check_onnx_loads(split, "waste", WASTE_LABELS, INPUT, KERAS)
    check_onnx_loads(files["waste"], "waste", WASTE_LABELS, INPUT, KERAS)  # one file: fine
