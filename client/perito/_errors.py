"""The SDK's exceptions, one per gRPC status a caller handles differently."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from google.rpc import status_pb2


@dataclass(frozen=True)
class FieldViolation:
    """A request field at fault (`google.rpc.BadRequest.FieldViolation`): `images[3]`, what
    is wrong with it, and its own machine-readable reason where the server gives one
    (`TRUNCATED` for one image, `NOT_AN_IMAGE` for another in the same call)."""

    field: str
    description: str
    reason: str = ""


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


GRPC_DETAILS_KEY = "grpc-status-details-bin"


def from_rpc_error(error: grpc.RpcError) -> PeritoError:
    """Translate a `grpc.RpcError` (sync or aio) into the matching `PeritoError`.

    The code and message come from the call; the reason, violations and retry hint from its
    rich status (`google.rpc.Status` in the `grpc-status-details-bin` trailer) when that
    parses and carries the same code. Never raises: a status that cannot be read, or one
    that disagrees with the call's code (trailers damaged or cut in transit), is ignored and
    the error keeps the code and message alone.

    Args:
        error: what a failed gRPC call raised.

    Returns:
        The `PeritoError` subclass for the call's status code (`PeritoError` itself, with
        `code` set, for codes without one).
    """
    code = _call_code(error)
    message = _call_message(error) or code.name
    reason, violations, retry_after = _rich_details(error, code)
    cls = _BY_CODE.get(code, PeritoError)
    result = cls(message, reason=reason, violations=violations, retry_after=retry_after)
    if cls is PeritoError:
        result.code = code
    return result


# What grpcio raises is both an `RpcError` and a `grpc.Call`; a bare `RpcError` is neither
# (hence `Any`, and every read guarded).


def _call_code(error: grpc.RpcError) -> grpc.StatusCode:
    call: Any = error
    try:
        code = call.code()
    except Exception:  # noqa: BLE001 - a bare RpcError, or a call in a strange state
        return grpc.StatusCode.UNKNOWN
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _call_message(error: grpc.RpcError) -> str:
    call: Any = error
    try:
        details = call.details()
    except Exception:  # noqa: BLE001 - as in _call_code
        return ""
    if isinstance(details, bytes):
        return details.decode("utf-8", "replace")
    return details if isinstance(details, str) else ""


def _rich_status(error: grpc.RpcError, code: grpc.StatusCode) -> status_pb2.Status | None:
    """The call's `google.rpc.Status`, or None when absent, unreadable or about another code."""
    from google.rpc import status_pb2

    call: Any = error
    try:
        trailers = call.trailing_metadata() or ()
        raw = next((value for key, value in trailers if key == GRPC_DETAILS_KEY), None)
        if not isinstance(raw, bytes):
            return None
        status = status_pb2.Status.FromString(raw)
    except Exception:  # noqa: BLE001 - damaged trailers are no reason to lose the error
        return None
    # A mismatch means the status was replaced in transit (e.g. trailers over the client's
    # metadata limit become RESOURCE_EXHAUSTED): these details describe another error.
    return status if status.code == code.value[0] else None


def _rich_details(
    error: grpc.RpcError, code: grpc.StatusCode
) -> tuple[str, tuple[FieldViolation, ...], float | None]:
    """(reason, violations, retry_after) from the call's rich status; empty when it has none."""
    from google.rpc import error_details_pb2

    reason = ""
    violations: list[FieldViolation] = []
    retry_after = None
    status = _rich_status(error, code)
    for detail in status.details if status is not None else ():
        try:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [
                    FieldViolation(v.field, v.description, v.reason) for v in bad.field_violations
                ]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = max(0.0, retry.retry_delay.ToNanoseconds() / 1e9)
        except Exception:  # noqa: BLE001 - one unreadable detail does not spoil the others
            continue
    return reason, tuple(violations), retry_after
