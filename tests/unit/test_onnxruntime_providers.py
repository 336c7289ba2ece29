"""Which ONNX Runtime execution providers a graph is asked to run on, and which it got: on a
CUDA device TensorRT (FP16 when asked), CUDA, then the CPU, those the install offers; on this
machine's CPU wheel, the CPU, reported as such, whatever device was asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from perito_core.models.engines.onnxruntime import (
    CPU,
    CUDA,
    TENSORRT,
    OnnxModel,
    execution_providers,
    graph_is_fp32,
)
from perito_core.models.manifest import Artifact, InputContract, TensorContract
from tests.helpers import unpublished_manifest
from tests.onnx_helpers import WASTE_LABELS, waste_model

pytest.importorskip("onnxruntime", reason="ONNX Runtime (perito[serve]) not installed")

SIZE = 32
MANIFEST = unpublished_manifest(
    WASTE_LABELS,
    input=InputContract(height=SIZE, width=SIZE, resize_size=SIZE, resize_mode="squash"),
    artifact=Artifact(file="model.onnx", format="onnx", sha256="0" * 64, size_bytes=0),
    tensor=TensorContract(layout="NHWC", scale=1 / 255, output="sigmoid"),
)


def test_a_cuda_device_asks_for_tensorrt_then_cuda_then_the_cpu() -> None:
    every = [TENSORRT, CUDA, CPU]
    assert execution_providers("cuda:1", fp16=True, available=every) == [
        (TENSORRT, {"device_id": 1, "trt_fp16_enable": True}),
        (CUDA, {"device_id": 1}),
        CPU,
    ]
    assert execution_providers("cuda", available=every)[0] == (
        TENSORRT,
        {"device_id": 0, "trt_fp16_enable": False},
    )
    assert execution_providers("cuda", available=[CUDA, CPU]) == [(CUDA, {"device_id": 0}), CPU]
    assert execution_providers("cuda", available=["AzureExecutionProvider", CPU]) == [CPU]
    assert execution_providers("cpu", available=every) == [CPU]


def test_without_a_gpu_build_the_cpu_serves_and_says_so(tmp_path: Path) -> None:
    path = waste_model(tmp_path / "model.onnx", SIZE)
    on_cpu = OnnxModel.open(path, MANIFEST)
    asked_cuda = OnnxModel.open(path, MANIFEST, device="cuda", fp16=True)
    for model in (on_cpu, asked_cuda):
        assert model.provider == CPU and model.providers == [CPU]
        assert model.device.type == "cpu"
        assert model.form == "onnxruntime-fp32"  # TensorRT did not run: no FP16 kernels
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_array_equal(asked_cuda.predict(images), on_cpu.predict(images))


def test_only_an_fp32_graph_is_taken_for_one_that_tensorrt_may_run_in_fp16(
    tmp_path: Path,
) -> None:
    """FP16 kernels (and the form `onnxruntime-fp16`) are for an FP32 graph: an INT8 one,
    quantized by ONNX Runtime, keeps its own form."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = waste_model(tmp_path / "model.onnx", SIZE)
    int8 = tmp_path / "int8.onnx"
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    assert graph_is_fp32(fp32)
    assert not graph_is_fp32(int8)
    assert not graph_is_fp32(tmp_path / "missing.onnx")
