"""The edge both HTTP doors share (OIP REST, the JSON API): request id, auth, errors, bodies.

Not a door itself: `HttpEdge.door` wraps each route's handler so that it runs as the tenant
the `Authorization: Bearer <token>` header names, checked by the gRPC interceptor's own code
(`TenantInterceptor.authorize`, with the gRPC method the route stands for) before the body is
read, with the model in the path checked against the tenant's list, and within the tenant's
share of the server's calls (`CallSlots`, which gRPC calls and HTTP requests hold alike; past
it, 429 QUOTA_CONCURRENT_CALLS with `Retry-After`). Errors are answered with
`errors.to_http` (the HTTP status of the gRPC code, from the one table every door uses, and
Google AIP-193's JSON error); OIP routes keep the protocol's `{"error": "<message>"}` string
(what OIP clients print) and add the AIP-193 `code`, `status` and `details` beside it. A body
over `max_message_bytes` is refused while it streams in, 413 RESOURCE_EXHAUSTED; one sent with
`Content-Encoding: gzip` or `deflate` is decoded as it streams, bounded by its decoded size, and
any other coding is 415 (`doors.content_coding`). JSON nested too deep to parse is 400.

Doors make their routes with `HttpEdge.route`, each with its `Operation`: what the OpenAPI
document (`GET /openapi.json`, built by `perito_server.openapi` from the app's routes) says of
it. The edge adds what it does itself: the path's `{model}` and `{version}`, the error body,
and no security for open routes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from starlette.applications import Starlette
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from perito_core.access.tenancy import Tenant
from perito_core.errors import ErrorCode, InvalidArgument, NotFound, PeritoError
from perito_core.logs import DOOR, REQUEST_ID
from perito_core.models.registry import ALIAS_PATTERN, NAME_PATTERN, VERSION_PATTERN
from perito_core.storage import echo_uri
from perito_server.auth import OPEN_CALLS, TenantInterceptor
from perito_server.doors.content_coding import ACCEPT_ENCODING, UnsupportedEncoding, body_decoder
from perito_server.errors import as_perito_error, echo, request_id, to_http
from perito_server.metrics import ServerMetrics
from perito_server.oip_protocol import server_version
from perito_server.openapi import Named, Operation, OperationRoute, Parameter, openapi_document

# The gRPC methods HTTP routes stand for, whose roles authorise them.
log = logging.getLogger(__name__)

# What an access log records for a request whose caller left before it was answered
# (nginx's 499); the caller never reads it.
CLIENT_CLOSED_REQUEST = 499
PERITO = "/perito.v1.Perito/"
OIP = "/inference.GRPCInferenceService/"

Handler = Callable[[Request, Tenant], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]

# The path parameters `model_ref` reads, as the registry names models, versions and aliases.
_NAME, _VERSION, _ALIAS = (p.pattern[1:-1] for p in (NAME_PATTERN, VERSION_PATTERN, ALIAS_PATTERN))
MODEL = Parameter(
    "model",
    "path",
    "The model's name; `name@version` (or `?version=`) picks a version or alias.",
    {"type": "string", "pattern": f"^{_NAME}(@({_VERSION}|{_ALIAS}))?$"},
)
VERSION = Parameter(
    "version",
    "path",
    "A version number or an alias (`production`).",
    {"type": "string", "pattern": f"^({_VERSION}|{_ALIAS})$"},
)

# The error bodies `error_response` writes: Google AIP-193's, and for OIP the protocol's
# `{"error": "<message>"}` with the same fields beside it.
_STATUS_FIELDS = {
    "code": {"type": "integer"},
    "status": {"type": "string"},
    "details": {
        "type": "array",
        "items": {"type": "object", "properties": {"@type": {"type": "string"}}},
    },
}
ERROR = Named(
    "Error",
    {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "status"],
                "properties": {"message": {"type": "string"}, **_STATUS_FIELDS},
            }
        },
    },
)
OIP_ERROR = Named(
    "OipError",
    {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}, **_STATUS_FIELDS},
    },
)


class BodyTooLarge(PeritoError, code=ErrorCode.RESOURCE_EXHAUSTED, reason="REQUEST_TOO_LARGE"):
    """A request body over the server's bound (answered 413)."""


class BodyStalled(PeritoError, code=ErrorCode.DEADLINE_EXCEEDED, reason="BODY_STALLED"):
    """A request body that did not arrive whole in time (answered 408)."""


class MethodNotAllowed(PeritoError, code=ErrorCode.INVALID_ARGUMENT, reason="METHOD_NOT_ALLOWED"):
    """A method the path does not serve (answered 405, with `Allow` naming those it does)."""


# The HTTP status of the edge's own refusals, where it is not their gRPC code's.
EDGE_STATUS: dict[type[PeritoError], int] = {
    BodyTooLarge: 413,
    BodyStalled: 408,
    MethodNotAllowed: 405,
    UnsupportedEncoding: 415,
}


class SegmentConvertor(StringConvertor):
    """A path parameter (`{model}`, `{job}`): one segment without `:`, which begins a custom
    method (`/v1/jobs/{job}:cancel`, Google AIP-136), so `GET /v1/jobs/x:cancel` is that
    path's wrong method (405), not the job `x:cancel`."""

    regex = "[^/:]+"


register_url_convertor("segment", SegmentConvertor())
_PARAMETER = re.compile(r"{(\w+)}")


class HttpEdge:
    """What every HTTP route goes through.

    Args:
        authorizer: the gRPC server's interceptor, whose `authorize` checks tokens and roles.
        metrics: the server's metrics (each call counted as `HTTP <method>`), or None.
        max_body_bytes: the largest body read (the gRPC `max_message_bytes`).
        body_arrival_s: the longest a body may take to arrive whole, in seconds (a gRPC
            call's message has as long: `request_arrival_s`), so that a request that stops
            sending holds neither its connection nor what it sent for long.
    """

    def __init__(
        self,
        authorizer: TenantInterceptor,
        metrics: ServerMetrics | None,
        max_body_bytes: int,
        body_arrival_s: float = 60.0,
    ) -> None:
        self.authorizer = authorizer
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_arrival_s = body_arrival_s

    def door(
        self, method: str | None, handler: Handler, *, model: bool = False, oip: bool = False
    ) -> Endpoint:
        """`handler` behind auth (for `method`'s role; None: open), the path's model checked,
        errors answered as JSON (`oip`: in the protocol's shape), the call counted in the
        metrics as `HTTP <method>`."""
        name = "HTTP " + (method.rpartition("/")[2] if method else handler.__name__.strip("_"))

        async def endpoint(request: Request) -> Response:
            started, code = time.perf_counter(), "OK"
            call_id = request_id(_utf8_header(request.headers.get("x-request-id", "")))
            REQUEST_ID.set(call_id)
            DOOR.set(name)
            try:
                tenant, slot = Tenant.unrestricted("anonymous"), OPEN_CALLS
                if method is not None:
                    metadata = [
                        ("authorization", request.headers.get("authorization", "")),
                        ("x-request-id", call_id),  # for the audit of a refused change
                    ]
                    tenant = self.authorizer.authorize(method, metadata)
                    slot = tenant.name
                    if model:
                        tenant.require_model(model_ref(request)[0])
                # The tenant's share of the server's calls, as a gRPC call holds, from before
                # its body is read until it is answered.
                with self.authorizer.slots.hold(slot):
                    response = await handler(request, tenant)
            except ClientDisconnect:  # the caller left mid-body: no one to answer, no fault
                code = "CANCELLED"
                log.info("%s: the caller left before its body arrived", name)
                response = Response(status_code=CLIENT_CLOSED_REQUEST)
            except Exception as exc:  # noqa: BLE001 - every error becomes an answer
                error = as_perito_error(exc, name)
                code = error.code.name
                response = error_response(error, oip)
            finally:
                if self.metrics is not None:
                    self.metrics.observe_call(name, code, time.perf_counter() - started)
            # The same bytes back (Starlette writes header values as Latin-1).
            response.headers["x-request-id"] = call_id.encode().decode("latin-1")
            return response

        return endpoint

    def route(
        self,
        verb: str,
        path: str,
        operation: Operation,
        method: str | None,
        handler: Handler,
        *,
        model: bool = False,
        oip: bool = False,
    ) -> OperationRoute:
        """The route for `verb path`: `handler` behind `door(method, handler, model=model,
        oip=oip)`, documented by `operation` with what the edge adds (the path's `{model}`
        and `{version}` with `model`, the error body, no security without `method` or on a
        server without tenants, where no call is refused 401). Each `{parameter}` of `path`
        is one segment without `:` (`SegmentConvertor`)."""
        edge_parameters = (MODEL, VERSION) if "{version}" in path else (MODEL,)
        open_ = method is None or not self.authorizer.tenants.requires_auth
        documented = replace(
            operation,
            parameters=(*(edge_parameters if model else ()), *operation.parameters),
            errors=" ".join(s for s in operation.errors.split() if not (open_ and s == "401")),
            open=open_,
            error=OIP_ERROR if oip else ERROR,
        )
        endpoint = self.door(method, handler, model=model, oip=oip)
        return OperationRoute(_PARAMETER.sub(r"{\1:segment}", path), endpoint, verb, documented)

    async def body(self, request: Request) -> bytes:
        """The body, decoded from its `Content-Encoding` (gzip or deflate, see
        `content_coding`), refused (413) once it grows past `max_body_bytes`, as sent or as
        decoded, while streaming: a compressed body is never inflated beyond the bound.

        Raises:
            BodyTooLarge: over the bound.
            BodyStalled: not whole within `body_arrival_s` (answered 408).
            UnsupportedEncoding: another `Content-Encoding` (answered 415).
            InvalidArgument: naming `body`, when it is not in its `Content-Encoding`.
        """
        limit = self.max_body_bytes
        decoder = body_decoder(request.headers.get("content-encoding", ""))
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"the body is {declared} bytes; the limit is {limit}")
        chunks, received, size = [], 0, 0
        try:
            async with asyncio.timeout(self.body_arrival_s):
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > limit:
                        raise BodyTooLarge(f"the body is over the limit of {limit} bytes")
                    if decoder is not None:
                        chunk = decoder.decode(chunk, limit - size)
                        if size + len(chunk) > limit:
                            raise BodyTooLarge(
                                f"the body decoded from {decoder.coding} is over the limit of "
                                f"{limit} bytes"
                            )
                    size += len(chunk)
                    chunks.append(chunk)
        except TimeoutError:
            raise BodyStalled(
                f"the body did not arrive whole within {self.body_arrival_s:g} s "
                f"({received:,} bytes came)"
            ) from None
        if decoder is not None:
            decoder.finish()
        return b"".join(chunks)

    async def json_body(self, request: Request) -> Any:
        """The body (`body`) parsed as JSON (`parse_json`).

        Raises:
            BodyTooLarge: over the bound.
            UnsupportedEncoding: a `Content-Encoding` not decoded here.
            InvalidArgument: naming `body`, when it is not JSON.
        """
        return parse_json(await self.body(request), "the body")


def parse_json(text: bytes, what: str) -> Any:
    """`text` parsed as JSON, `what` (for example "the body") naming it in a refusal.

    Raises:
        InvalidArgument: naming `body`, when it is not JSON, or nests arrays and objects
            deeper than the parser's stack (about a thousand levels).
    """
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"{what} is not JSON: {error}", field="body") from None
    except RecursionError:
        raise InvalidArgument(
            f"{what} nests arrays or objects too deep to parse", field="body"
        ) from None


# The largest integer a request's JSON may hold: no field of either HTTP door takes more than
# 64 bits (Triton's `timeout` is a uint64 of microseconds; a float field's value as an integer
# this large is already meaningless), and Python would otherwise carry it to a float and fail.
MAX_JSON_INTEGER = 2**64 - 1


def check_json_values(value: Any, path: str = "") -> None:
    """Refuse a parsed JSON request's value that no field can hold: a string (a key or a
    value) with an unpaired UTF-16 surrogate, which JSON's `\\u` escapes can write (RFC 8259
    section 8.2: not Unicode text, so not UTF-8, as a proto string must be), or an integer
    beyond `MAX_JSON_INTEGER` in size.

    Args:
        value: the document, or the part of it to check (leave out large tensors' data,
            which their own checks read).
        path: where `value` is in the body, for the field named (`images[0].id`).

    Raises:
        InvalidArgument: naming the field (`prefix`, `uris.uris[1]`, `parameters.timeout`).
    """
    found = _unfit(value, path)
    if found is not None:
        field, why = found
        raise InvalidArgument(f"{field or 'body'} {why}", field=field or "body")


def _unfit(value: Any, path: str) -> tuple[str, str] | None:
    """(path, why) of the first value in `value` that `check_json_values` refuses."""
    if isinstance(value, str):
        return (path, _SURROGATE) if _has_surrogate(value) else None
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) <= MAX_JSON_INTEGER:
            return None
        digits = len(str(abs(value)))
        return path, f"is an integer of {digits} digits, beyond the 64 bits any field takes"
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _unfit(item, f"{path}[{index}]")
            if found is not None:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            if _has_surrogate(key):
                return path, "has a key that " + _SURROGATE.removeprefix("is not Unicode text: it ")
            name = echo(key)
            found = _unfit(item, f"{path}.{name}" if path else name)
            if found is not None:
                return found
    return None


_SURROGATE = (
    "is not Unicode text: it holds an unpaired UTF-16 surrogate (a \\u escape from \\ud800 "
    "to \\udfff without its pair), which RFC 8259 leaves undefined and no string field takes"
)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def error_response(error: PeritoError, oip: bool) -> Response:
    """`error` as a JSON response: AIP-193's body, or for OIP the protocol's with it beside."""
    status, body, headers = to_http(error)
    if type(error) in EDGE_STATUS:
        status = EDGE_STATUS[type(error)]
        body["error"]["code"] = status
    if isinstance(error, UnsupportedEncoding):  # RFC 7694: the codings a body may be sent in
        headers["Accept-Encoding"] = ACCEPT_ENCODING
    if oip:  # the protocol's {"error": "<message>"}, the AIP-193 fields beside it
        body = {**body["error"], "error": body["error"]["message"]}
        body.pop("message")
    return JSONResponse(body, status, headers=headers)


def model_ref(request: Request) -> tuple[str, str]:
    """(model, version) of the path: `/versions/{v}`, `name@version`, or `?version=`."""
    name: str = request.path_params["model"]
    version: str | None = request.path_params.get("version")
    if version is None:
        name, _, version = name.partition("@")
        version = version or request.query_params.get("version", "")
    return name, version


DOCUMENT = Operation(
    "openapi",
    "This document: the OpenAPI 3.0 description of every route",
    "Document",
    Named("OpenApi", {"type": "object", "required": ["openapi", "paths"]}),
    open=True,
)


def _other_methods(path: str, methods: set[str]) -> Route:
    """The route that answers every method of `path` its operations do not: `OPTIONS` 204
    and any other 405, each with `Allow` naming the methods `path` serves (with `HEAD`
    where it serves `GET`, and `OPTIONS`)."""
    served = methods | {"OPTIONS"} | ({"HEAD"} if "GET" in methods else set())
    allow = ", ".join(sorted(served))
    oip = path.startswith("/v2")

    async def other(scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method == "OPTIONS":
            response = Response(status_code=204, headers={"Allow": allow})
        else:
            refusal = MethodNotAllowed(f"{method[:16]} is not served here; Allow: {allow}")
            response = error_response(refusal, oip)
            response.headers["Allow"] = allow
        await response(scope, receive, send)

    # An ASGI app, not a handler: Starlette then matches it for every method (a handler's
    # route takes GET alone), those the routes before it take never reaching it.
    return Route(path, _Asgi(other))


class _Asgi:
    """An ASGI callable that is not a function (Starlette routes those to every method)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _utf8_header(value: str) -> str:
    """A header value as its sender wrote it: Starlette decodes header bytes as Latin-1 (RFC
    9110's historical charset), while clients send UTF-8 (`café-1`, not `cafÃ©-1`); bytes
    that are not UTF-8 become U+FFFD."""
    return value.encode("latin-1").decode("utf-8", errors="replace")


async def _not_found(request: Request, exc: Exception) -> Response:
    """No route's path matches: NOT_FOUND as JSON, like every other refusal."""
    if not isinstance(exc, HTTPException) or exc.status_code != 404:
        raise exc
    error = NotFound(f"no resource at {echo_uri(request.url.path)}")
    return error_response(error, request.url.path.startswith("/v2"))


def http_app(*doors: list[BaseRoute]) -> Starlette:
    """One Starlette app serving the routes of `doors` and `GET /openapi.json`, which
    describes them (built here, once). Each path answers `OPTIONS` and refuses a method it
    does not serve with 405, both naming in `Allow` the methods it serves; an unknown path
    is 404 NOT_FOUND as JSON.

    Raises:
        TypeError: a route not made by `HttpEdge.route` (no OpenAPI operation).
        ValueError: an operation the document cannot hold (`openapi_document`).
    """
    document: dict[str, Any] = {}

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    routes: list[BaseRoute] = [OperationRoute("/openapi.json", openapi, "GET", DOCUMENT)]
    for door_routes in doors:
        routes.extend(door_routes)
    document.update(openapi_document(routes, server_version()))
    methods: dict[str, set[str]] = {}
    for route in routes:
        assert isinstance(route, OperationRoute)  # openapi_document refused any other
        methods.setdefault(route.path, set()).add(route.method)
    routes.extend(_other_methods(path, served) for path, served in methods.items())
    app = Starlette(routes=routes, exception_handlers={404: _not_found})
    # A path with a trailing slash is an unknown path (the JSON 404), not a redirect built
    # from the caller's Host header (Starlette's default).
    app.router.redirect_slashes = False
    return app
