"""Job inputs over the S3 protocol (boto3 -> a local S3-compatible HTTP server): keys are
opaque from listing, manifest and explicit URI to the bytes read; every object is an item;
reads are bounded by the object's ContentLength before the body is read."""

from __future__ import annotations

import csv
import io
import json
import uuid

import numpy as np
import pytest
from PIL import Image

from perito_core.errors import InvalidArgument, InvalidImage, NotFound
from perito_core.imaging import decode_image_with_info
from perito_core.jobs.sources import SourceReader, default_item_id
from perito_core.storage import S3Options, S3Store, make_s3_client

pytestmark = pytest.mark.integration

BUCKET = "inspections"
# Every character class S3 allows that URL syntax would take for itself or escape.
ODD_KEYS = [
    "claim #1234.jpg",
    "what?.jpg",
    "what?x=1&y=2.jpg",
    "100% done.jpg",
    "%41%20encoded-looking.jpg",
    "a+b=c.jpg",
    "with space.jpg",
    "[brackets] {braces}.jpg",
    "café 📷.jpg",
    "sub folder/ü #2.HEIC",
]


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def photo(seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)), fmt)


@pytest.fixture
def uploaded(s3_endpoint: str) -> tuple[str, dict[str, bytes]]:
    """A fresh prefix holding a photo under every odd key, plus what a prefix job ignores."""
    prefix = f"odd-{uuid.uuid4().hex[:8]}"
    client = make_s3_client(S3Options(endpoint_url=s3_endpoint))
    contents = {
        key: photo(i, "HEIF" if key.endswith(".HEIC") else "JPEG") for i, key in enumerate(ODD_KEYS)
    }
    contents["not-a-photo.jpg"] = b"plain text under a photo's name\n"
    contents["non-empty-slash/"] = b"an object whose key ends in / but has bytes"
    for key, data in contents.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=data)
    for ignored in (".DS_Store", "Thumbs.db", "folder placeholder/", ".hidden/a.jpg"):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{ignored}", Body=b"")
    return prefix, contents


def reader_for(endpoint: str) -> SourceReader:
    return SourceReader(S3Options(endpoint_url=endpoint))


def test_a_prefix_lists_every_object_with_its_key_intact(
    s3_endpoint: str, uploaded: tuple[str, dict[str, bytes]]
) -> None:
    prefix, contents = uploaded
    reader = reader_for(s3_endpoint)
    listed = list(reader.iter_prefix(f"s3://{BUCKET}/{prefix}"))  # no trailing slash needed
    expected_keys = sorted(contents, key=lambda key: key.encode())  # S3 lists by UTF-8 bytes
    assert listed == [f"s3://{BUCKET}/{prefix}/{key}" for key in expected_keys]
    outcomes = {}
    for uri in listed:
        data = reader.read(uri, max_bytes=1 << 20)
        key = uri.removeprefix(f"s3://{BUCKET}/{prefix}/")
        assert data == contents[key]
        try:
            outcomes[key] = decode_image_with_info(data)[1].format
        except InvalidImage as exc:
            outcomes[key] = exc.reason
    assert outcomes["claim #1234.jpg"] == "JPEG"
    assert outcomes["sub folder/ü #2.HEIC"] == "HEIF"
    assert outcomes["not-a-photo.jpg"] == "NOT_AN_IMAGE"
    assert default_item_id(f"s3://{BUCKET}/{prefix}/claim #1234.jpg") == "claim #1234.jpg"


def test_csv_and_jsonl_manifests_and_explicit_uris_round_trip_odd_keys(
    s3_endpoint: str, uploaded: tuple[str, dict[str, bytes]]
) -> None:
    prefix, contents = uploaded
    reader = reader_for(s3_endpoint)
    client = make_s3_client(S3Options(endpoint_url=s3_endpoint))
    uris = [f"s3://{BUCKET}/{prefix}/{key}" for key in ODD_KEYS]
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["uri", "id"])
    writer.writerows([uri, f"id {i}, #{i}"] for i, uri in enumerate(uris))
    jsonl = "".join(json.dumps({"uri": u, "id": f"id {i}"}) + "\n" for i, u in enumerate(uris))
    client.put_object(Bucket=BUCKET, Key=f"{prefix}-manifests/job #1.csv", Body=rows.getvalue())
    client.put_object(Bucket=BUCKET, Key=f"{prefix}-manifests/job ?2.jsonl", Body=jsonl)
    from_csv = list(reader.iter_manifest(f"s3://{BUCKET}/{prefix}-manifests/job #1.csv"))
    from_jsonl = list(reader.iter_manifest(f"s3://{BUCKET}/{prefix}-manifests/job ?2.jsonl"))
    assert [(i.uri, i.id) for i in from_csv] == [(u, f"id {n}, #{n}") for n, u in enumerate(uris)]
    assert [(i.uri, i.id) for i in from_jsonl] == [(u, f"id {n}") for n, u in enumerate(uris)]
    for key, uri in zip(ODD_KEYS, uris, strict=True):
        assert reader.normalize(uri) == uri
        assert reader.read(uri) == contents[key]  # an explicit URI, as a URI list sends it


def test_a_missing_key_is_named_whole(s3_endpoint: str) -> None:
    with pytest.raises(NotFound) as caught:
        reader_for(s3_endpoint).read(f"s3://{BUCKET}/nowhere/claim #9.jpg?v=2")
    assert "nowhere/claim #9.jpg?v=2" in caught.value.message


def test_reads_are_bounded_before_the_body_is_read(s3_endpoint: str) -> None:
    key = f"big-{uuid.uuid4().hex[:8]}/claim #1.jpg"
    client = make_s3_client(S3Options(endpoint_url=s3_endpoint))
    client.put_object(Bucket=BUCKET, Key=key, Body=b"x" * 100_000)
    reader = reader_for(s3_endpoint)
    assert len(reader.read(f"s3://{BUCKET}/{key}", max_bytes=100_000)) == 100_000
    with pytest.raises(InvalidImage) as caught:
        reader.read(f"s3://{BUCKET}/{key}", max_bytes=99_999)
    assert caught.value.reason == "TOO_LARGE"
    assert key in caught.value.message and "100,000 bytes" in caught.value.message
    store = S3Store(BUCKET, "", S3Options(endpoint_url=s3_endpoint))
    with store.open_read(key, max_bytes=100_000) as stream:
        assert stream.read() == b"x" * 100_000
    with pytest.raises(InvalidArgument) as manifest_error:
        list(reader.iter_manifest(f"s3://{BUCKET}/{key}", max_bytes=1000))
    assert (manifest_error.value.field, manifest_error.value.reason) == (
        "manifest_uri",
        "TOO_LARGE",
    )
