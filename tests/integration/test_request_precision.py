"""A request may ask for a more exact form than the server's `PERITO_PRECISION`, never a less
exact one: `ClassifyRequest.precision` over gRPC, the OIP `precision` parameter.

A tiny model published with an OpenVINO FP32 form, served over a real socket: `auto` answers
with that form, a request for `torchscript` with model.pt, and a server set to `fp32` refuses
a request for `int8` naming the field.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import perito
from perito.v1 import classify_pb2, image_pb2, service_pb2_grpc
from perito_server._oip import grpc_service_pb2 as oip_pb2
from tests.helpers import ServerThread, Stores, WorkerProcess, red_jpeg

pytest.importorskip("openvino", reason="OpenVINO (optional engine, perito[serve]) not installed")

pytestmark = pytest.mark.integration


def _classify(target: str, precision: str) -> classify_pb2.ClassifyResponse:
    request = classify_pb2.ClassifyRequest(
        model="tiny", images=[image_pb2.Image(id="a", content=red_jpeg())], precision=precision
    )
    with grpc.insecure_channel(target) as channel:
        return service_pb2_grpc.PeritoStub(channel).Classify(request, timeout=60)  # type: ignore[no-any-return]


@pytest.fixture
def auto(fp32_form_registry: Path, tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread.serving(fp32_form_registry, tmp_path, precision="auto") as server:
        yield server


def test_a_request_may_ask_for_a_more_exact_form(auto: ServerThread) -> None:
    default = _classify(auto.target, "")
    exact = _classify(auto.target, "torchscript")
    assert default.results[0].form == "openvino-fp32"
    assert exact.results[0].form == "torchscript-fp32"
    # `fp32` on this version is its OpenVINO FP32 form: already loaded, so not loaded twice.
    assert _classify(auto.target, "fp32").results[0].form == "openvino-fp32"
    pool = auto.running.pool  # type: ignore[attr-defined]
    assert sorted(served.model.form for served in pool.served()) == [
        "openvino-fp32",
        "torchscript-fp32",
    ]
    assert pool.loaded == [("tiny", "1")]
    probabilities = [p.probability for p in default.results[0].predictions]
    reference = [p.probability for p in exact.results[0].predictions]
    np.testing.assert_allclose(probabilities, reference, atol=1e-4)


def test_oip_takes_the_precision_parameter(auto: ServerThread) -> None:
    request = oip_pb2.ModelInferRequest(
        model_name="tiny",
        inputs=[
            oip_pb2.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[1])
        ],
        raw_input_contents=[len(red_jpeg()).to_bytes(4, "little") + red_jpeg()],
    )
    request.parameters["precision"].string_param = "torchscript"
    with grpc.insecure_channel(auto.target) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=oip_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=oip_pb2.ModelInferResponse.FromString,
        )
        infer(request, timeout=60)
        request.parameters["precision"].string_param = "int4"
        with pytest.raises(grpc.RpcError) as refused:
            infer(request, timeout=60)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "precision" in str(refused.value.details())
    forms = {served.model.form for served in auto.running.pool.served()}  # type: ignore[attr-defined]
    assert "torchscript-fp32" in forms


def test_a_less_exact_form_than_the_servers_is_refused(
    fp32_form_registry: Path, tmp_path: Path
) -> None:
    with ServerThread.serving(fp32_form_registry, tmp_path, precision="fp32") as server:
        assert _classify(server.target, "torchscript").results[0].form == "torchscript-fp32"
        for precision in ("int8", "auto", "fp64"):
            with pytest.raises(grpc.RpcError) as refused:
                _classify(server.target, precision)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "precision" in str(refused.value.details())


def test_a_job_may_ask_for_a_more_exact_form(
    fp32_form_registry: Path, tmp_path: Path, redis_url: str
) -> None:
    stores = Stores(tmp_path, redis_url, registry=str(fp32_form_registry))
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        (photos / f"{index}.jpg").write_bytes(red_jpeg())
    env = stores.worker_env(PERITO_PRECISION="auto")
    with (
        ServerThread(stores.server_settings(precision="auto")) as server,
        WorkerProcess(env, tmp_path / "worker.log").wait_ready(),
        perito.Client(server.target, timeout=60) as client,
    ):
        default = client.submit_job(str(photos), model="tiny").wait(120)
        exact = client.submit_job(str(photos), model="tiny", precision="torchscript").wait(120)
        assert default.succeeded == exact.succeeded == 3
        forms = {
            job.id: {
                r.classification.form for r in client.job(job.id).results() if r.classification
            }
            for job in (default, exact)
        }
        assert forms == {default.id: {"openvino-fp32"}, exact.id: {"torchscript-fp32"}}
        with pytest.raises(perito.InvalidArgumentError) as refused:
            client.submit_job(str(photos), model="tiny", precision="fp64")
    assert "precision" in str(refused.value)
