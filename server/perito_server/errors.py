"""The one place where errors become gRPC statuses, with `google.rpc` details.

`ErrorInfo` carries the machine-readable reason, `BadRequest` names the fields at fault
(`images[3]`), `RetryInfo` says when to try again. Every call runs under `CallInterceptor`,
so handlers raise `PeritoError`s and never build statuses themselves.

A status travels in HTTP/2 trailers: `grpc-message` (the message, percent-encoded) and
`grpc-status-details-bin` (the `google.rpc.Status`, base64, holding the message again). gRPC
clients refuse trailers over 8 KiB by default (`grpc.max_metadata_size`: past it calls fail at
random, with RESOURCE_EXHAUSTED and the details dropped or disagreeing with the code; past the
hard limit, 16 KiB, every call fails "Stream removed"). So `to_status` keeps every status
within a budget whatever the error holds: the message cut to `MAX_MESSAGE_BYTES`, at most
`MAX_VIOLATIONS` violations (then one "... and K more"), each description cut, and the
whole serialized `Status` within `MAX_DETAILS_BYTES`; both trailers together stay under
`MAX_TRAILER_BYTES`, well below 8 KiB. Caller-supplied strings quoted in messages go through
`echo` first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2, json_format
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from perito.v1.vocabulary import HTTP_STATUS
from perito_core.errors import ECHO_CHARS as ECHO_CHARS
from perito_core.errors import ELLIPSIS, ErrorCode, PeritoError
from perito_core.errors import echo as echo
from perito_core.logs import DOOR, REQUEST_ID

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
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}


# The size budget of a status (see the module docstring). UTF-8 bytes, before encoding.
MAX_MESSAGE_BYTES = 400  # the status message (sent twice: grpc-message and in the Status)
MAX_VIOLATIONS = 16  # BadRequest violations sent as they are; the rest become one summary
MAX_FIELD_BYTES = 128  # a violation's field path
MAX_DESCRIPTION_BYTES = 256  # a violation's description
MAX_REASON_BYTES = 63  # ErrorInfo.reason, as google.rpc allows
MAX_DETAILS_BYTES = 2560  # the serialized google.rpc.Status, details and all
# Both trailers as sent: grpc-message percent-encoded (3 bytes per non-ASCII byte at worst),
# grpc-status-details-bin in base64 (4 per 3), plus names and grpc-status.
MAX_TRAILER_BYTES = 3 * MAX_MESSAGE_BYTES + 4 * -(-MAX_DETAILS_BYTES // 3) + 128


def clip_utf8(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` UTF-8 bytes, ending in '…' when cut."""
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= max_bytes:
        return encoded.decode("utf-8")
    room = max_bytes - len(ELLIPSIS.encode())
    return encoded[:room].decode("utf-8", "ignore") + ELLIPSIS


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _summary(omitted: Sequence[tuple[str, str]]) -> error_details_pb2.BadRequest.FieldViolation:
    """One violation standing for the `omitted` ones: their count and first and last field."""
    first, last = omitted[0][0], omitted[-1][0]
    bases = {field.partition("[")[0].partition(".")[0] for field, _ in omitted}
    span = f" ({first} to {last})" if len(omitted) > 1 else f" ({first})"
    return error_details_pb2.BadRequest.FieldViolation(
        field=clip_utf8(bases.pop() if len(bases) == 1 else "", MAX_FIELD_BYTES),
        description=clip_utf8(f"... and {len(omitted)} more{span}", MAX_DESCRIPTION_BYTES),
    )


def _bounded_violations(
    violations: Sequence[tuple[str, str]], room: int, reasons: Mapping[str, str]
) -> error_details_pb2.BadRequest:
    """The first violations (at most `MAX_VIOLATIONS`, and as many as fit in `room`
    serialized bytes), each with its own reason where `reasons` names one, then one
    summarising the rest."""
    kept = [
        error_details_pb2.BadRequest.FieldViolation(
            field=clip_utf8(field, MAX_FIELD_BYTES),
            description=clip_utf8(description, MAX_DESCRIPTION_BYTES),
            reason=clip_utf8(reasons.get(field, ""), MAX_REASON_BYTES),
        )
        for field, description in violations[:MAX_VIOLATIONS]
    ]
    while True:
        omitted = violations[len(kept) :]
        summary = [_summary(omitted)] if omitted else []
        bad = error_details_pb2.BadRequest(field_violations=[*kept, *summary])
        if not kept or _packed_size(bad) <= room:
            return bad
        kept.pop()


def _packed_size(message: Message) -> int:
    """Bytes `message` adds to a Status's details: packed in an Any, tagged and sized."""
    size = _pack(message).ByteSize()
    return size + 1 + (size.bit_length() + 6) // 7


def trailer_bytes(status: grpc.Status) -> int:
    """Bytes `status` takes in HTTP/2 trailers as gRPC sends them (names, encoded values)."""
    message = status.details.encode("utf-8")
    # grpc-message: percent-encoding keeps printable ASCII except '%' (gRPC's HTTP/2 spec).
    encoded = sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in message)
    total = len("grpc-status") + 2 + len("grpc-message") + encoded
    for key, value in status.trailing_metadata:
        raw = value if isinstance(value, bytes) else value.encode()
        total += len(key) + (len(base64.b64encode(raw)) if key.endswith("-bin") else len(raw))
    return total


def to_status(error: PeritoError) -> grpc.Status:
    """The rich gRPC status for `error`, within the size budget (see the module docstring).

    The message and each violation are cut to their budgets, violations beyond
    `MAX_VIOLATIONS` (or beyond `MAX_DETAILS_BYTES`) are summarised in one last violation,
    and the `Status` proto carries the same code and message as the call, so a client's
    `rpc_status.from_call` accepts it.
    """
    code = GRPC_CODES[error.code]
    message = clip_utf8(error.message or code.name, MAX_MESSAGE_BYTES)
    info = error_details_pb2.ErrorInfo(
        reason=clip_utf8(error.reason, MAX_REASON_BYTES), domain=DOMAIN
    )
    details = [_pack(info)]
    if error.retry_after is not None and math.isfinite(error.retry_after):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max(error.retry_after, 0.0) * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    if error.violations:
        bad = _bounded_violations(
            error.violations, MAX_DETAILS_BYTES - status.ByteSize(), error.violation_reasons
        )
        status = status_pb2.Status(
            code=status.code, message=message, details=[details[0], _pack(bad), *details[1:]]
        )
    return rpc_status.to_status(status)


class CallEnded(Exception):
    """The transport ended the call before its handler could answer: gRPC itself refused
    the request message (over the server's message size: RESOURCE_EXHAUSTED to the caller)
    or the connection is gone. `error` is what the handler would have answered; the call's
    observer counts it, and nothing more is sent or logged."""

    def __init__(self, error: PeritoError) -> None:
        super().__init__(error.message)
        self.error = error


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: PeritoError) -> NoReturn:
    """End the call with `error`'s rich status.

    Raises:
        grpc.aio.AbortError: always, once the status is sent (gRPC's own way out).
        CallEnded: the transport had ended the call already (no status can be sent).
    """
    status = to_status(error)
    try:
        await context.abort(status.code, status.details, status.trailing_metadata)
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        # grpc's cython layer fails the status batch of a call its core has finished.
        if type(exc).__name__ != "ExecuteBatchError":
            raise
        raise CallEnded(error) from None


async def _abort_for(
    context: grpc.aio.ServicerContext[Any, Any], exc: Exception, handler: str
) -> NoReturn:
    """A `PeritoError` keeps its code and message; anything else is logged and becomes
    INTERNAL (never UNKNOWN with a Python repr); an abort already under way goes on."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    await abort(context, as_perito_error(exc, handler))


Observer = Callable[[str, str, float], None]
# What a grpc.aio server interceptor is handed: the next step, answering a call's handler.
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any]"]]
# Not counted or wrapped: probes and tooling, answered by grpc's own servicers.
UNOBSERVED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class CallInterceptor(_Interceptor):
    """Every call's request id, error mapping and metrics, for every service, in one place.

    It must be the outermost interceptor, so that it also sees the calls the inner ones
    refuse (`perito_server.auth`: no token, a role missing). For each call it:

    - sets `REQUEST_ID` (logs) from the caller's `x-request-id`, or a new one;
    - turns what the handler raises into a status (`_abort_for`): a `PeritoError` keeps its
      code, message and details, anything else is logged and becomes INTERNAL;
    - reports `(method, status code name, seconds)` to `observe` once the call has ended,
      whatever ended it (an abort's code is read from the context).

    Handlers therefore only raise `PeritoError`s; none builds a status or counts itself.

    Args:
        observe: called with the method's short name (`Classify`, `ModelInfer`), the status
            code's name (`OK`, `NOT_FOUND`) and the call's duration in seconds; None: no metrics.
    """

    def __init__(self, observe: Observer | None = None) -> None:
        self.observe = observe

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        full_method: str = handler_call_details.method
        if handler is None or full_method.startswith(UNOBSERVED_PREFIXES):
            return handler
        method = full_method.rpartition("/")[2]
        metadata = handler_call_details.invocation_metadata
        return _observed(handler, method, metadata, self.observe)


def _observed(
    handler: grpc.RpcMethodHandler[Any, Any],
    method: str,
    metadata: Any,
    observe: Observer | None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler`, any of the four kinds, run under `CallInterceptor`'s rules."""

    # grpc's stubs type these as the sync API's; on a grpc.aio server they are coroutines
    # (unary) and async generators (stream).
    inner_unary: Any = handler.unary_unary or handler.stream_unary
    inner_stream: Any = handler.unary_stream or handler.stream_stream

    @contextlib.asynccontextmanager
    async def call(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        REQUEST_ID.set(request_id(metadata_value(metadata, "x-request-id")))
        DOOR.set(method)
        started, code = time.perf_counter(), "OK"
        try:
            yield
        except asyncio.CancelledError:  # the caller left, or the server is stopping
            code = "CANCELLED"
            raise
        except CallEnded as ended:  # gRPC answered the caller itself; the handler ends here
            code = ended.error.code.name
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            code = _code_of(exc)
            with contextlib.suppress(CallEnded):  # no status can be sent: nothing to say
                await _abort_for(context, exc, method)
        finally:
            if observe is not None:
                if code == "ABORTED_BY_HANDLER":  # the status was set by `abort`: read it
                    status = context.code()
                    code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
                observe(method, code, time.perf_counter() - started)

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async with call(context):
            return await inner_unary(request, context)

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async with call(context):
            async for message in inner_stream(request, context):
                yield message

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream, **kwargs)


def request_id(given: str) -> str:
    """The id a call is logged under: the caller's `x-request-id` cut to 128 characters, or
    a new one when it sent none (every door: gRPC here, HTTP in
    `perito_server.doors.http_edge`)."""
    return given[:128] or uuid.uuid4().hex[:16]


def metadata_value(metadata: Any, key: str) -> str:
    """The first string value of `key` in a call's metadata (pairs), or ""."""
    for name, value in metadata or ():
        if name == key and isinstance(value, str):
            return value
    return ""


def _code_of(exc: Exception) -> str:
    if isinstance(exc, PeritoError):
        return exc.code.name
    return "ABORTED_BY_HANDLER" if isinstance(exc, grpc.aio.AbortError) else "INTERNAL"


def to_http(error: PeritoError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """`error` as an HTTP answer: status, body and headers, from the same status as gRPC's.

    The body is Google AIP-193's JSON error, `{"error": {"code": 404, "message": ...,
    "status": "NOT_FOUND", "details": [...]}}`, the details being the `google.rpc` messages
    of `to_status` (ErrorInfo, BadRequest, RetryInfo) in their JSON mapping with `@type`,
    within the same size budget. A retry hint is also `Retry-After` (whole seconds, RFC 9110).
    """
    code = GRPC_CODES[error.code]
    status = rpc_status_of(error)
    details = [
        json_format.MessageToDict(detail, preserving_proto_field_name=False)
        for detail in status.details
    ]
    body = {
        "error": {
            "code": HTTP_STATUS[code.name],
            "message": status.message,
            "status": code.name,
            "details": details,
        }
    }
    headers = {}
    if error.retry_after is not None and math.isfinite(error.retry_after):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return HTTP_STATUS[code.name], body, headers


def rpc_status_of(error: PeritoError) -> status_pb2.Status:
    """The `google.rpc.Status` that `to_status` sends for `error`, as a message."""
    for key, value in to_status(error).trailing_metadata:
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("to_status always sends details")  # pragma: no cover


def as_perito_error(exc: BaseException, where: str) -> PeritoError:
    """`exc` as a `PeritoError`, for every door: itself, or else an INTERNAL error whose
    message names only the call's request id: the exception's text (a path, a host, another
    tenant's name, the server's code) is not the caller's to read; it is logged, with its
    traceback, under that request id, where the operator finds it."""
    if isinstance(exc, PeritoError):
        return exc
    call = REQUEST_ID.get()
    # The id in the text too: the text log format has no field for it.
    log.error("%s failed (request id %s)", where, call, exc_info=exc)
    return PeritoError(
        f"internal error (request id {call}): the server's log has its cause"
        if call
        else "internal error: the server's log has its cause"
    )
