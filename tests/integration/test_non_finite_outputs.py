"""A model whose output holds NaN or infinity never answers for that image, on any door.

An ONNX graph imported with `perito models import` as a user would, whose logits are the
image's mean colour divided by its L2 norm: an all-black image divides zero by zero, so its
output is NaN, while any other image gets ordinary probabilities. Through a real server (gRPC
and HTTP on real sockets) and a real `perito worker` process:

- `Classify` (the SDK) fails that image with reason MODEL_OUTPUT_NOT_FINITE, naming it, and
  with `on_invalid="skip"` answers the other image of the same call;
- OIP (tritonclient over gRPC and HTTP), all or nothing, fails the call INTERNAL / 500 with the
  reason, never writing a NaN;
- the JSON API answers 400 naming the image, in strict JSON (RFC 8259: no NaN token);
- a bulk job fails that item with the reason (never `succeeded`), in `results.jsonl` (strict
  JSON), `results.csv` and `ListJobResults`;
- both processes count it in `perito_model_outputs_refused_total` /
  `perito_worker_model_outputs_refused_total`, by reason;
- a NaN or infinite request parameter is INVALID_ARGUMENT / 400 naming the parameter.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from torch import nn
from tritonclient.utils import InferenceServerException

import perito
from tests.helpers import ServerThread, Stores, WorkerProcess, encoded, run_perito
from tests.onnx_helpers import export_onnx
from tests.processes import free_port

pytest.importorskip("onnxruntime", reason="ONNX Runtime (perito[serve]) not installed")

pytestmark = pytest.mark.integration

SIZE = 32
LABELS = ["red", "green", "blue"]
REASON = "MODEL_OUTPUT_NOT_FINITE"
SERVED = {"model": "colour", "version": "1", "form": "onnxruntime-fp32"}


class ColourDirection(nn.Module):
    """NHWC pixels in [0, 1]; logits: the mean colour over its L2 norm, times 8. An all-black
    image is 0 / 0: NaN logits."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        colour = images.mean(dim=(1, 2))
        norm = torch.sqrt((colour * colour).sum(dim=1, keepdim=True))
        return 8.0 * colour / norm


class DarkSkewed(nn.Module):
    """NHWC pixels in [0, 1]; probabilities: the softmax of the mean colour, but for a photo
    darker than 5% of full scale [p0 + 1, p1 - 1, p2]: still summing to 1, no longer in [0, 1].
    The load-time probes are brighter, so it imports."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        colour = images.mean(dim=(1, 2))
        probabilities = torch.softmax(8.0 * colour, dim=1)
        dark = (colour.mean(dim=1, keepdim=True) < 0.05).float()
        return probabilities + dark * torch.tensor([[1.0, -1.0, 0.0]])


def _image(rgb: tuple[int, int, int]) -> bytes:
    return encoded(np.full((SIZE, SIZE, 3), rgb, dtype=np.uint8), "PNG")


RED, BLACK, DIM = _image((200, 30, 30)), _image((0, 0, 0)), _image((10, 10, 10))


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"not RFC 8259 JSON: {token}")


def strict_json(text: str | bytes) -> Any:
    """`text` parsed as RFC 8259 JSON: a NaN, Infinity or -Infinity token fails."""
    return json.loads(text, parse_constant=_refuse_constant)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def counted(port: int, name: str, reason: str = "MODEL_OUTPUT_NOT_FINITE") -> float:
    labels = tuple(sorted({**SERVED, "reason": reason}.items()))
    return scrape(port).get((name, labels), 0.0)


def reason_of(body: dict[str, Any]) -> str:
    """The `google.rpc.ErrorInfo` reason of an AIP-193 error body's details."""
    details = body["details"]
    return next(d["reason"] for d in details if d["@type"].endswith("ErrorInfo"))


@dataclass
class Service:
    server: ServerThread
    client: perito.Client
    worker_metrics_port: int

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.server.running.http_port}"  # type: ignore[attr-defined]

    @property
    def metrics_port(self) -> int:
        return self.server.running.metrics_port  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Service]:
    work = tmp_path_factory.mktemp("non-finite")
    stores = Stores(work, redis_url)
    model = export_onnx(ColourDirection(), (1, SIZE, SIZE, 3), work / "colour.onnx")
    (work / "labels.txt").write_text("\n".join(LABELS) + "\n")
    worker_port = free_port()
    env = stores.worker_env(PERITO_METRICS_PORT=str(worker_port))
    run_perito(
        *("models", "import", str(model), "--name", "colour", "--labels", str(work / "labels.txt")),
        *("--input-size", str(SIZE), "--layout", "NHWC", "--scale", "1/255", "--output", "logits"),
        env=env,
    )
    skewed = export_onnx(DarkSkewed(), (1, SIZE, SIZE, 3), work / "skewed.onnx")
    run_perito(
        *(
            "models",
            "import",
            str(skewed),
            "--name",
            "skewed",
            "--labels",
            str(work / "labels.txt"),
        ),
        *("--input-size", str(SIZE), "--layout", "NHWC", "--scale", "1/255"),
        *("--output", "probabilities"),
        env=env,
    )
    settings = stores.server_settings(http_port=free_port(), metrics_port=0)
    with (
        ServerThread(settings) as server,
        perito.Client(server.target, timeout=60) as client,
        WorkerProcess(env, work / "worker.log").wait_ready(),
    ):
        yield Service(server, client, worker_port)


def test_classify_fails_the_non_finite_image_and_answers_the_other(service: Service) -> None:
    before = counted(service.metrics_port, "perito_model_outputs_refused_total")
    with pytest.raises(perito.InvalidArgumentError) as refused:
        service.client.classify([RED, BLACK], model="colour", ids=["red.png", "black.png"])
    assert refused.value.reason == REASON
    assert [v.field for v in refused.value.violations] == ["images[1]"]
    assert "black.png" in refused.value.message and "NaN or infinity" in refused.value.message

    results = service.client.classify(
        [RED, BLACK], model="colour", ids=["red.png", "black.png"], on_invalid="skip"
    )
    answered, rejected = results
    assert isinstance(answered, perito.Classification)
    assert answered.predictions[0].label == "red"
    assert all(math.isfinite(p.probability) for p in answered.predictions)
    assert math.isfinite(answered.margin) and math.isfinite(answered.normalized_entropy)
    assert isinstance(rejected, perito.RejectedImage)
    assert (rejected.index, rejected.image_id, rejected.error.reason) == (1, "black.png", REASON)
    # The first call, then the skip call's first try (its resend holds the red image only).
    after = counted(service.metrics_port, "perito_model_outputs_refused_total")
    assert after - before == 2


def test_an_explanation_whose_forward_pass_is_not_finite_fails_the_image(
    service: Service,
) -> None:
    # Black but for one faint red cell: the photo itself is red (finite), but the occluding
    # square is filled with the photo's mean colour, black, so hiding that cell is 0 / 0.
    faint = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    faint[:4, :4, 0] = 1
    photo = encoded(faint, "PNG")
    [plain] = service.client.classify([photo], model="colour")
    assert isinstance(plain, perito.Classification) and plain.predictions[0].label == "red"

    before = counted(service.metrics_port, "perito_model_outputs_refused_total")
    with pytest.raises(perito.InvalidArgumentError) as refused:
        service.client.classify(
            [RED, photo], model="colour", ids=["red.png", "faint.png"], explain=True
        )
    assert refused.value.reason == REASON
    assert [v.field for v in refused.value.violations] == ["images[1]"]
    assert "faint.png" in refused.value.message
    after = counted(service.metrics_port, "perito_model_outputs_refused_total")
    assert after - before == 1


@pytest.mark.parametrize("k", [0, 2])
def test_oip_grpc_fails_the_call_internal_naming_the_reason(service: Service, k: int) -> None:
    client = grpcclient.InferenceServerClient(service.server.target)
    batch = np.array([RED, BLACK], dtype=np.object_)
    tensor = grpcclient.InferInput("images", [2], "BYTES")
    tensor.set_data_from_numpy(batch)
    outputs = [grpcclient.InferRequestedOutput("probabilities", class_count=k)]
    with pytest.raises(InferenceServerException) as refused:
        client.infer("colour", [tensor], outputs=outputs)
    assert refused.value.status() == "StatusCode.INTERNAL"
    assert (
        REASON in refused.value.message() and "input 'images', image 1" in refused.value.message()
    )
    # The red image alone is answered, finite.
    alone = grpcclient.InferInput("images", [1], "BYTES")
    alone.set_data_from_numpy(np.array([RED], dtype=np.object_))
    answer = client.infer("colour", [alone]).as_numpy("probabilities")
    assert np.isfinite(answer).all() and int(answer.argmax()) == 0


def test_oip_rest_fails_the_call_500_in_strict_json(service: Service) -> None:
    client = httpclient.InferenceServerClient(service.http)
    tensor = httpclient.InferInput("images", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([RED, BLACK], dtype=np.object_), binary_data=True)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("colour", [tensor])
    assert REASON in str(refused.value.message())

    for parameters in ({}, {"classification": 3}):
        body = {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "BYTES",
                    "shape": [2],
                    "data": [base64.b64encode(RED).decode(), base64.b64encode(BLACK).decode()],
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": parameters}],
        }
        answer = httpx.post(f"http://{service.http}/v2/models/colour/infer", json=body, timeout=60)
        assert answer.status_code == 500, answer.text
        error = strict_json(answer.text)
        assert error["status"] == "INTERNAL" and reason_of(error) == REASON
        assert "input 'images', image 1" in error["error"]


def test_json_api_answers_400_naming_the_image_in_strict_json(service: Service) -> None:
    url = f"http://{service.http}/v1/models/colour:classify"
    images = [
        {"id": "red.png", "content": base64.b64encode(RED).decode()},
        {"id": "black.png", "content": base64.b64encode(BLACK).decode()},
    ]
    refused = httpx.post(url, json={"images": images}, timeout=60)
    assert refused.status_code == 400, refused.text
    error = strict_json(refused.text)["error"]
    assert reason_of(error) == REASON
    violations = next(d for d in error["details"] if d["@type"].endswith("BadRequest"))
    assert [v["field"] for v in violations["fieldViolations"]] == ["images[1]"]
    answered = httpx.post(url, json={"images": images[:1]}, timeout=60)
    assert answered.status_code == 200
    result = strict_json(answered.text)["results"][0]
    assert result["predictions"][0]["label"] == "red"
    assert all(isinstance(p["probability"], float) for p in result["predictions"])


def test_a_bulk_job_fails_the_item_with_the_reason(service: Service) -> None:
    handle = service.client.submit_job([RED, BLACK, RED], model="colour", top_k=3)
    job = handle.wait(timeout=120)
    assert job.state is perito.JobState.PARTIALLY_SUCCEEDED, job
    assert (job.succeeded, job.failed) == (2, 1)

    items = sorted(service.client.job(job.id).results(), key=lambda item: item.index)
    assert [item.state for item in items] == [
        perito.ItemState.SUCCEEDED,
        perito.ItemState.FAILED,
        perito.ItemState.SUCCEEDED,
    ]
    assert items[1].classification is None and items[1].error.startswith(f"{REASON}: ")

    jsonl = next(Path(uri.removeprefix("file://")) for uri in job.result_uris if "jsonl" in uri)
    lines = [strict_json(line) for line in jsonl.read_text().splitlines()]
    assert [line["state"] for line in lines] == ["succeeded", "failed", "succeeded"]
    assert lines[1]["error"].startswith(f"{REASON}: ") and lines[1]["predictions"] == []
    assert lines[1]["label"] is None and lines[1]["probability"] is None
    assert lines[0]["label"] == "red" and math.isfinite(lines[0]["probability"])
    with jsonl.with_name("results.csv").open(newline="") as table:
        rows = list(csv.DictReader(table))
    assert (rows[1]["state"], rows[1]["probability"]) == ("failed", "")
    assert rows[1]["error"].startswith(f"{REASON}: ")

    page = httpx.get(f"http://{service.http}/v1/jobs/{job.id}/results?filter=failed", timeout=30)
    failed = strict_json(page.text)["results"]
    assert [(r["index"], r["state"]) for r in failed] == [
        ("1", "ITEM_STATE_FAILED")
    ]  # int64: a string
    assert failed[0]["error"].startswith(f"{REASON}: ")
    stream = httpx.get(
        f"http://{service.http}/v1/jobs/{job.id}/results",
        headers={"Accept": "application/x-ndjson"},
        timeout=30,
    )
    assert len([strict_json(line) for line in stream.text.splitlines()]) == 3

    deadline = time.monotonic() + 20  # the worker's samples are summed at scrape time
    while counted(service.worker_metrics_port, "perito_worker_model_outputs_refused_total") < 1:
        assert time.monotonic() < deadline, "the worker did not count the non-finite output"
        time.sleep(0.5)
    assert counted(service.worker_metrics_port, "perito_worker_model_outputs_refused_total") == 1


def _post_with_token(url: str, document: dict[str, Any], value: str) -> httpx.Response:
    """POST `document` as JSON, its "TOKEN" strings written as the bare `value` (`NaN`,
    `Infinity`: tokens Python's json reads, RFC 8259 does not have)."""
    body = json.dumps(document).replace('"TOKEN"', value)
    return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_request_parameter_is_400_naming_it(service: Service, value: str) -> None:
    images = [{"content": base64.b64encode(RED).decode()}]
    tensor_json = {
        "name": "images",
        "datatype": "BYTES",
        "shape": [1],
        "data": [images[0]["content"]],
    }
    infer = f"http://{service.http}/v2/models/colour/infer"
    for parameter, document in (
        (
            "classification",
            {
                "inputs": [tensor_json],
                "outputs": [{"name": "probabilities", "parameters": {"classification": "TOKEN"}}],
            },
        ),
        ("timeout", {"inputs": [tensor_json], "parameters": {"timeout": "TOKEN"}}),
    ):
        answer = _post_with_token(infer, document, value)
        assert answer.status_code == 400, answer.text
        assert parameter in strict_json(answer.text)["error"]

    for path, body in (
        ("/v1/models/colour:classify", {"images": images}),
        ("/v1/jobs", {"model": "colour", "images": {"images": images}}),
    ):
        for field in ("confidence_threshold", "top_k"):
            answer = _post_with_token(
                f"http://{service.http}{path}", {**body, field: "TOKEN"}, value
            )
            assert answer.status_code == 400, (path, field, answer.text)
            assert field in strict_json(answer.text)["error"]["message"], answer.text

    client = grpcclient.InferenceServerClient(service.server.target)
    tensor = grpcclient.InferInput("images", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([RED], dtype=np.object_))
    output = grpcclient.InferRequestedOutput("probabilities")
    output._output.parameters["classification"].double_param = float(value.replace("Inf", "inf"))
    with pytest.raises(InferenceServerException) as refused:
        client.infer("colour", [tensor], outputs=[output])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "classification" in refused.value.message()


def test_an_output_outside_zero_and_one_is_no_answer_on_any_door(service: Service) -> None:
    """A model whose output stops being probabilities on dark photos (values 1.3 and -0.6,
    summing to 1): never an answer that looks valid."""
    reason = "MODEL_OUTPUT_NOT_PROBABILITIES"
    counter = "perito_model_outputs_refused_total"
    labels = tuple(sorted({**SERVED, "model": "skewed", "reason": reason}.items()))
    before = scrape(service.metrics_port).get((counter, labels), 0.0)
    with pytest.raises(perito.InvalidArgumentError) as refused:
        service.client.classify([RED, DIM], model="skewed", ids=["red.png", "dim.png"])
    assert refused.value.reason == reason
    assert [v.field for v in refused.value.violations] == ["images[1]"]
    assert "dim.png" in refused.value.message and "not probabilities" in refused.value.message
    [answered] = service.client.classify([RED], model="skewed")
    assert isinstance(answered, perito.Classification)
    assert 0.0 <= answered.predictions[0].probability <= 1.0
    assert scrape(service.metrics_port).get((counter, labels), 0.0) - before == 1

    client = grpcclient.InferenceServerClient(service.server.target)
    tensor = grpcclient.InferInput("images", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([RED, DIM], dtype=np.object_))
    with pytest.raises(InferenceServerException) as failed:
        client.infer("skewed", [tensor])
    assert failed.value.status() == "StatusCode.INTERNAL" and reason in failed.value.message()

    job = service.client.submit_job([DIM, RED], model="skewed").wait(timeout=120)
    items = sorted(service.client.job(job.id).results(), key=lambda item: item.index)
    assert [item.state for item in items] == [perito.ItemState.FAILED, perito.ItemState.SUCCEEDED]
    assert items[0].error.startswith(f"{reason}: ") and items[0].classification is None
