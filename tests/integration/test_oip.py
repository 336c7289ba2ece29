"""The Open Inference Protocol with the real clients: tritonclient over gRPC and HTTP.

`perito serve` runs in its own process, as it does for these clients, with a bearer token,
gRPC and HTTP on two ports. Every answer is checked against `Classify`'s for the same bytes.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import perito
from perito_core.access.tenancy import Quotas, add_tenant
from perito_core.imaging import load_model_input
from tests.conftest import tiny_registry
from tests.helpers import TINY_INPUT, perito_serve_with_http
from tests.processes import Proc, free_port

pytestmark = pytest.mark.integration

TOKEN = "oip-test-token"


def auth() -> dict[str, str]:
    """The token header, a fresh dict each call: tritonclient.http's `infer` adds its own
    headers to the dict it is given."""
    return {"authorization": f"Bearer {TOKEN}"}


LABELS = ["minor", "moderate", "severe"]


@dataclass
class Served:
    grpc_url: str
    http_url: str
    process: Proc
    metrics_url: str = ""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_file: Path) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("oip")
    tiny_registry(work / "registry", tiny_model_file, aliases=("production",))
    metrics_port = free_port()
    with perito_serve_with_http(
        work,
        PERITO_REDIS_URL="redis://127.0.0.1:1/0",  # no jobs here: nothing listens there
        PERITO_AUTH_TOKENS=f'["{TOKEN}"]',
        PERITO_METRICS_PORT=str(metrics_port),
    ) as serve:
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        yield Served(serve.grpc_url, serve.http_url, serve.process, metrics)


@pytest.fixture(scope="module")
def images(photos: dict[str, Path]) -> list[bytes]:
    return [photos[name].read_bytes() for name in ("coffee", "chelsea", "rocket")]


@pytest.fixture(scope="module")
def classify_probabilities(served: Served, images: list[bytes]) -> np.ndarray:
    """What perito.v1 Classify answers for `images`: the full [N, C] probabilities."""
    with perito.Client(served.grpc_url, token=TOKEN, timeout=60) as client:
        results = client.classify(images, model="tiny", top_k=len(LABELS))
    table = np.zeros((len(images), len(LABELS)), dtype=np.float32)
    for row, result in enumerate(results):
        for prediction in result.predictions:
            table[row, prediction.class_index] = prediction.probability
    return table


def _check_classification(strings: np.ndarray, probabilities: np.ndarray, k: int) -> None:
    """Triton's classification output: "score:index:label", best first, k per image."""
    assert strings.shape == (len(probabilities), k)
    for row, expected in zip(strings, probabilities, strict=True):
        # Binary answers come back as bytes, JSON ones as str.
        parsed = [(s.decode() if isinstance(s, bytes) else s).split(":", 2) for s in row]
        indices = [int(index) for _, index, _ in parsed]
        assert indices == list(np.argsort(-expected, kind="stable")[:k])
        assert [label for _, _, label in parsed] == [LABELS[i] for i in indices]
        np.testing.assert_allclose([float(s) for s, _, _ in parsed], expected[indices], atol=1e-6)


def _bytes_input(module: object, images: list[bytes], shape_n1: bool = False) -> object:
    batch = np.array(images, dtype=np.object_)
    if shape_n1:
        batch = batch.reshape(-1, 1)
    tensor = module.InferInput("images", list(batch.shape), "BYTES")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(batch)
    return tensor


def test_health_and_server_metadata_over_grpc_and_http(served: Served) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(served.grpc_url) as channel:  # a probe naming the OIP service
        check = health_pb2_grpc.HealthStub(channel).Check
        request = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        assert check(request, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    grpc_client = grpcclient.InferenceServerClient(served.grpc_url)
    http_client = httpclient.InferenceServerClient(served.http_url)
    # Liveness and readiness are open, like grpc.health.v1: probes carry no token.
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert http_client.is_server_live() and http_client.is_server_ready()
    assert grpc_client.is_model_ready("tiny", headers=auth())
    assert http_client.is_model_ready("tiny", "production", headers=auth())
    assert not http_client.is_model_ready("no-such-model", headers=auth())
    metadata = grpc_client.get_server_metadata(headers=auth())
    assert metadata.name == "perito" and "classification" in metadata.extensions
    assert "binary_tensor_data" in http_client.get_server_metadata(headers=auth())["extensions"]


def test_model_metadata_describes_both_inputs_and_the_output(served: Served) -> None:
    grpc_meta = grpcclient.InferenceServerClient(served.grpc_url).get_model_metadata(
        "tiny", "production", headers=auth()
    )
    assert grpc_meta.name == "tiny" and list(grpc_meta.versions) == ["1"]
    assert grpc_meta.platform == "pytorch_libtorch"
    inputs = {t.name: (t.datatype, list(t.shape)) for t in grpc_meta.inputs}
    size = (TINY_INPUT.height, TINY_INPUT.width)
    assert inputs == {"images": ("BYTES", [-1]), "pixels": ("UINT8", [-1, *size, 3])}
    outputs = [(t.name, t.datatype, list(t.shape)) for t in grpc_meta.outputs]
    assert outputs == [("probabilities", "FP32", [-1, 3])]
    http_meta = httpclient.InferenceServerClient(served.http_url).get_model_metadata(
        "tiny", headers=auth()
    )
    assert http_meta["inputs"][0] == {"name": "images", "datatype": "BYTES", "shape": [-1]}
    assert http_meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]


def test_model_metadata_lists_every_version_a_request_may_name(
    tmp_path: Path, tiny_model_file: Path
) -> None:
    """OIP's `versions` are those a request may name (Triton lists them all); the metadata
    listed only the version asked for, so a client could not find the others."""
    from perito_core.models.registry import ModelRegistry
    from tests.conftest import publish_tiny
    from tests.helpers import ServerThread

    root = tiny_registry(tmp_path / "registry", tiny_model_file)
    publish_tiny(ModelRegistry.open(str(root), cache_dir=tmp_path / "publish"), tiny_model_file)
    with ServerThread.serving(
        root, tmp_path / "cache", redis_url="redis://127.0.0.1:1/0", http_port=0
    ) as server:
        http_url = f"127.0.0.1:{server.running.http_port}"  # type: ignore[attr-defined]
        for version in ("", "1", "2"):
            http_meta = httpclient.InferenceServerClient(http_url).get_model_metadata(
                "tiny", version
            )
            assert http_meta["versions"] == ["1", "2"], (version, http_meta)
        grpc_meta = grpcclient.InferenceServerClient(server.target).get_model_metadata("tiny", "1")
        assert list(grpc_meta.versions) == ["1", "2"]


@pytest.mark.parametrize("shape_n1", [False, True], ids=["[N]", "[N,1]"])
def test_grpc_infer_answers_what_classify_answers(
    served: Served, images: list[bytes], classify_probabilities: np.ndarray, shape_n1: bool
) -> None:
    client = grpcclient.InferenceServerClient(served.grpc_url)
    outputs = [grpcclient.InferRequestedOutput("probabilities")]
    result = client.infer(
        "tiny", [_bytes_input(grpcclient, images, shape_n1)], outputs=outputs, headers=auth()
    )
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, 3)
    np.testing.assert_allclose(probabilities, classify_probabilities, rtol=1e-5, atol=1e-7)
    response = result.get_response()
    assert response.model_name == "tiny" and response.model_version == "1"

    classes = client.infer(
        "tiny",
        [_bytes_input(grpcclient, images)],
        model_version="production",
        outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=3)],
        headers=auth(),
    )
    _check_classification(classes.as_numpy("probabilities"), classify_probabilities, 3)


@pytest.mark.parametrize("binary_output", [True, False], ids=["binary", "json"])
def test_http_infer_answers_what_classify_answers(
    served: Served, images: list[bytes], classify_probabilities: np.ndarray, binary_output: bool
) -> None:
    client = httpclient.InferenceServerClient(served.http_url)
    result = client.infer(
        "tiny",
        [_bytes_input(httpclient, images)],
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary_output)],
        headers=auth(),
    )
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), classify_probabilities, rtol=1e-5, atol=1e-7
    )
    classes = client.infer(
        "tiny",
        [_bytes_input(httpclient, images)],
        outputs=[
            httpclient.InferRequestedOutput(
                "probabilities", binary_data=binary_output, class_count=3
            )
        ],
        headers=auth(),
    )
    _check_classification(classes.as_numpy("probabilities"), classify_probabilities, 3)


def test_uint8_pixels_at_the_input_size_answer_as_the_encoded_images(
    served: Served, images: list[bytes], classify_probabilities: np.ndarray
) -> None:
    pixels = np.stack([load_model_input(image, TINY_INPUT.spec()) for image in images])
    for module, url in ((grpcclient, served.grpc_url), (httpclient, served.http_url)):
        tensor = module.InferInput("pixels", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels)
        result = module.InferenceServerClient(url).infer("tiny", [tensor], headers=auth())
        np.testing.assert_allclose(
            result.as_numpy("probabilities"), classify_probabilities, rtol=1e-5, atol=1e-7
        )


def test_refusals_carry_the_status_of_the_grpc_code(served: Served, images: list[bytes]) -> None:
    grpc_client = grpcclient.InferenceServerClient(served.grpc_url)
    http_client = httpclient.InferenceServerClient(served.http_url)
    cases = [
        # unknown model: NOT_FOUND / 404
        ("no-such-model", images[:1], auth(), "StatusCode.NOT_FOUND", "404", "no-such-model"),
        # a bad image: INVALID_ARGUMENT / 400, naming the input and the element
        ("tiny", [images[0], b"not an image"], auth(), "StatusCode.INVALID_ARGUMENT", "400",
         "input 'images', image 1"),
        # no token: UNAUTHENTICATED / 401
        ("tiny", images[:1], {}, "StatusCode.UNAUTHENTICATED", "401", "token"),
    ]  # fmt: skip
    for model, batch, headers, grpc_status, http_status, text in cases:
        for module, client, status in (
            (grpcclient, grpc_client, grpc_status),
            (httpclient, http_client, http_status),
        ):
            with pytest.raises(InferenceServerException) as refused:
                client.infer(model, [_bytes_input(module, batch)], headers=headers)
            assert refused.value.status() == status, refused.value
            assert text in refused.value.message(), refused.value


def _fields(module: Any) -> set[tuple[object, ...]]:
    """(message.field, number, type, repeated, message type) of every field, and (rpc, in,
    out) of every method, of a generated module."""

    def walk(descriptor: Any, prefix: str = "") -> Iterator[tuple[object, ...]]:
        for field in descriptor.fields:
            yield (
                prefix + descriptor.name + "." + field.name,
                field.number,
                field.type,
                field.is_repeated,
                field.message_type.name if field.message_type else "",
            )
        for nested in descriptor.nested_types:
            yield from walk(nested, prefix + descriptor.name + ".")

    rows = {row for d in module.DESCRIPTOR.message_types_by_name.values() for row in walk(d)}
    service = module.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return rows | {
        ("rpc " + m.name, m.input_type.name, m.output_type.name) for m in service.methods
    }


def test_the_messages_are_wire_compatible_with_tritonclients() -> None:
    """Every field Perito declares has tritonclient's number and type, and every method its
    messages; both copies load in one process (Perito's lives in a pool of its own)."""
    from tritonclient.grpc import service_pb2 as triton_pb2

    from perito_server._oip import grpc_service_pb2 as ours_pb2

    ours, triton = _fields(ours_pb2), _fields(triton_pb2)
    assert len(ours) > 60
    assert ours - triton == set()
    request = ours_pb2.ModelInferRequest(model_name="tiny", raw_input_contents=[b"\x01"])
    assert triton_pb2.ModelInferRequest.FromString(request.SerializeToString()).model_name == "tiny"


@pytest.fixture(scope="module")
def tenants_served(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_file: Path, redis_url: str
) -> Iterator[tuple[Served, dict[str, str]]]:
    """A server with a tenants file: `reader` (models:read only), `other` (classify, but only
    the model `other-model`), `metered` (classify, 4 images a minute)."""
    work = tmp_path_factory.mktemp("oip-tenants")
    tiny_registry(work / "registry", tiny_model_file)
    tenants = work / "tenants.yaml"
    tokens = {
        "reader": add_tenant(tenants, "reader", roles=["models:read"]),
        "other": add_tenant(tenants, "other", roles=["classify"], models=["other-model"]),
        "metered": add_tenant(
            tenants,
            "metered",
            roles=["classify"],
            models=["tiny"],
            quotas=Quotas(images_per_minute=4),
        ),
    }
    with perito_serve_with_http(
        work,
        PERITO_REDIS_URL=redis_url.rsplit("/", 1)[0] + "/8",
        PERITO_TENANTS_FILE=str(tenants),
    ) as serve:
        yield Served(serve.grpc_url, serve.http_url, serve.process), tokens


def test_tenants_roles_models_and_quotas_hold_on_both_transports(
    tenants_served: tuple[Served, dict[str, str]], images: list[bytes]
) -> None:
    served, tokens = tenants_served
    clients = (
        (grpcclient, grpcclient.InferenceServerClient(served.grpc_url)),
        (httpclient, httpclient.InferenceServerClient(served.http_url)),
    )
    statuses = {
        "PERMISSION_DENIED": ("StatusCode.PERMISSION_DENIED", "403"),
        "RESOURCE_EXHAUSTED": ("StatusCode.RESOURCE_EXHAUSTED", "429"),
    }

    def refused(tenant: str, batch: list[bytes], code: str, text: str) -> None:
        for index, (module, client) in enumerate(clients):
            with pytest.raises(InferenceServerException) as error:
                client.infer(
                    "tiny",
                    [_bytes_input(module, batch)],
                    headers={"authorization": f"Bearer {tokens[tenant]}"},
                )
            assert error.value.status() == statuses[code][index], error.value
            assert text in error.value.message(), error.value

    refused("reader", images[:1], "PERMISSION_DENIED", "classify")
    refused("other", images[:1], "PERMISSION_DENIED", "tiny")
    # 4 images a minute, gRPC and HTTP together: 2 + 2 pass, the next is refused on both.
    for module, client in clients:
        result = client.infer(
            "tiny",
            [_bytes_input(module, images[:2])],
            headers={"authorization": f"Bearer {tokens['metered']}"},
        )
        assert result.as_numpy("probabilities").shape == (2, 3)
    refused("metered", images[:1], "RESOURCE_EXHAUSTED", "")


def test_calls_are_counted_per_door_and_answer_with_the_request_id(
    served: Served, images: list[bytes]
) -> None:
    grpcclient.InferenceServerClient(served.grpc_url).infer(
        "tiny", [_bytes_input(grpcclient, images[:1])], headers=auth()
    )
    answer = httpx.post(
        f"http://{served.http_url}/v2/models/tiny/infer",
        json={
            "inputs": [
                {
                    "name": "images",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": [base64.b64encode(images[0]).decode()],
                }
            ]
        },
        headers={**auth(), "x-request-id": "claim-123-oip"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-request-id"] == "claim-123-oip"
    assert answer.json()["outputs"][0]["shape"] == [1, 3]
    with pytest.raises(InferenceServerException):
        grpcclient.InferenceServerClient(served.grpc_url).infer(
            "no-such-model", [_bytes_input(grpcclient, images[:1])], headers=auth()
        )
    text = httpx.get(served.metrics_url, timeout=10).text
    assert 'perito_requests_total{code="OK",method="ModelInfer"}' in text
    assert 'perito_requests_total{code="OK",method="HTTP ModelInfer"}' in text
    assert 'perito_requests_total{code="NOT_FOUND",method="ModelInfer"}' in text


@pytest.mark.parametrize(
    ("module", "expired"), [(httpclient, "504"), (grpcclient, "StatusCode.DEADLINE_EXCEEDED")]
)
def test_a_request_past_its_timeout_is_deadline_exceeded(
    served: Served, images: list[bytes], module: Any, expired: str
) -> None:
    """Triton's `timeout` request parameter (microseconds), which tritonclient sends over
    HTTP and gRPC alike: 1 us has passed before the batch."""
    url = served.http_url if module is httpclient else served.grpc_url
    client = module.InferenceServerClient(url)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("tiny", [_bytes_input(module, images[:1])], timeout=1, headers=auth())
    assert refused.value.status() == expired, refused.value
    assert client.infer(
        "tiny", [_bytes_input(module, images[:1])], timeout=60_000_000, headers=auth()
    ).as_numpy("probabilities").shape == (1, 3)


HUGE = "1" + "0" * 400  # valid JSON; no field holds it


@pytest.mark.parametrize(
    ("body", "headers", "field"),
    [
        ('{"inputs":[{"name":"pixels","datatype":"UINT8","shape":[0,4611686018427387904,4,3],'
         '"data":[]}]}', {}, "pixels"),
        ('{"inputs":[{"name":"pixels","datatype":"UINT8","shape":[1,4294967296,4294967296,3],'
         '"data":[]}]}', {}, "pixels"),
        ('{"inputs":[{"name":"pixels","datatype":"UINT8","shape":[1,32,32,3],"data":[true'
         + ",1" * (32 * 32 * 3 - 1) + ']}]}', {}, "pixels"),
        ('{"inputs":[],"parameters":{"precision":"\\ud800"}}', {}, "parameters.precision"),
        (f'{{"inputs":[],"parameters":{{"timeout":{HUGE}}}}}', {}, "parameters.timeout"),
        (f'{{"inputs":[],"parameters":{{"min_sharpness":{HUGE}}}}}', {},
         "parameters.min_sharpness"),
        (f'{{"inputs":[],"outputs":[{{"name":"probabilities","parameters":'
         f'{{"classification":{HUGE}}}}}]}}', {}, "outputs[0].parameters.classification"),
        ('{"inputs":[],"parameters":{"binary_data_output":"false"}}', {}, "binary_data_output"),
        ('{"inputs":[],"id":5}', {}, "id"),
        ('{}', {"Inference-Header-Content-Length": "\u00b2"}, "inference-header-content-length"),
    ],
    ids=["empty-2**62", "wraps-to-0", "bool-as-uint8", "lone-surrogate", "huge-timeout",
         "huge-threshold", "huge-classification", "string-flag", "numeric-id", "superscript-2"],
)  # fmt: skip
def test_rest_requests_no_field_can_hold_are_refused_naming_it(
    served: Served, body: str, headers: dict[str, str], field: str
) -> None:
    """Each was answered 500 (a traceback in the log) or, for the flag and the id, taken as
    something else than was sent."""
    sent = {**auth(), "content-type": "application/json"}
    sent.update(headers)
    with httpx.Client(timeout=30) as http:
        answer = http.post(
            f"http://{served.http_url}/v2/models/tiny/infer",
            content=body.encode(),
            headers={k: v.encode("latin-1") for k, v in sent.items()},  # type: ignore[misc]
        )
    assert answer.status_code == 400, answer.text
    [bad_request] = [d for d in answer.json()["details"] if d["@type"].endswith("BadRequest")]
    assert bad_request["fieldViolations"][0]["field"] == field, answer.json()


def test_a_grpc_shape_past_int64_is_invalid_argument(served: Served) -> None:
    client = grpcclient.InferenceServerClient(served.grpc_url)
    for shape in ([0, 2**62, 4, 3], [1, 2**32, 2**32, 3], [2**62, 4, 1, 3]):
        tensor = grpcclient.InferInput("pixels", shape, "UINT8")
        tensor._raw_content = b""  # what the shape says nothing of: no data at all
        with pytest.raises(InferenceServerException) as refused:
            client.infer("tiny", [tensor], headers=auth())
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", (shape, refused.value)


def test_a_version_no_inference_takes_is_not_called_ready(served: Served) -> None:
    """ "1 " (and "1\\n") resolved as version 1 for readiness and metadata while inference
    refused it."""
    grpc_client = grpcclient.InferenceServerClient(served.grpc_url)
    with httpx.Client(timeout=30) as http:
        for version in ("1%20", "1%0A", "%201", "01"):
            ready = http.get(
                f"http://{served.http_url}/v2/models/tiny/versions/{version}/ready",
                headers=auth(),
            )
            assert ready.status_code in (400, 404) and ready.json().get("ready") is not True
    with pytest.raises(InferenceServerException, match="neither a version number nor an alias"):
        grpc_client.is_model_ready("tiny", "1 ", headers=auth())
    assert grpc_client.is_model_ready("tiny", "1", headers=auth())


def test_a_caller_leaving_mid_body_is_cancelled_not_an_internal_error(served: Served) -> None:
    """A client that disconnects during its upload was logged as an ERROR with a traceback
    and counted as INTERNAL."""
    import socket
    import time

    host, port = served.http_url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(
            b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n".encode()
            + b'Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"inputs":'
        )
        time.sleep(0.5)
    counted = ""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "CANCELLED" not in counted:
        time.sleep(0.2)
        counted = httpx.get(served.metrics_url, timeout=10).text
    assert 'perito_requests_total{code="CANCELLED",method="HTTP ModelInfer"}' in counted
    assert 'code="INTERNAL",method="HTTP ModelInfer"' not in counted
