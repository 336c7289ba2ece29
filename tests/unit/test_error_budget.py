"""Rich statuses stay within a size budget, so they always arrive whole.

gRPC clients refuse trailers over 8 KiB by default: past it a call fails at random with
RESOURCE_EXHAUSTED while the `google.rpc.Status` it carried still says INVALID_ARGUMENT (the
SDK used to raise a bare ValueError on that mismatch); past 16 KiB every call does, with no
details. These tests check the budget on hostile input; tests/integration/test_overload.py
checks it over a real socket.
"""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

import perito
from perito._errors import from_rpc_error
from perito_core import errors
from perito_server.errors import (
    ECHO_CHARS,
    GRPC_CODES,
    MAX_DESCRIPTION_BYTES,
    MAX_DETAILS_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_TRAILER_BYTES,
    MAX_VIOLATIONS,
    clip_utf8,
    echo,
    to_status,
    trailer_bytes,
)
from tests.unit.test_error_mapping import FakeRpcError

# gRPC's default soft limit on received metadata (`grpc.max_metadata_size`).
GRPC_METADATA_SOFT_LIMIT = 8192


def _rich(status: grpc.Status) -> status_pb2.Status:
    [(key, value)] = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    return status_pb2.Status.FromString(value)


def _violations(status: grpc.Status) -> list[tuple[str, str]]:
    for detail in _rich(status).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return [(v.field, v.description) for v in bad.field_violations]
    return []


def test_the_budget_is_well_below_grpcs_metadata_limit() -> None:
    assert MAX_TRAILER_BYTES <= GRPC_METADATA_SOFT_LIMIT * 0.6


HOSTILE = [
    errors.InvalidImage(
        "images[0] (id '" + "é" * 5000 + "'): not an image (and 999 more)",
        field="images[0]",
        violations=[(f"images[{i}]", f"id {'🙂' * 3000}: bad") for i in range(1000)],
        retry_after=1e12,
    ),
    errors.InvalidArgument("x" * 100_000, field="f" * 10_000),
    errors.QueueFull("%" * 50_000, retry_after=0.25),
    errors.NotFound("\x00\r\n" * 10_000),
    errors.PeritoError("internal error: " + "\ud800" * 100),  # a lone surrogate
    errors.InvalidArgument(
        "many", violations=[("v" * 500, "d" * 500), *[(f"images[{i}]", "z") for i in range(10)]]
    ),
]


@pytest.mark.parametrize("error", HOSTILE, ids=lambda e: type(e).__name__)
def test_any_error_fits_the_budget_and_keeps_its_code(error: errors.PeritoError) -> None:
    status = to_status(error)
    rich = _rich(status)
    assert trailer_bytes(status) <= MAX_TRAILER_BYTES
    assert rich.ByteSize() <= MAX_DETAILS_BYTES
    assert len(rich.message.encode()) <= MAX_MESSAGE_BYTES
    assert status.code == GRPC_CODES[error.code]
    assert rich.code == status.code.value[0]
    assert rich.message == status.details
    for _, description in _violations(status):
        assert len(description.encode()) <= MAX_DESCRIPTION_BYTES
    # What grpcio's own helper checks on the client side holds: no ValueError.
    assert rpc_status.from_call(FakeRpcError(status)) == rich  # type: ignore[arg-type]


def test_many_violations_keep_the_first_and_count_the_rest() -> None:
    violations = [(f"images[{i}]", f"images[{i}]: empty") for i in range(64)]
    status = to_status(errors.InvalidImage("images[0]: empty (and 63 more)", violations=violations))
    sent = _violations(status)
    assert sent[:-1] == violations[: len(sent) - 1]
    assert len(sent) - 1 == MAX_VIOLATIONS
    field, description = sent[-1]
    assert field == "images"
    assert description == f"... and {64 - MAX_VIOLATIONS} more (images[16] to images[63])"


def test_long_descriptions_give_fewer_violations_never_a_bigger_status() -> None:
    violations = [(f"images[{i}]", f"images[{i}]: " + "x" * 300) for i in range(64)]
    status = to_status(errors.InvalidImage("bad", violations=violations))
    sent = _violations(status)
    kept = len(sent) - 1
    assert 1 <= kept < MAX_VIOLATIONS
    assert sent[-1][1].startswith(f"... and {64 - kept} more")
    assert _rich(status).ByteSize() <= MAX_DETAILS_BYTES


def test_few_violations_travel_as_they_are() -> None:
    violations = [("images[1]", "empty"), ("images[4]", "truncated")]
    assert _violations(to_status(errors.InvalidImage("bad", violations=violations))) == violations


def test_echo_keeps_the_first_characters_and_marks_the_cut() -> None:
    assert echo("short") == "short"
    assert echo("a" * ECHO_CHARS) == "a" * ECHO_CHARS
    assert echo("a" * 250) == "a" * ECHO_CHARS + "…"


def test_clip_utf8_never_splits_a_character() -> None:
    clipped = clip_utf8("é" * 100, 51)
    assert clipped.endswith("…") and len(clipped.encode()) <= 51
    assert set(clipped[:-1]) == {"é"}
    assert clip_utf8("fits", 4) == "fits"


def test_sixty_four_bad_images_with_long_ids_reach_the_sdk_typed_and_whole() -> None:
    """64 undecodable images with 250-character ids, without the network: what the server
    now sends reaches the SDK typed, every violation whole."""
    ids = [f"{i:03d}-" + "c" * 246 for i in range(64)]
    violations = [
        (f"images[{i}]", f"images[{i}] (id {echo(id_)!r}): not a recognised image format")
        for i, id_ in enumerate(ids)
    ]
    status = to_status(
        errors.InvalidImage(
            violations[0][1] + " (and 63 more)",
            violations=violations,
            violation_reasons={field: "NOT_AN_IMAGE" for field, _ in violations},
        )
    )
    assert trailer_bytes(status) <= MAX_TRAILER_BYTES
    error = from_rpc_error(FakeRpcError(status))
    assert isinstance(error, perito.InvalidArgumentError)
    assert error.reason == "INVALID_IMAGE"
    assert error.violations[0].reason == "NOT_AN_IMAGE"
    assert [v.field for v in error.violations[:3]] == ["images[0]", "images[1]", "images[2]"]
    assert ids[0][:ECHO_CHARS] + "…" in error.violations[0].description
    assert error.violations[-1].description.startswith("... and ")
