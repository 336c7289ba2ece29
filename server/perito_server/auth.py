"""Authentication and authorization of every `perito.v1` call, in one place.

Each call must carry `authorization: Bearer <token>`; the token names a tenant
(`perito_core.access.tenancy`). The interceptor runs on the call's metadata alone, before gRPC reads
the request message: a call with no token or an unknown one is UNAUTHENTICATED, one whose
tenant lacks the method's role is PERMISSION_DENIED, and for both the request body is never
read, whatever its size (the refusal is answered by a request-streaming handler that never
asks for a message). A call let through runs with its tenant in `current_tenant()`, and the
model it names (`model` of Classify, SubmitJob, GetModel) is checked against the tenant's
model list before the handler runs.

Every call also holds one of its tenant's share of the server's calls (`CallSlots`), from the
moment it arrives, and a unary call's message must arrive in time: a caller that opens calls
and sends nothing cannot take every call the server has.

Roles are verbs on resources (`METHOD_ROLES`), like Kubernetes RBAC rules: adding a method
means adding its line here, and a method missing from the table is refused to everyone.
Health checks and reflection stay open, so load balancers and probes need no secret. With
no tenants configured every call runs as the anonymous tenant (the server then listens on
loopback only: see `perito_server.app`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from perito_core.access.audit import AuditLog, AuditRecord
from perito_core.access.quotas import InProgress, RateLimiter
from perito_core.access.tenancy import Tenant, Tenants
from perito_core.errors import (
    DeadlineExceeded,
    InvalidArgument,
    PeritoError,
    PermissionDenied,
    QueueFull,
)
from perito_server.errors import Continuation, abort, metadata_value

OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    # Open Inference Protocol liveness and readiness: probes, like the health service.
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)
SERVICE_PREFIX = "/perito.v1.Perito/"
OIP_PREFIX = "/inference.GRPCInferenceService/"

# The role each method needs, by full gRPC method name.
METHOD_ROLES: dict[str, str] = {
    **{
        SERVICE_PREFIX + method: role
        for method, role in {
            "Classify": "classify",
            "SubmitJob": "jobs",
            "GetJob": "jobs",
            "WatchJob": "jobs",
            "ListJobs": "jobs",
            "ListJobResults": "jobs",
            "CancelJob": "jobs",
            "DeleteJob": "jobs",
            "ListModels": "models:read",
            "GetModel": "models:read",
        }.items()
    },
    # What a KServe v2 / Triton client needs to classify: metadata, readiness, inference.
    **{
        OIP_PREFIX + method: "classify"
        for method in ("ServerMetadata", "ModelMetadata", "ModelReady", "ModelInfer")
    },
}
# Methods whose request names a model, and the field that names it, checked against the
# tenant's list before the handler runs.
MODEL_FIELDS: dict[str, str] = {
    SERVICE_PREFIX + "Classify": "model",
    SERVICE_PREFIX + "SubmitJob": "model",
    SERVICE_PREFIX + "GetModel": "model",
    OIP_PREFIX + "ModelMetadata": "name",
    OIP_PREFIX + "ModelReady": "name",
    OIP_PREFIX + "ModelInfer": "model_name",
}
# State-changing methods: a refusal here (no token, a wrong one, a role missing) is written to
# the audit log, as the handlers write their own outcomes once let through.
AUDITED_METHODS = frozenset(
    SERVICE_PREFIX + method for method in ("SubmitJob", "CancelJob", "DeleteJob")
)
# Methods that spend the tenant's images-per-minute quota: while a recent refusal says not
# one image fits, they are refused here, before the request body is read.
RATE_LIMITED_METHODS = frozenset({SERVICE_PREFIX + "Classify", OIP_PREFIX + "ModelInfer"})

_TENANT: contextvars.ContextVar[Tenant] = contextvars.ContextVar("perito_tenant")

if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


def current_tenant() -> Tenant:
    """The tenant the current call acts as.

    Raises:
        LookupError: outside a call let through by `TenantInterceptor`.
    """
    return _TENANT.get()


def bearer_token(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer <token>` entry, if there is one."""
    scheme, _, token = metadata_value(metadata, "authorization").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


# The calls that no token opens (health checks, reflection, OIP liveness and readiness) are
# held in this one share of the server's calls.
OPEN_CALLS = ""


class CallSlots:
    """The calls in progress on this server, gRPC calls and HTTP requests alike, counted per
    tenant (and the open calls together, under `OPEN_CALLS`) from the moment a call arrives,
    before its request message or body is read, until it ends: one caller cannot take the
    whole of `max_concurrent_rpcs` (by opening calls and never sending their messages, say)
    and leave the others none.

    Args:
        per_tenant: the most calls one tenant may have in progress at once.
        open_calls: the most calls without a token (health, reflection, liveness) at once.
        arrival_s: the longest a unary call's request message may take to arrive, in
            seconds, once the call is open; past it the call ends DEADLINE_EXCEEDED.
    """

    def __init__(self, per_tenant: int, open_calls: int, arrival_s: float) -> None:
        self.per_tenant = per_tenant
        self.open_calls = open_calls
        self.arrival_s = arrival_s
        self.calls = InProgress("QUOTA_CONCURRENT_CALLS", retry_after=1.0)

    @classmethod
    def unbounded(cls) -> CallSlots:
        """No share smaller than gRPC's own limit, and an hour for a message to arrive."""
        return cls(sys.maxsize, sys.maxsize, 3600.0)

    def hold(self, key: str) -> contextlib.AbstractContextManager[None]:
        """One slot of `key` (a tenant's name, or `OPEN_CALLS`) for the block.

        Raises:
            QuotaExceeded: `key` holds its most calls already (reason
                QUOTA_CONCURRENT_CALLS, with a retry hint).
        """
        most = self.open_calls if key == OPEN_CALLS else self.per_tenant
        who = "calls without a token" if key == OPEN_CALLS else f"tenant {key!r}"
        return self.calls.hold(
            key,
            most,
            f"{who} already has {most} calls in progress on this server, the most at once",
        )

    async def first_message(self, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """A unary call's request message, read from the call of a request-streaming
        handler (`_held` serves unary methods as such, so that they run as soon as the call
        arrives, not once its message has).

        Raises:
            DeadlineExceeded: it did not arrive within `arrival_s`.
            InvalidArgument: the message is not this method's request (protobuf cannot
                parse it).
            QueueFull: (RESOURCE_EXHAUSTED) the call ended without one: gRPC itself refuses
                a message over the server's size limit, ending the call (the caller is
                told RESOURCE_EXHAUSTED by gRPC; `errors.CallEnded` then stops the handler).
        """
        try:
            async with asyncio.timeout(self.arrival_s):  # no task of its own, as wait_for's
                request = await context.read()
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request message did not arrive within {self.arrival_s:g} s of the call"
            ) from None
        except DecodeError as exc:
            raise InvalidArgument(
                f"the request message is not this method's request: protobuf cannot parse it "
                f"({exc})",
                reason="MALFORMED_REQUEST",
            ) from None
        if request is grpc.aio.EOF:  # type: ignore[attr-defined]
            raise QueueFull(
                "the call ended without its request message (one over the server's message "
                "size limit, PERITO_MAX_MESSAGE_BYTES, is refused by gRPC itself)",
                reason="REQUEST_TOO_LARGE",
            )
        return request


class TenantInterceptor(_Interceptor):
    """Authenticates each call, checks its role, and runs it as its tenant (module docs),
    within its share of the server's calls (`slots`; None: `CallSlots.unbounded()`)."""

    def __init__(
        self,
        tenants: Tenants,
        limiter: RateLimiter | None = None,
        audit: AuditLog | None = None,
        slots: CallSlots | None = None,
    ) -> None:
        self.tenants = tenants
        self.limiter = limiter
        self.audit = audit
        self.slots = slots or CallSlots.unbounded()

    def authorize(self, method: str, metadata: Any) -> Tenant:
        """The tenant a call to `method` (`/perito.v1.Perito/Classify`) with `metadata` runs as.

        Raises:
            Unauthenticated: no token or an unknown one.
            PermissionDenied: the tenant lacks the method's role, or the method is unknown.
            QuotaExceeded: a rate-limited method while the tenant is known to be over its
                images-per-minute quota (`RateLimiter.refuse_if_blocked`).

        A refused state-changing method (`AUDITED_METHODS`) is written to the audit log.
        """
        name = method.rpartition("/")[2]
        tenant: Tenant | None = None
        try:
            tenant = self.tenants.authenticate(bearer_token(metadata))
            role = METHOD_ROLES.get(method)
            if role is None:
                raise PermissionDenied(f"{name} is not a method any tenant may call")
            tenant.require_role(role, f"call {name}")
            per_minute = tenant.quotas.images_per_minute
            if self.limiter and per_minute is not None and method in RATE_LIMITED_METHODS:
                self.limiter.refuse_if_blocked(tenant.name, per_minute)
        except PeritoError as error:
            if self.audit is not None and method in AUDITED_METHODS:
                self.audit.record(
                    AuditRecord.now(
                        tenant=tenant.name if tenant is not None else "",
                        method=name,
                        resource="",
                        outcome=error.code.name,
                        request_id=metadata_value(metadata, "x-request-id")[:128],
                        detail=error.message,
                    )
                )
            raise
        return tenant

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        full_method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if full_method.startswith(OPEN_PREFIXES):
            return _held(handler, self.slots, OPEN_CALLS)
        try:
            tenant = self.authorize(full_method, handler_call_details.invocation_metadata)
        except PeritoError as error:
            return _refusal(handler, error)
        return _as_tenant(handler, tenant, MODEL_FIELDS.get(full_method), self.slots)


async def _enter(
    tenant: Tenant, request: Any, context: grpc.aio.ServicerContext[Any, Any], field: str | None
) -> None:
    """Make `tenant` the call's tenant; abort the call unless it may use the model named in
    the request's `field` (None: the method names no model)."""
    _TENANT.set(tenant)
    model = getattr(request, field, "") if field else ""
    if model:
        try:
            tenant.require_model(model)
        except PeritoError as error:
            await abort(context, error)


def _as_tenant(
    handler: grpc.RpcMethodHandler[Any, Any],
    tenant: Tenant,
    model_field: str | None,
    slots: CallSlots,
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler`, run with `tenant` as the current tenant and its model checked first,
    within the tenant's share of `slots`."""

    async def enter(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await _enter(tenant, request, context, model_field)

    return _held(handler, slots, tenant.name, enter)


Enter = Callable[[Any, "grpc.aio.ServicerContext[Any, Any]"], Awaitable[None]]


def _held(
    handler: grpc.RpcMethodHandler[Any, Any],
    slots: CallSlots,
    key: str,
    enter: Enter | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` holding one of `key`'s `slots` from the moment its call arrives until it
    ends, and, for a unary request, reading it within `slots.arrival_s`: a unary request is
    served by a request-streaming handler, which gRPC starts before any message has come
    (the wire is the same). `enter`: run on the request before `handler` (the tenant's
    model check). Calls past `key`'s share end RESOURCE_EXHAUSTED without being read."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    # grpc's stubs type these as the sync API's; on a grpc.aio server each is a coroutine
    # (one response, or responses written with `context.write`, as the health service's
    # Watch does) or an async generator (responses yielded).
    inner: Any = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    unary_request = handler.unary_unary is not None or handler.unary_stream is not None
    streamed = handler.unary_stream is not None or handler.stream_stream is not None

    async def request_of(requests: Any, context: Any) -> Any:
        if not unary_request:  # a request stream: the handler reads it
            return requests
        try:
            request = await slots.first_message(context)
        except PeritoError as error:
            await abort(context, error)
        if enter is not None:
            await enter(request, context)
        return request

    run: Any
    if inspect.isasyncgenfunction(inner):

        async def run(requests: Any, context: Any) -> AsyncIterator[Any]:
            async with _slot(slots, key, context):
                async for message in inner(await request_of(requests, context), context):
                    yield message

    else:

        async def run(requests: Any, context: Any) -> Any:
            async with _slot(slots, key, context):
                return await inner(await request_of(requests, context), context)

    if streamed:
        return grpc.stream_stream_rpc_method_handler(run, **kwargs)
    return grpc.stream_unary_rpc_method_handler(run, **kwargs)


@contextlib.asynccontextmanager
async def _slot(slots: CallSlots, key: str, context: Any) -> AsyncIterator[None]:
    """`slots.hold(key)`, its refusal the call's status (the health service's calls pass
    no interceptor that would map it)."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(slots.hold(key))
        except PeritoError as error:
            await abort(context, error)
        yield


def _refusal(
    handler: grpc.RpcMethodHandler[Any, Any], error: PeritoError
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler answering `error` that never reads the request: request-streaming, so
    gRPC hands it an iterator it leaves untouched rather than a parsed message. However
    large the body the caller sends, it is not buffered or parsed by the server."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await abort(context, error)

    async def refuse_stream(
        requests: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await abort(context, error)
        yield  # pragma: no cover - makes this an async generator, as streams need

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream is not None:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **kwargs)
    return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
