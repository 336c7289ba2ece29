"""The SDK's exceptions, one per gRPC status a caller handles differently."""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class PeritoError(Exception):
    """Base of every error the SDK raises.

    Attributes:
        code: the gRPC status code.
        reason: the server's machine-readable reason (`google.rpc.ErrorInfo`), e.g. QUEUE_FULL.
        violations: the request fields at fault (`google.rpc.BadRequest`), e.g. `images[2]`.
        retry_after: seconds the server asked the caller to wait (`google.rpc.RetryInfo`).
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        violations: tuple[FieldViolation, ...] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.violations = violations
        self.retry_after = retry_after


class InvalidArgumentError(PeritoError):
    """A bad request or a bad image; `violations` names which."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(PeritoError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(PeritoError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(PeritoError):
    """The request cannot run as things stand, e.g. a model artifact fails its checksum."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(PeritoError):
    """The server is saturated or the message too large; retry after `retry_after`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(PeritoError):
    """The server, its storage or its broker cannot be reached; retrying may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(PeritoError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnimplementedError(PeritoError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(PeritoError):
    code = grpc.StatusCode.INTERNAL


class UnauthenticatedError(PeritoError):
    """No token, or one the server does not accept: pass `token=` to the client."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(PeritoError):
    code = grpc.StatusCode.PERMISSION_DENIED


class CancelledError(PeritoError):
    """The call was cancelled (by the caller, or the server shutting down)."""

    code = grpc.StatusCode.CANCELLED


_BY_CODE: dict[grpc.StatusCode, type[PeritoError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        UnimplementedError,
        InternalError,
        UnauthenticatedError,
        PermissionDeniedError,
        CancelledError,
    )
}


def from_rpc_error(error: grpc.RpcError) -> PeritoError:
    """Translate a `grpc.RpcError` (sync or aio) into the matching `PeritoError`."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    code: grpc.StatusCode = error.code()
    message: str = error.details() or code.name
    reason = ""
    violations: list[FieldViolation] = []
    retry_after = None
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    cls = _BY_CODE.get(code, PeritoError)
    result = cls(message, reason=reason, violations=tuple(violations), retry_after=retry_after)
    if cls is PeritoError:
        result.code = code
    return result
