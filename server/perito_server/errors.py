"""The one place where errors become gRPC statuses, with `google.rpc` details.

`ErrorInfo` carries the machine-readable reason, `BadRequest` names the fields at fault
(`images[3]`), `RetryInfo` says when to try again. Handlers are wrapped in `maps_errors`, so
they raise `PeritoError`s and never build statuses themselves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from perito_core.errors import ErrorCode, PeritoError
from perito_core.logs import REQUEST_ID

log = logging.getLogger(__name__)

DOMAIN = "perito.dev"

GRPC_CODES: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(error: PeritoError) -> grpc.Status:
    """The rich gRPC status for `error`."""
    code = GRPC_CODES[error.code]
    details = [_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN))]
    if error.violations:
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in error.violations
        ]
        details.append(_pack(error_details_pb2.BadRequest(field_violations=violations)))
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=error.message, details=details
    )
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: PeritoError) -> NoReturn:
    """End the call with `error`'s rich status."""
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


async def _abort_for(
    context: grpc.aio.ServicerContext[Any, Any], exc: Exception, handler: str
) -> NoReturn:
    """A `PeritoError` keeps its code and message; anything else is logged and becomes
    INTERNAL (never UNKNOWN with a Python repr); an abort already under way goes on."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, PeritoError):
        await abort(context, exc)
    log.exception("%s failed", handler)
    await abort(context, PeritoError(f"internal error: {type(exc).__name__}: {exc}"))


HandlerT = TypeVar("HandlerT", bound=Callable[..., Awaitable[Any]])


def maps_errors(handler: HandlerT) -> HandlerT:
    """Abort the call with the mapped status when `handler` raises (see `_abort_for`)."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started, code = time.perf_counter(), "OK"
        REQUEST_ID.set(_request_id(context))
        try:
            return await handler(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            code = _code_of(exc)
            await _abort_for(context, exc, handler.__name__)
        finally:
            _observe(self, handler.__name__, code, started)

    return wrapper  # type: ignore[return-value]


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's `x-request-id`, or a new one, for the logs of this call."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and value:
            return value[:128]
    return uuid.uuid4().hex[:16]


def _code_of(exc: Exception) -> str:
    if isinstance(exc, PeritoError):
        return exc.code.name
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "UNKNOWN" if isinstance(exc, grpc.aio.AbortError) else "INTERNAL"


def _observe(servicer: Any, method: str, code: str, started: float) -> None:
    """Count the call in the servicer's metrics, if it has any."""
    metrics = getattr(servicer, "metrics", None)
    if metrics is not None:
        metrics.observe_call(method, code, time.perf_counter() - started)


StreamT = TypeVar("StreamT", bound=Callable[..., AsyncIterator[Any]])


def maps_stream_errors(handler: StreamT) -> StreamT:
    """`maps_errors` for server-streaming handlers (async generators)."""

    @functools.wraps(handler)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        started, code = time.perf_counter(), "OK"
        REQUEST_ID.set(_request_id(context))
        try:
            async for message in handler(self, request, context):
                yield message
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            code = _code_of(exc)
            await _abort_for(context, exc, handler.__name__)
        finally:
            _observe(self, handler.__name__, code, started)

    return wrapper  # type: ignore[return-value]
