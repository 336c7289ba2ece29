"""The Open Inference Protocol door's pure logic: BYTES tensors, shapes, parameters, the HTTP
status of each error, and the generated messages kept fresh."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from perito.v1 import classify_pb2
from perito_core.errors import InvalidArgument, InvalidImage, NotFound, QueueFull, Unauthenticated
from perito_server.doors.json_api import parse_classify
from perito_server.errors import to_http
from perito_server.oip_protocol import (
    classification_count,
    deserialize_bytes,
    image_count,
    serialize_bytes,
)
from scripts.gen_protos import OIP_OUT, generate_oip


def test_bytes_elements_round_trip_with_4_byte_little_endian_lengths() -> None:
    elements = [b"\xff\xd8jpeg", b"", b"x" * 300]
    raw = serialize_bytes(elements)
    assert raw[:4] == (6).to_bytes(4, "little")
    assert deserialize_bytes(raw, 3, "images") == elements


@pytest.mark.parametrize(
    ("raw", "count"),
    [
        (serialize_bytes([b"ab", b"cd"]), 3),  # fewer than the shape says
        (serialize_bytes([b"ab", b"cd"]), 1),  # more
        (serialize_bytes([b"abc"])[:-1], 1),  # truncated
        (b"\x01\x00", 1),  # a length cut short
    ],
)
def test_malformed_bytes_contents_name_the_input(raw: bytes, count: int) -> None:
    with pytest.raises(InvalidArgument) as refused:
        deserialize_bytes(raw, count, "IMAGE")
    assert refused.value.field == "IMAGE" and "'IMAGE'" in refused.value.message


def test_shapes_images_and_pixels() -> None:
    assert image_count([5], "BYTES", "images") == 5
    assert image_count([5, 1], "BYTES", "images") == 5
    assert image_count([2, 32, 32, 3], "UINT8", "pixels") == 2
    for shape, datatype in (([5, 2], "BYTES"), ([2, 32, 32], "UINT8"), ([1], "FP32")):
        with pytest.raises(InvalidArgument) as refused:
            image_count(shape, datatype, "x")
        assert refused.value.field == "x"


def test_classification_parameter() -> None:
    assert classification_count(None) == 0
    assert classification_count(3) == 3
    assert classification_count(3.0) == 3
    for bad in ("3", 2.5, True):
        with pytest.raises(InvalidArgument):
            classification_count(bad)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InvalidImage("images[1]: not an image", field="images[1]"), 400, "INVALID_ARGUMENT"),
        (NotFound("no model"), 404, "NOT_FOUND"),
        (Unauthenticated("no token"), 401, "UNAUTHENTICATED"),
        (QueueFull("full", retry_after=1.2), 429, "RESOURCE_EXHAUSTED"),
    ],
)
def test_http_answers_carry_the_grpc_codes_status_in_aip193_shape(
    error: InvalidArgument, status: int, code: str
) -> None:
    got, body, headers = to_http(error)
    assert got == status
    assert body["error"]["code"] == status and body["error"]["status"] == code
    assert body["error"]["message"] == error.message
    types = [d["@type"].rpartition("/")[2] for d in body["error"]["details"]]
    assert types[0] == "google.rpc.ErrorInfo"
    if error.violations:
        bad = body["error"]["details"][types.index("google.rpc.BadRequest")]
        assert bad["fieldViolations"][0]["field"] == "images[1]"
    if error.retry_after:
        assert headers == {"Retry-After": "2"}
        assert "google.rpc.RetryInfo" in types


def test_generated_oip_messages_match_the_proto(tmp_path: Path) -> None:
    fresh = generate_oip(tmp_path)
    assert {p.name for p in fresh} == {"grpc_service_pb2.py", "grpc_service_pb2.pyi"}
    for path in fresh:
        checked_in = OIP_OUT / path.name
        assert checked_in.exists(), f"{checked_in} is missing: run `make proto`"
        assert checked_in.read_bytes() == path.read_bytes(), f"{checked_in} is stale: make proto"


def _proto_json(document: dict[str, Any]) -> classify_pb2.ClassifyRequest | str:
    """What the proto3 JSON mapping alone makes of `document` (the message, or the error)."""
    message = classify_pb2.ClassifyRequest()
    try:
        json_format.ParseDict(document, message)
    except json_format.ParseError as error:
        return f"refused: {error}"
    return message


def _json_api(document: dict[str, Any]) -> classify_pb2.ClassifyRequest | str:
    message = classify_pb2.ClassifyRequest()
    try:
        parse_classify(document, message)
    except InvalidArgument as error:
        return f"refused: {error.message.removeprefix('the body does not fit: ')}"
    return message


PHOTO = bytes(range(256)) * 3 + b"\xff\xd8\xfe"  # every byte value; base64 with '+' and '/'


@pytest.mark.parametrize(
    "image",
    [
        {"id": "a", "content": base64.b64encode(PHOTO).decode()},  # the fast path
        {"content": base64.urlsafe_b64encode(PHOTO).decode()},  # URL-safe
        {"content": base64.b64encode(PHOTO).decode().rstrip("=")},  # unpadded
        {"content": base64.encodebytes(PHOTO).decode()},  # wrapped at 76 columns, as `base64`
        {"content": ""},
        {"uri": "s3://bucket/key.jpg"},
        {"uri": "s3://bucket/key.jpg", "content": base64.b64encode(PHOTO).decode()},  # both
        {"content": 42},
        "not an object",
    ],
)
def test_json_api_images_read_as_the_proto3_json_mapping_reads_them(image: Any) -> None:
    document = {"model": "m", "top_k": 3, "images": [{"id": "first", "content": "AAEC"}, image]}
    before = copy.deepcopy(document)
    assert _json_api(document) == _proto_json(document)
    assert document == before  # the caller's document is not changed
