"""Errors with a transport-neutral status code.

Every error that can reach a user carries an `ErrorCode`; the server maps codes to gRPC status
codes in one place (`perito_server.errors`), bulk jobs record the message per item.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    """The status a caller sees; names follow `google.rpc.Code`."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"


class PeritoError(Exception):
    """Base of every error Perito raises on purpose.

    Args:
        message: what went wrong, written for the person reading it.
        reason: a stable UPPER_SNAKE identifier for programs (`google.rpc.ErrorInfo.reason`).
        field: the request field at fault, for example `images[3]`.
        retry_after: seconds after which a retry may succeed.
        violations: (field, description) pairs when several fields are at fault.
    """

    code: ErrorCode = ErrorCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        retry_after: float | None = None,
        violations: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.field = field
        self.retry_after = retry_after
        self.violations = violations or ([(field, message)] if field else [])


class InvalidArgument(PeritoError):
    code = ErrorCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class InvalidImage(InvalidArgument):
    """An image that cannot be classified; `reason` says which check it failed."""

    default_reason = "INVALID_IMAGE"


class NotFound(PeritoError):
    code = ErrorCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(PeritoError):
    code = ErrorCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(PeritoError):
    """The request is well-formed but the system is not in a state to run it (for example,
    an output location that cannot be written)."""

    code = ErrorCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class ArtifactIntegrityError(PeritoError):
    """A model file whose sha256 differs from its manifest: it is never loaded."""

    code = ErrorCode.FAILED_PRECONDITION
    default_reason = "MODEL_CHECKSUM_MISMATCH"


class ModelLoadError(PeritoError):
    """A model artifact that does not load or does not honour the artifact contract."""

    code = ErrorCode.FAILED_PRECONDITION
    default_reason = "MODEL_LOAD_FAILED"


class StorageUnavailable(PeritoError):
    """The registry or object store cannot be reached; retrying later may work."""

    code = ErrorCode.UNAVAILABLE
    default_reason = "STORAGE_UNAVAILABLE"


class PermissionDenied(PeritoError):
    """The caller is known but may not do this: a role it lacks, a model outside its list,
    a storage location outside its prefixes (`field` names the request field)."""

    code = ErrorCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(PeritoError):
    """No credentials, or credentials nobody issued."""

    code = ErrorCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class QuotaExceeded(PeritoError):
    """A tenant's quota is used up; `retry_after` says when it may not be (none when waiting
    cannot help, as for a job over the tenant's items-per-job quota)."""

    code = ErrorCode.RESOURCE_EXHAUSTED
    default_reason = "QUOTA_EXCEEDED"


class QueueFull(PeritoError):
    code = ErrorCode.RESOURCE_EXHAUSTED
    default_reason = "QUEUE_FULL"


class DeadlineExceeded(PeritoError):
    code = ErrorCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class ShuttingDown(PeritoError):
    code = ErrorCode.UNAVAILABLE
    default_reason = "SHUTTING_DOWN"
