"""Errors become rich gRPC statuses on the server and typed exceptions in the SDK."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

import perito
from perito._errors import from_rpc_error
from perito_core import errors
from perito_server.errors import to_status


class FakeRpcError(grpc.RpcError):
    """What a failed call raises in grpcio: the status, its message and trailers."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code  # type: ignore[no-any-return]

    def details(self) -> str:
        return self._status.details  # type: ignore[no-any-return]

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._status.trailing_metadata  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("error", "code", "sdk_type"),
    [
        (
            errors.InvalidImage("bad", reason="TRUNCATED"),
            grpc.StatusCode.INVALID_ARGUMENT,
            perito.InvalidArgumentError,
        ),
        (errors.NotFound("no model"), grpc.StatusCode.NOT_FOUND, perito.NotFoundError),
        (
            errors.QueueFull("full", retry_after=0.25),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            perito.ResourceExhaustedError,
        ),
        (
            errors.StorageUnavailable("s3 down"),
            grpc.StatusCode.UNAVAILABLE,
            perito.UnavailableError,
        ),
        (
            errors.ArtifactIntegrityError("sha"),
            grpc.StatusCode.FAILED_PRECONDITION,
            perito.FailedPreconditionError,
        ),
        (
            errors.DeadlineExceeded("late"),
            grpc.StatusCode.DEADLINE_EXCEEDED,
            perito.DeadlineExceededError,
        ),
        (errors.AlreadyExists("dup"), grpc.StatusCode.ALREADY_EXISTS, perito.AlreadyExistsError),
        (errors.PeritoError("boom"), grpc.StatusCode.INTERNAL, perito.InternalError),
    ],
)
def test_each_error_keeps_its_code_message_and_reason(
    error: errors.PeritoError, code: grpc.StatusCode, sdk_type: type[perito.PeritoError]
) -> None:
    status = to_status(error)
    assert status.code == code
    sdk_error = from_rpc_error(FakeRpcError(status))
    assert type(sdk_error) is sdk_type
    assert sdk_error.message == error.message
    assert sdk_error.reason == error.reason


def test_field_violations_and_retry_hints_survive_the_trip() -> None:
    error = errors.InvalidImage(
        "images[1]: empty",
        field="images[1]",
        violations=[("images[1]", "empty"), ("images[4]", "truncated")],
    )
    sdk_error = from_rpc_error(FakeRpcError(to_status(error)))
    assert [(v.field, v.description) for v in sdk_error.violations] == [
        ("images[1]", "empty"),
        ("images[4]", "truncated"),
    ]
    busy = from_rpc_error(FakeRpcError(to_status(errors.QueueFull("full", retry_after=0.25))))
    assert busy.retry_after == pytest.approx(0.25)


SDK_TYPES = {
    grpc.StatusCode.INVALID_ARGUMENT: perito.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: perito.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: perito.AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: perito.FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: perito.ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: perito.UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: perito.DeadlineExceededError,
    grpc.StatusCode.UNIMPLEMENTED: perito.UnimplementedError,
    grpc.StatusCode.INTERNAL: perito.InternalError,
    grpc.StatusCode.UNAUTHENTICATED: perito.UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: perito.PermissionDeniedError,
    grpc.StatusCode.CANCELLED: perito.CancelledError,
}


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_every_status_code_maps_to_a_perito_error(code: grpc.StatusCode) -> None:
    """Whatever the code, even OK (no failed call carries it, but a broken proxy might), the
    caller gets a `PeritoError` that keeps the code and the server's words."""
    error = from_rpc_error(FakeRpcError(_Status(code, f"went wrong: {code.name}", ())))
    assert isinstance(error, perito.PeritoError)
    assert type(error) is SDK_TYPES.get(code, perito.PeritoError)
    assert error.code is code
    assert str(error).endswith(f"went wrong: {code.name}")


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[object, ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing


def _details_bin(code: int, message: str = "bad", *details: Message) -> tuple[str, bytes]:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = status_pb2.Status(code=code, message=message, details=packed)
    return ("grpc-status-details-bin", status.SerializeToString())


BAD_REQUEST = error_details_pb2.BadRequest(
    field_violations=[error_details_pb2.BadRequest.FieldViolation(field="images[0]")]
)


@pytest.mark.parametrize(
    "trailers",
    [
        # What a client saw when the trailers went over its metadata limit: the call failed
        # RESOURCE_EXHAUSTED, the status it still carried said INVALID_ARGUMENT.
        (_details_bin(code_pb2.INVALID_ARGUMENT, "bad", BAD_REQUEST),),
        (("grpc-status-details-bin", b"\xff\x00 not a protobuf"),),
        (("grpc-status-details-bin", "a str, not bytes"),),
        None,
        (),
    ],
    ids=["code-mismatch", "garbage", "not-bytes", "no-trailers", "empty"],
)
def test_a_status_that_cannot_be_trusted_falls_back_to_code_and_message(
    trailers: tuple[tuple[str, object], ...] | None,
) -> None:
    detail = "Stream removed (received metadata size exceeds soft limit (11023 vs. 8192))"
    error = from_rpc_error(
        FakeRpcError(_Status(grpc.StatusCode.RESOURCE_EXHAUSTED, detail, trailers))  # type: ignore[arg-type]
    )
    assert type(error) is perito.ResourceExhaustedError
    assert error.message == detail
    assert error.violations == () and error.reason == "" and error.retry_after is None


def test_a_message_that_differs_from_the_status_keeps_the_details() -> None:
    trailers = (_details_bin(code_pb2.INVALID_ARGUMENT, "the server's words", BAD_REQUEST),)
    error = from_rpc_error(
        FakeRpcError(_Status(grpc.StatusCode.INVALID_ARGUMENT, "other words", trailers))
    )
    assert type(error) is perito.InvalidArgumentError
    assert error.message == "other words"
    assert [v.field for v in error.violations] == ["images[0]"]


def test_one_unreadable_detail_does_not_spoil_the_others() -> None:
    broken = any_pb2.Any(
        type_url="type.googleapis.com/google.rpc.BadRequest", value=b"\xff\xff\xff"
    )
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromMilliseconds(250)
    packed_retry = any_pb2.Any()
    packed_retry.Pack(retry)
    status = status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED, message="full", details=[broken, packed_retry]
    )
    trailers = (("grpc-status-details-bin", status.SerializeToString()),)
    error = from_rpc_error(
        FakeRpcError(_Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", trailers))
    )
    assert type(error) is perito.ResourceExhaustedError
    assert error.retry_after == pytest.approx(0.25)


class _BrokenCall(grpc.RpcError):
    """An RpcError whose accessors fail or answer nonsense."""

    def code(self) -> Any:
        return "not a StatusCode"

    def details(self) -> str:
        raise RuntimeError("no details")

    def trailing_metadata(self) -> Any:
        raise RuntimeError("no trailers")


@pytest.mark.parametrize("raised", [grpc.RpcError("bare"), _BrokenCall()], ids=["bare", "broken"])
def test_an_rpc_error_without_a_call_becomes_unknown(raised: grpc.RpcError) -> None:
    error = from_rpc_error(raised)
    assert type(error) is perito.PeritoError
    assert error.code is grpc.StatusCode.UNKNOWN
    assert error.message == "UNKNOWN"
