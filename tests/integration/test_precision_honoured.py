"""A precision a call names is honoured or refused, never substituted, on every door and for
jobs at submission (`perito_core.models.selection.check_precision`; docs/models.md#precision).

One server over a real socket (gRPC, the JSON API and OIP over HTTP) and a registry of three
versions: `plain` (the tiny model, model.pt and no compiled form), `quantized` (the same with
ONNX Runtime FP32 and INT8 forms) and `half` (an imported ONNX graph that takes and computes
float16). `int8` or `bf16` of `plain`, and `fp32` of `half`, are FAILED_PRECONDITION naming
`precision` and the forms the version has; an unknown word is INVALID_ARGUMENT; `int8` of
`quantized` is answered by its INT8 form, in `Classify` and in a job's items.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from torch import nn
from tritonclient.utils import InferenceServerException

import perito
from perito_core.models.manifest import TensorContract
from perito_core.models.registry import ModelRegistry
from tests.conftest import build_tiny_forms, publish_tiny
from tests.helpers import TINY_INPUT, ServerThread, Stores, WorkerProcess, red_jpeg

pytest.importorskip("onnxruntime", reason="ONNX Runtime (optional engine, perito[serve]) missing")

pytestmark = pytest.mark.integration


def _half_graph(path: Path) -> Path:
    """An FP16 ONNX graph, as a float16 conversion gives: float16 NHWC in and out."""
    from tests.onnx_helpers import KerasShaped, export_onnx

    network = KerasShaped(3, nn.Softmax(dim=1), seed=3).half()
    return export_onnx(network, (1, 32, 32, 3), path, dtype=torch.float16)


@dataclass
class Served:
    server: ServerThread
    stores: Stores

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.server.running.http_port}"  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_file: Path, redis_url: str
) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("precision")
    stores = Stores(work, redis_url)
    registry: ModelRegistry = stores.open_registry()
    publish_tiny(registry, tiny_model_file, name="plain")
    built = build_tiny_forms(
        tiny_model_file,
        work / "forms",
        precisions=("fp32", "int8"),
        engines=("onnxruntime",),
        min_agreement=0.0,  # random images and weights: the gate is tested elsewhere
    )
    assert [form.name for form, _ in built.forms] == ["onnxruntime-fp32", "onnxruntime-int8"]
    publish_tiny(registry, tiny_model_file, name="quantized", forms=built.forms)
    registry.publish(
        "half",
        _half_graph(work / "half.onnx"),
        labels=["minor", "moderate", "severe"],
        input=TINY_INPUT,
        artifact_format="onnx",
        tensor=TensorContract(layout="NHWC", dtype="float16", scale=1 / 255),
    )
    (work / "photos").mkdir()
    for index in range(3):
        (work / "photos" / f"{index}.jpg").write_bytes(red_jpeg())
    with ServerThread(stores.server_settings(precision="auto", http_port=0)) as server:
        yield Served(server, stores)


# (model, precision) a call may not have, and the forms the refusal lists.
REFUSED = [
    ("plain", "int8", "its forms: torchscript-fp32 "),
    ("plain", "bf16", "its forms: torchscript-fp32 "),
    ("quantized", "bf16", "its forms: torchscript-fp32, onnxruntime-fp32, onnxruntime-int8 "),
    ("half", "fp32", "its forms: onnxruntime-fp16 "),
    ("half", "torchscript", "its forms: onnxruntime-fp16 "),
]


@pytest.mark.parametrize(("model", "precision", "forms"), REFUSED)
def test_the_sdk_is_refused_a_precision_the_version_lacks(
    served: Served, model: str, precision: str, forms: str
) -> None:
    with (
        perito.Client(served.server.target, timeout=60) as client,
        pytest.raises(perito.FailedPreconditionError) as refused,
    ):
        client.classify([red_jpeg()], model=model, precision=precision)
    error = refused.value
    assert error.reason == "PRECISION_UNAVAILABLE"
    assert [v.field for v in error.violations] == ["precision"]
    assert f"precision {precision}: {model}@1 has no {precision} form" in str(error)
    assert forms in str(error)


def test_the_sdk_gets_the_form_it_names(served: Served) -> None:
    with perito.Client(served.server.target, timeout=60) as client:

        def form(model: str, precision: str) -> str:
            (result,) = client.classify([red_jpeg()], model=model, precision=precision)
            return result.form

        assert form("quantized", "int8") == "onnxruntime-int8"
        assert form("quantized", "fp32") == "onnxruntime-fp32"
        assert form("quantized", "torchscript") == "torchscript-fp32"
        assert form("plain", "fp32") == "torchscript-fp32"  # model.pt is FP32
        assert form("half", "auto") == form("half", "") == "onnxruntime-fp16"
        with pytest.raises(perito.InvalidArgumentError) as unknown:
            client.classify([red_jpeg()], model="plain", precision="int4")
    assert [v.field for v in unknown.value.violations] == ["precision"]


def _oip_input(module: object) -> object:
    batch = np.array([red_jpeg()], dtype=np.object_)
    tensor = module.InferInput("images", [1], "BYTES")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(batch)
    return tensor


def test_tritonclient_grpc_and_http_take_the_precision_parameter(served: Served) -> None:
    grpc_client = grpcclient.InferenceServerClient(served.server.target)
    http_client = httpclient.InferenceServerClient(served.http.removeprefix("http://"))
    for module, client in ((grpcclient, grpc_client), (httpclient, http_client)):
        for model, precision, forms in REFUSED:
            with pytest.raises(InferenceServerException) as refused:
                client.infer(model, [_oip_input(module)], parameters={"precision": precision})
            assert f"precision {precision}: {model}@1 has no {precision} form" in str(
                refused.value.message()
            )
            assert forms in str(refused.value.message())
        with pytest.raises(InferenceServerException) as unknown:
            client.infer("plain", [_oip_input(module)], parameters={"precision": "int4"})
        assert "precision must be one of" in str(unknown.value.message())
        answer = client.infer("quantized", [_oip_input(module)], parameters={"precision": "int8"})
        assert answer.as_numpy("probabilities").shape == (1, 3)
    assert refused.value.status() == "400"  # the last: over HTTP
    with pytest.raises(InferenceServerException) as over_grpc:
        grpc_client.infer("plain", [_oip_input(grpcclient)], parameters={"precision": "int8"})
    assert over_grpc.value.status() == "StatusCode.FAILED_PRECONDITION"
    pool = served.server.running.pool  # type: ignore[attr-defined]
    assert "onnxruntime-int8" in {s.model.form for s in pool.served()}


def test_the_json_api_refuses_or_names_the_form(served: Served) -> None:
    image = {"content": base64.b64encode(red_jpeg()).decode()}
    with httpx.Client(base_url=served.http, timeout=60) as http:
        for model, precision, forms in REFUSED:
            body = {"images": [image], "precision": precision}
            response = http.post(f"/v1/models/{model}:classify", json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["status"] == "FAILED_PRECONDITION"
            assert f"precision {precision}:" in error["message"] and forms in error["message"]
        body = {"images": [image], "precision": "int4"}
        unknown = http.post("/v1/models/plain:classify", json=body)
        assert unknown.json()["error"]["status"] == "INVALID_ARGUMENT"
        body = {"images": [image], "precision": "int8"}
        answer = http.post("/v1/models/quantized:classify", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0]["form"] == "onnxruntime-int8"


def test_a_job_is_refused_at_submission_or_runs_the_form_it_names(
    served: Served, tmp_path: Path
) -> None:
    photos = str(served.stores.work / "photos")
    with perito.Client(served.server.target, timeout=60) as client:
        before = len(list(client.list_jobs()))
        for model, precision, forms in REFUSED:
            with pytest.raises(perito.FailedPreconditionError) as refused:
                client.submit_job(photos, model=model, precision=precision)
            assert refused.value.reason == "PRECISION_UNAVAILABLE"
            assert forms in str(refused.value)
        assert len(list(client.list_jobs())) == before  # none made for a worker to fail
        env = served.stores.worker_env(PERITO_PRECISION="auto")
        with WorkerProcess(env, tmp_path / "worker.log").wait_ready():
            job = client.submit_job(photos, model="quantized", precision="int8").wait(120)
            assert job.succeeded == 3
            results = list(client.job(job.id).results())
    assert {r.classification.form for r in results if r.classification} == {"onnxruntime-int8"}
