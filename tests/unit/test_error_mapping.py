"""Errors become rich gRPC statuses on the server and typed exceptions in the SDK."""

from __future__ import annotations

import grpc
import pytest

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
    if code is grpc.StatusCode.OK:
        return
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
