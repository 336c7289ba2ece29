"""Errors with a transport-neutral status code.

Every error that can reach a user carries an `ErrorCode`; the server maps codes to gRPC status
codes in one place (`perito_server.errors`), bulk jobs record the message per item.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping

# A caller-supplied string (an image id, a model name) quoted in a message keeps this many
# characters by default (`echo`).
ECHO_CHARS = 64
ELLIPSIS = "…"


def echo(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` as quoted back to its sender: its first `limit` characters, then '…' if cut."""
    return text if len(text) <= limit else text[:limit] + ELLIPSIS


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
        violation_reasons: field -> the reason of that field's violation, where fields fail
            for different reasons (`images[3]` TRUNCATED, `images[5]` NOT_AN_IMAGE:
            `google.rpc.BadRequest.FieldViolation.reason`); unnamed ones have `reason`.
    """

    code: ErrorCode = ErrorCode.INTERNAL
    default_reason = "INTERNAL"

    def __init_subclass__(
        cls, *, code: ErrorCode | None = None, reason: str | None = None, **kwargs: object
    ) -> None:
        """`class X(PeritoError, code=ErrorCode.NOT_FOUND, reason="NO_MODEL")`: the status a
        caller sees and the default `reason` (the code's name unless given); both inherited
        when not given."""
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
            cls.default_reason = code.name
        if reason is not None:
            cls.default_reason = reason

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        retry_after: float | None = None,
        violations: list[tuple[str, str]] | None = None,
        violation_reasons: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.field = field
        self.retry_after = retry_after
        self.violations = violations or ([(field, message)] if field else [])
        self.violation_reasons = dict(violation_reasons or {})


class InvalidArgument(PeritoError, code=ErrorCode.INVALID_ARGUMENT):
    """A request field the server cannot accept; `field` names it."""


class InvalidImage(InvalidArgument, reason="INVALID_IMAGE"):
    """An image that cannot be classified; `reason` says which check it failed."""


class NotFound(PeritoError, code=ErrorCode.NOT_FOUND):
    """No such model, version, alias, job or object (or none the caller may see)."""


class AlreadyExists(PeritoError, code=ErrorCode.ALREADY_EXISTS):
    """The name or version is taken: published versions are immutable."""


class FailedPrecondition(PeritoError, code=ErrorCode.FAILED_PRECONDITION):
    """The request is well-formed but the system is not in a state to run it (for example,
    an output location that cannot be written)."""


class ArtifactIntegrityError(
    PeritoError, code=ErrorCode.FAILED_PRECONDITION, reason="MODEL_CHECKSUM_MISMATCH"
):
    """A model file whose sha256 differs from its manifest: it is never loaded."""


class ModelLoadError(PeritoError, code=ErrorCode.FAILED_PRECONDITION, reason="MODEL_LOAD_FAILED"):
    """A model artifact that does not load or does not honour the artifact contract."""


class StorageUnavailable(PeritoError, code=ErrorCode.UNAVAILABLE, reason="STORAGE_UNAVAILABLE"):
    """The registry or object store cannot be reached; retrying later may work."""


class PermissionDenied(PeritoError, code=ErrorCode.PERMISSION_DENIED):
    """The caller is known but may not do this: a role it lacks, a model outside its list,
    a storage location outside its prefixes (`field` names the request field)."""


class Unauthenticated(PeritoError, code=ErrorCode.UNAUTHENTICATED):
    """No credentials, or credentials nobody issued."""


class QuotaExceeded(PeritoError, code=ErrorCode.RESOURCE_EXHAUSTED, reason="QUOTA_EXCEEDED"):
    """A tenant's quota is used up; `retry_after` says when it may not be (none when waiting
    cannot help, as for a job over the tenant's items-per-job quota)."""


class QueueFull(PeritoError, code=ErrorCode.RESOURCE_EXHAUSTED, reason="QUEUE_FULL"):
    """The batcher has no room; `retry_after` says when to try again."""


class DeadlineExceeded(PeritoError, code=ErrorCode.DEADLINE_EXCEEDED):
    """The caller's deadline passed before the answer was ready."""


class ShuttingDown(PeritoError, code=ErrorCode.UNAVAILABLE, reason="SHUTTING_DOWN"):
    """The process is draining for a restart: another replica can answer."""


def describe_exception(error: BaseException, limit: int = 300) -> str:
    """One line saying what `error` was, at most `limit` characters. TorchScript wraps an
    error raised inside a module in its own traceback, whose last line is the real one
    (`RuntimeError: ...`): that line is kept."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and re.match(r"^[A-Za-z_.]+(Error|Exception): ", lines[-1]):
        return lines[-1][:limit]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:limit]
