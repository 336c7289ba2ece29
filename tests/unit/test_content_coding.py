"""Request bodies in a Content-Encoding: which codings are decoded, and that a body is never
inflated past the room it is given (what keeps a gzip bomb a bound's worth in memory)."""

from __future__ import annotations

import gzip
import zlib

import pytest

from perito_core.errors import InvalidArgument
from perito_server.doors.content_coding import UnsupportedEncoding, body_decoder


def _decode(coding: str, body: bytes, room: int, chunk: int = 7) -> bytes:
    """`body` fed to the decoder `chunk` bytes at a time, as it streams in."""
    decoder = body_decoder(coding)
    assert decoder is not None
    decoded = b""
    for start in range(0, len(body), chunk):
        decoded += decoder.decode(body[start : start + chunk], room - len(decoded))
        if len(decoded) > room:
            return decoded
    decoder.finish()
    return decoded


@pytest.mark.parametrize("header", ["", "identity", " Identity "])
def test_a_body_as_it_is_has_no_decoder(header: str) -> None:
    assert body_decoder(header) is None


@pytest.mark.parametrize("header", ["br", "compress", "zstd", "gzip, gzip", "gzip, br"])
def test_other_codings_are_unsupported_naming_the_header(header: str) -> None:
    with pytest.raises(UnsupportedEncoding) as refused:
        body_decoder(header)
    assert refused.value.field == "content-encoding"


@pytest.mark.parametrize("header", ["gzip", "x-gzip", "GZip", "deflate", "identity, deflate"])
def test_gzip_and_deflate_decode_chunk_by_chunk(header: str) -> None:
    body = b'{"inputs": []}' * 100
    packed = zlib.compress(body) if "deflate" in header else gzip.compress(body)
    assert _decode(header, packed, room=len(body)) == body


def test_gzip_members_one_after_another_decode_as_one_body() -> None:
    assert _decode("gzip", gzip.compress(b"first ") + gzip.compress(b"second"), 100) == (
        b"first second"
    )


def test_a_bomb_is_inflated_only_one_byte_past_the_room() -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))
    decoder = body_decoder("gzip")
    assert decoder is not None
    assert len(decoder.decode(bomb, 1000)) == 1001


@pytest.mark.parametrize(
    ("coding", "body"),
    [
        ("gzip", b"plain text"),
        ("deflate", b"plain text"),
        ("gzip", gzip.compress(b"cut short" * 10)[:-5]),
        ("deflate", zlib.compress(b"with a tail") + b"tail"),
    ],
    ids=["not-gzip", "not-deflate", "truncated", "trailing-data"],
)
def test_a_body_not_in_its_coding_is_invalid_naming_the_body(coding: str, body: bytes) -> None:
    with pytest.raises(InvalidArgument) as refused:
        _decode(coding, body, room=10_000)
    assert refused.value.field == "body"
    assert coding in refused.value.message
    # zlib's own words ("Error -3 while decompressing data: incorrect header check") stay in
    # the operator's log.
    assert "Error -" not in refused.value.message
    assert "header check" not in refused.value.message
