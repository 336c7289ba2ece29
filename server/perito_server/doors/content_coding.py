"""Request bodies sent in a `Content-Encoding` (RFC 9110 section 8.4): gzip and deflate.

What tritonclient's `request_compression_algorithm` sends (and Triton accepts): `gzip`
(RFC 1952; `x-gzip` is its alias) or `deflate` (the zlib format of RFC 1950, as RFC 9110 has
it). The HTTP edge (`HttpEdge.body`) feeds each chunk of the body as it streams in to a
`BodyDecoder`, which inflates no more than the room left under the body bound plus one byte,
so a small body that inflates to gigabytes (a "gzip bomb") is refused while it is a bound's
worth in memory. Any other coding is refused with `UnsupportedEncoding`, which the edge answers
415 with `Accept-Encoding` naming these (RFC 7694).
"""

from __future__ import annotations

import logging
import zlib

from perito_core.errors import ErrorCode, InvalidArgument, PeritoError
from perito_server.errors import echo

log = logging.getLogger(__name__)

# What `Accept-Encoding` on a 415 lists.
ACCEPT_ENCODING = "gzip, deflate"
# zlib window bits of each coding: gzip's header and trailer, zlib's.
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class UnsupportedEncoding(
    PeritoError, code=ErrorCode.INVALID_ARGUMENT, reason="UNSUPPORTED_CONTENT_ENCODING"
):
    """A request body in a `Content-Encoding` the server does not decode (answered 415, with
    `Accept-Encoding: gzip, deflate`)."""


class BodyDecoder:
    """One body's decompressor, fed the body chunk by chunk.

    Args:
        coding: "gzip", "x-gzip" or "deflate" (see `body_decoder`).
    """

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._inflate = zlib.decompressobj(_WBITS[coding])

    def decode(self, chunk: bytes, room: int) -> bytes:
        """The decoded bytes of `chunk`: all of them when they are at most `room`, otherwise
        `room + 1` (the caller's sign that the body is over its bound; the rest of `chunk`
        is never inflated).

        Raises:
            InvalidArgument: naming `body`, when `chunk` is not in the coding, or there is
                data after its end.
        """
        try:
            if self._inflate.eof:
                decoded = b""
                tail = chunk
            else:
                decoded = self._inflate.decompress(chunk, room + 1)
                tail = self._inflate.unused_data
            # gzip allows several members one after the other (RFC 1952 section 2.2).
            while tail and len(decoded) <= room and self.coding != "deflate":
                self._inflate = zlib.decompressobj(_WBITS[self.coding])
                decoded += self._inflate.decompress(tail, room + 1 - len(decoded))
                tail = self._inflate.unused_data
        except zlib.error as error:
            log.debug("a %s body did not inflate: %s", self.coding, error)
            # zlib's own words stay in the operator's log: they tell of the server's library.
            raise InvalidArgument(
                f"the body is not valid {self.coding} (its Content-Encoding): send it "
                "compressed as that header says, or without the header",
                field="body",
            ) from None
        if tail and len(decoded) <= room:
            raise InvalidArgument(
                f"the body has data after the end of its {self.coding} stream", field="body"
            )
        return decoded

    def finish(self) -> None:
        """Check that the body held the whole stream.

        Raises:
            InvalidArgument: naming `body`, when its stream ends early.
        """
        if not self._inflate.eof:
            raise InvalidArgument(
                f"the body's {self.coding} stream (its Content-Encoding) ends early", field="body"
            )


def body_decoder(content_encoding: str) -> BodyDecoder | None:
    """The decoder of a body whose `Content-Encoding` header is `content_encoding`; None for
    a body as it is (no header, or `identity`).

    Raises:
        UnsupportedEncoding: naming `content-encoding`, for any other coding, or more than
            one (`gzip, gzip`).
    """
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _WBITS:
        return BodyDecoder(codings[0])
    raise UnsupportedEncoding(
        f"Content-Encoding {echo(content_encoding)!r} is not decoded here; send the body as "
        f"it is, or in one of: {ACCEPT_ENCODING}",
        field="content-encoding",
    )
