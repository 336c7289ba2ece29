"""Malformed, hostile and compressed requests over real sockets, through the doors a user would
use: tritonclient (gRPC and HTTP) for the Open Inference Protocol, plain HTTP for the JSON API
and the web page.

Each is answered as the client's mistake (INVALID_ARGUMENT / 400, 413, 415) naming what is at
fault, never as a server error; compressed bodies (`Content-Encoding: gzip` or `deflate`, what
tritonclient's `request_compression_algorithm` sends) are answered as the same body sent plain.
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from perito_server.oip_protocol import serialize_bytes
from tests.conftest import tiny_registry
from tests.helpers import perito_serve_with_http
from tests.processes import Proc, free_port

pytestmark = pytest.mark.integration

TOKEN = "hostile-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MAX_BODY = 2 * 1024 * 1024
# 2 KiB of `[`: deeper than any parser's stack.
DEEP = b"[" * 2048


@dataclass
class Served:
    grpc_url: str
    http_url: str
    process: Proc
    log: Path
    metrics_url: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_file: Path) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("hostile")
    tiny_registry(work / "registry", tiny_model_file)
    metrics_port = free_port()
    with perito_serve_with_http(
        work,
        PERITO_REDIS_URL="redis://127.0.0.1:1/0",  # no jobs: a body is refused before Redis
        PERITO_AUTH_TOKENS=f'["{TOKEN}"]',
        PERITO_METRICS_PORT=str(metrics_port),
        PERITO_MAX_MESSAGE_BYTES=str(MAX_BODY),
        PERITO_MAX_QUEUE_BYTES=str(4 * MAX_BODY),
    ) as serve:
        yield Served(
            serve.grpc_url,
            serve.http_url,
            serve.process,
            work / "serve.log",
            f"http://127.0.0.1:{metrics_port}/metrics",
        )


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{served.http_url}", headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def images(photos: dict[str, Path]) -> list[bytes]:
    return [photos[name].read_bytes() for name in ("coffee", "rocket")]


def _probabilities(served: Served, batch: list[bytes]) -> np.ndarray:
    """What tritonclient.grpc answers for `batch`, sent the ordinary way."""
    tensor = grpcclient.InferInput("images", [len(batch)], "BYTES")
    tensor.set_data_from_numpy(np.array(batch, dtype=np.object_))
    result = grpcclient.InferenceServerClient(served.grpc_url).infer("tiny", [tensor], headers=AUTH)
    return result.as_numpy("probabilities")  # type: ignore[no-any-return]


# OIP gRPC: typed contents beside raw_input_contents, and the count of raw entries.


def _model_infer(served: Served, request: service_pb2.ModelInferRequest) -> grpc.RpcError:
    """`request` through the raw stub (tritonclient's own client never sends both forms);
    the error it is refused with."""
    with grpc.insecure_channel(served.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, metadata=tuple(AUTH.items()), timeout=60)
    return refused.value


def test_grpc_contents_beside_raw_input_contents_is_refused_naming_the_input(
    served: Served, images: list[bytes]
) -> None:
    request = service_pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="images", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(images[0])
    request.raw_input_contents.append(serialize_bytes([images[1]]))
    error = _model_infer(served, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    details = error.details() or ""
    assert "'images'" in details and "raw_input_contents" in details, error
    # Either form alone is answered.
    del request.raw_input_contents[:]
    with grpc.insecure_channel(served.grpc_url) as channel:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=tuple(AUTH.items()), timeout=60
        )
    typed = np.frombuffer(answer.raw_output_contents[0], dtype="<f4")
    np.testing.assert_allclose(typed, _probabilities(served, images[:1])[0], rtol=1e-5)


@pytest.mark.parametrize(
    ("inputs", "raw_entries"), [(1, 2), (1, 3), (2, 1)], ids=["one-extra", "two-extra", "short"]
)
def test_grpc_raw_input_contents_must_be_one_per_input(
    served: Served, images: list[bytes], inputs: int, raw_entries: int
) -> None:
    request = service_pb2.ModelInferRequest(model_name="tiny")
    for index in range(inputs):
        request.inputs.add(name=f"images{index}", datatype="BYTES", shape=[1])
    request.raw_input_contents.extend(serialize_bytes([images[0]]) for _ in range(raw_entries))
    error = _model_infer(served, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "raw_input_contents" in (error.details() or ""), error


@pytest.mark.parametrize(
    ("name", "value"),
    [("confidence_threshold", 0.9), ("top_k", 3), ("explain", True)],
)
def test_a_perito_request_field_sent_as_an_inference_parameter_is_refused_not_ignored(
    served: Served, images: list[bytes], name: str, value: object
) -> None:
    """`confidence_threshold` set through tritonclient's `parameters=` was answered 200 as if
    it had been applied: refused instead, naming it and what to do, on both transports.
    Other names are left alone, as Triton leaves them to the backend."""
    batch = np.array(images[:1], dtype=np.object_)
    g_input = grpcclient.InferInput("images", [1], "BYTES")
    g_input.set_data_from_numpy(batch)
    grpc_client = grpcclient.InferenceServerClient(served.grpc_url)
    with pytest.raises(InferenceServerException) as refused:
        grpc_client.infer("tiny", [g_input], headers=AUTH, parameters={name: value})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", refused.value
    assert f"parameters.{name}" in refused.value.message(), refused.value
    h_input = httpclient.InferInput("images", [1], "BYTES")
    h_input.set_data_from_numpy(batch, binary_data=True)
    http_client = httpclient.InferenceServerClient(served.http_url)
    with pytest.raises(InferenceServerException) as refused:
        # tritonclient.http writes its own headers into the dict it is given: a copy.
        http_client.infer("tiny", [h_input], headers=dict(AUTH), parameters={name: value})
    assert f"parameters.{name}" in refused.value.message(), refused.value
    answered = grpc_client.infer("tiny", [g_input], headers=AUTH, parameters={"custom": "kept"})
    assert answered.as_numpy("probabilities").shape[0] == 1


# OIP REST: a BYTES input's `data` must be a list of the input's shape.


def _b64(image: bytes) -> str:
    return base64.b64encode(image).decode()


def _rest_infer(http: httpx.Client, tensor: dict[str, Any]) -> httpx.Response:
    return http.post("/v2/models/tiny/infer", json={"inputs": [{"name": "images", **tensor}]})


@pytest.mark.parametrize(
    ("shape", "data"),
    [
        ([1], "A"),  # a string, not a list
        ([1], None),  # no data at all
        ([2, 1], [["A"], "B"]),  # a row beside a bare element
        ([2, 1], [["A", "B"], []]),  # ragged rows holding the right count
        ([2], [["A"], ["B"]]),  # nested deeper than the shape
        ([2], ["A"]),  # fewer elements than the shape
        ([1], ["A", "B"]),  # more elements than the shape
        ([2, 1], [["A"], ["B"], ["A"]]),  # more rows than the shape
    ],
    ids=["string", "missing", "mixed", "ragged", "too-deep", "short", "long", "extra-row"],
)
def test_rest_bytes_data_not_of_the_input_shape_is_400_naming_the_input(
    http: httpx.Client, images: list[bytes], shape: list[int], data: Any
) -> None:
    encoded = {"A": _b64(images[0]), "B": _b64(images[1])}

    def encode(value: Any) -> Any:
        if isinstance(value, list):
            return [encode(v) for v in value]
        return encoded.get(value, value)

    tensor = {"datatype": "BYTES", "shape": shape}
    if data is not None:
        tensor["data"] = encode(data)
    answer = _rest_infer(http, tensor)
    assert answer.status_code == 400, answer.text
    assert "'images'" in answer.json()["error"], answer.text


def _post_binary(http: httpx.Client, header: bytes, raw: bytes) -> httpx.Response:
    """An OIP REST infer of JSON `header` then binary `raw` (Triton's binary extension)."""
    return http.post(
        "/v2/models/tiny/infer",
        content=header + raw,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


def test_rest_data_beside_binary_data_size_is_400_naming_the_input(
    http: httpx.Client, images: list[bytes]
) -> None:
    """gRPC refuses contents beside raw_input_contents; REST took JSON `data` beside a binary
    part and answered one of them."""
    raw = serialize_bytes([images[0]])
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": [_b64(images[1])],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    answer = _post_binary(http, header, raw)
    assert answer.status_code == 400, answer.text
    assert "'images'" in answer.json()["error"] and "binary_data_size" in answer.text


@pytest.mark.parametrize(
    ("size", "said"),
    [
        ('"12"', 'binary_data_size must be a whole number of bytes (a JSON integer), not "12"'),
        ("true", "binary_data_size must be a whole number of bytes (a JSON integer), not true"),
        ("999999", "binary_data_size 999999 is past the body (its binary part holds"),
    ],
)
def test_rest_a_binary_data_size_that_cannot_be_is_400_saying_why(
    http: httpx.Client, images: list[bytes], size: str, said: str
) -> None:
    raw = serialize_bytes([images[0]])
    header = (
        '{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], '
        f'"parameters": {{"binary_data_size": {size}}}}}]}}'
    ).encode()
    answer = _post_binary(http, header, raw)
    assert answer.status_code == 400, answer.text
    assert said in answer.json()["error"], answer.text


@pytest.mark.parametrize(
    ("shape", "nested"),
    [([2], False), ([2, 1], False), ([2, 1], True)],
    ids=["N", "N1", "N1-nested"],
)
def test_rest_bytes_data_flat_or_nested_by_the_shape_is_answered(
    served: Served, http: httpx.Client, images: list[bytes], shape: list[int], nested: bool
) -> None:
    data: list[Any] = [_b64(image) for image in images]
    if nested:
        data = [[element] for element in data]
    answer = _rest_infer(http, {"datatype": "BYTES", "shape": shape, "data": data})
    assert answer.status_code == 200, answer.text
    probabilities = np.array(answer.json()["outputs"][0]["data"]).reshape(2, -1)
    np.testing.assert_allclose(probabilities, _probabilities(served, images), rtol=1e-5)


# Every JSON door: bodies nested deeper than a parser's stack.

JSON_DOORS = {
    "HTTP ModelInfer": "/v2/models/tiny/infer",
    "HTTP Classify": "/v1/models/tiny:classify",
    "HTTP SubmitJob": "/v1/jobs",
}


def _counted(served: Served, method: str, code: str) -> float:
    """perito_requests_total for `method` answered with `code` (0 when never)."""
    text = httpx.get(served.metrics_url, timeout=10).text
    line = f'perito_requests_total{{code="{code}",method="{method}"}} '
    return sum(float(row[len(line) :]) for row in text.splitlines() if row.startswith(line))


@pytest.mark.parametrize(
    "body",
    [DEEP, b"[" * 5000 + b"]" * 5000, b'{"inputs": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3001],
    ids=["2KiB-of-[", "balanced", "objects"],
)
@pytest.mark.parametrize("method", JSON_DOORS)
def test_json_nested_deeper_than_the_parser_is_400_naming_the_body(
    served: Served, http: httpx.Client, method: str, body: bytes
) -> None:
    log_before = served.log.stat().st_size
    internal_before = _counted(served, method, "INTERNAL")
    refused_before = _counted(served, method, "INVALID_ARGUMENT")
    answer = http.post(
        JSON_DOORS[method], content=body, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert "body" in message and "deep" in message, answer.text
    with served.log.open("rb") as log:
        log.seek(log_before)
        assert b"Traceback" not in log.read()
    assert _counted(served, method, "INVALID_ARGUMENT") == refused_before + 1
    assert _counted(served, method, "INTERNAL") == internal_before


def test_the_web_page_login_refuses_a_deep_body_with_400() -> None:
    import threading
    import time

    import uvicorn

    from perito_web.app import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app("127.0.0.1:1"), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the web app did not start"
            time.sleep(0.05)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/api/login",
            content=DEEP,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert answer.status_code == 400, answer.text
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# Compressed bodies.


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_compressed_requests_are_answered_as_plain_ones(
    served: Served, images: list[bytes], algorithm: str, binary: bool
) -> None:
    """tritonclient's `request_compression_algorithm`, with the binary data extension (its
    Inference-Header-Content-Length counts the JSON before compression) and without."""
    # In JSON, BYTES images are base64 strings; in the binary part, the bytes themselves.
    batch = images if binary else [base64.b64encode(image) for image in images]
    tensor = httpclient.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(batch, dtype=np.object_), binary_data=binary)
    result = httpclient.InferenceServerClient(served.http_url).infer(
        "tiny",
        [tensor],
        headers=dict(AUTH),
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), _probabilities(served, images), rtol=1e-5
    )


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_the_json_api_decodes_compressed_bodies(
    http: httpx.Client, images: list[bytes], encoding: str
) -> None:
    body = json.dumps({"images": [{"content": _b64(images[0]), "id": "a"}], "top_k": 1}).encode()
    plain = http.post("/v1/models/tiny:classify", content=body)
    assert plain.status_code == 200, plain.text
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    answer = http.post(
        "/v1/models/tiny:classify",
        content=packed,
        headers={"content-type": "application/json", "content-encoding": encoding},
    )
    assert answer.status_code == 200, answer.text
    # The same answer from the same bytes; only each call's own request id differs.
    results = [answer.json()["results"], plain.json()["results"]]
    for result in (r for call in results for r in call):
        assert result["provenance"].pop("request_id")
    assert results[0] == results[1]


@pytest.mark.parametrize("path", JSON_DOORS.values())
@pytest.mark.parametrize("encoding", ["br", "gzip, br", "compress"])
def test_an_unknown_content_encoding_is_415_with_accept_encoding(
    http: httpx.Client, path: str, encoding: str
) -> None:
    answer = http.post(
        path,
        content=b'{"inputs": []}',
        headers={"content-type": "application/json", "content-encoding": encoding},
    )
    assert answer.status_code == 415, answer.text
    accepted = {e.strip() for e in answer.headers["accept-encoding"].split(",")}
    assert accepted == {"gzip", "deflate"}
    assert "content-encoding" in answer.text.lower()


@pytest.mark.parametrize("path", JSON_DOORS.values())
def test_a_gzip_bomb_is_413_once_its_decoded_size_passes_the_bound(
    http: httpx.Client, path: str
) -> None:
    """256 MiB of zeros in about 256 KiB: refused without being inflated."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"0" * (1024 * 1024)
    bomb = b"".join(packer.compress(zeros) for _ in range(256)) + packer.flush()
    assert len(bomb) < MAX_BODY
    answer = http.post(
        path,
        content=bomb,
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert answer.status_code == 413, answer.text
    assert "decoded" in answer.text


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", b"not gzip at all"),
        ("gzip", gzip.compress(b'{"inputs": []}')[:-6]),  # cut short
        ("deflate", b"not zlib either"),
    ],
    ids=["not-gzip", "truncated", "not-deflate"],
)
def test_a_body_not_in_its_content_encoding_is_400_naming_it(
    http: httpx.Client, encoding: str, body: bytes
) -> None:
    answer = http.post(
        "/v2/models/tiny/infer",
        content=body,
        headers={"content-type": "application/json", "content-encoding": encoding},
    )
    assert answer.status_code == 400, answer.text
    assert encoding in answer.json()["error"], answer.text


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /v2/models/tiny" + b"x" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GARBAGE\x00\x01 / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    ],
    ids=["100 KB URL", "not a request line", "a header without a colon"],
)
def test_what_http_cannot_parse_is_a_json_400(served: Served, request_line: bytes) -> None:
    """uvicorn answered these with a plain-text "Invalid HTTP request received."; every other
    refusal is JSON a client can parse."""
    import socket

    host, port = served.http_url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as raw:
        raw.sendall(request_line)
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT", error
    assert "not an HTTP/1.1 request" in error["message"]


# gRPC messages gRPC itself refuses or protobuf cannot parse: the caller's fault, said so.


def test_a_grpc_message_over_the_limit_is_resource_exhausted_without_a_server_error(
    served: Served,
) -> None:
    log_before = served.log.stat().st_size
    before = _counted(served, "ModelInfer", "RESOURCE_EXHAUSTED")
    internal = _counted(served, "ModelInfer", "INTERNAL")
    big = np.array([b"\xff\xd8" + b"\0" * (MAX_BODY + 1024)], dtype=np.object_)
    tensor = grpcclient.InferInput("images", [1], "BYTES")
    tensor.set_data_from_numpy(big)
    client = grpcclient.InferenceServerClient(served.grpc_url)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("tiny", [tensor], headers=AUTH)
    assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert _counted(served, "ModelInfer", "RESOURCE_EXHAUSTED") == before + 1
    assert _counted(served, "ModelInfer", "INTERNAL") == internal
    with served.log.open("rb") as log:
        log.seek(log_before)
        written = log.read()
    assert b"Traceback" not in written and b"ERROR" not in written, written[-2000:]
    # The server goes on answering on the same channel.
    assert _probabilities(served, _tiny_png()).shape[0] == 1


def _tiny_png() -> list[bytes]:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, "PNG")
    return [buffer.getvalue()]


@pytest.mark.parametrize(
    "method",
    ["/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ModelInfer"],
)
def test_a_grpc_message_protobuf_cannot_parse_is_invalid_argument(
    served: Served, method: str
) -> None:
    log_before = served.log.stat().st_size
    name = method.rpartition("/")[2]
    internal = _counted(served, name, "INTERNAL")
    with grpc.insecure_channel(served.grpc_url) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as refused:
            call(b"\xff\xff\xff\xff", metadata=tuple(AUTH.items()), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "protobuf cannot parse it" in (refused.value.details() or "")
    assert _counted(served, name, "INTERNAL") == internal
    with served.log.open("rb") as log:
        log.seek(log_before)
        assert b"Traceback" not in log.read()


def test_tritonclients_statistics_call_is_told_the_extension_is_not_served(
    served: Served,
) -> None:
    client = httpclient.InferenceServerClient(served.http_url)
    with pytest.raises(InferenceServerException) as refused:
        client.get_inference_statistics(headers=AUTH)
    assert "does not serve Triton's statistics extension" in str(refused.value.message())
    assert "model 'stats'" not in str(refused.value.message())


def test_a_utf8_request_id_is_recorded_and_echoed_as_sent(
    served: Served, http: httpx.Client
) -> None:
    body = {
        "inputs": [
            {"name": "images", "datatype": "BYTES", "shape": [1], "data": [_b64(_tiny_png()[0])]}
        ]
    }
    answer = http.post(
        "/v2/models/tiny/infer", json=body, headers={"x-request-id": "café-1 日本".encode()}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["parameters"]["perito_request_id"] == "café-1 日本"
    echoed = [v for k, v in answer.headers.raw if k.lower() == b"x-request-id"]
    assert echoed == ["café-1 日本".encode()]
