"""Build and run the gRPC server.

`create_server(settings)` returns a started server and its bound port (tests bind port 0);
`serve(settings)` runs it until SIGTERM or SIGINT, then drains: health turns NOT_SERVING first
(so load balancers stop sending), in-flight calls get `grace_s` to finish, batchers empty.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from perito.v1 import service_pb2, service_pb2_grpc
from perito_core import tracing
from perito_core.access.audit import AuditLog
from perito_core.access.quotas import RateLimiter
from perito_core.access.tenancy import Tenants
from perito_core.listening import (
    ListenError,
    bind_failure,
    host_port,
    is_loopback,
    listening_sockets,
)
from perito_server.auth import CallSlots, TenantInterceptor
from perito_server.doors.http_edge import HttpEdge, http_app
from perito_server.doors.json_api import JsonApi
from perito_server.doors.oip_grpc import SERVICE_NAME as OIP_SERVICE_NAME
from perito_server.doors.oip_grpc import OipServicer, add_oip_servicer
from perito_server.doors.oip_rest import OipRest
from perito_server.doors.perito_grpc import PeritoServicer
from perito_server.drift import DriftMonitor
from perito_server.errors import CallInterceptor
from perito_server.http_server import HttpServer
from perito_server.inference import InferenceService
from perito_server.jobs import JobService
from perito_server.metrics import ServerMetrics
from perito_server.model_pool import ModelPool
from perito_server.predictions import PredictionLogCollector, PredictionRecorder
from perito_server.settings import ServerSettings
from perito_server.shadow import ShadowTraffic

log = logging.getLogger(__name__)

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["Perito"].full_name


def _listener_hosts(settings: ServerSettings) -> dict[str, str]:
    """Each listener's host, by name: gRPC (and the health port and HTTP on its host), and
    /metrics when it is on."""
    hosts = {"gRPC": settings.host}
    if settings.health_port is not None:
        hosts["health checks"] = settings.host
    if settings.http_port is not None:
        hosts["HTTP"] = settings.host
    if settings.metrics_port is not None:
        hosts["metrics"] = settings.metrics_host or settings.host
    return hosts


def open_tenants(settings: ServerSettings) -> Tenants:
    """The tenants `settings` name; refuses to serve anonymously beyond loopback.

    Without tenants (no tenants file, no tokens) every listener, /metrics included, must be on
    a loopback host (`perito_core.listening.is_loopback`) unless `settings.insecure`.

    Raises:
        RuntimeError: no tenants, a listener on a host other than loopback, and not `insecure`.
        perito_core.errors.InvalidArgument: a malformed tenants file.
    """
    tenants = settings.open_tenants()
    beyond = {
        what: host for what, host in _listener_hosts(settings).items() if not is_loopback(host)
    }
    if not tenants.requires_auth and beyond:
        where = ", ".join(f"{what} on {host}" for what, host in beyond.items())
        if not settings.insecure:
            raise RuntimeError(
                f"refusing to serve {where} without authentication: set PERITO_TENANTS_FILE "
                "(perito tenants add NAME --role ...) or PERITO_AUTH_TOKENS, or bind 127.0.0.1, "
                "or pass --insecure to accept anyone who can reach the port"
            )
        log.warning(
            "--insecure: serving %s WITHOUT authentication; anyone who can reach the port "
            "acts with every right",
            where,
        )
    elif not tenants.requires_auth:
        log.warning(
            "no tenants file and no tokens: one anonymous tenant with every right, on %s only",
            settings.host,
        )
    return tenants


def _add_port(
    server: grpc.aio.Server,
    what: str,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[int, list[str]]:
    """Bind `server` on `host:port` (gRPC resolves a name and binds each address); returns
    the port and the sockets bound, read back from the process's own (Linux; elsewhere the
    address asked, with its port).

    Raises:
        ListenError: gRPC could not bind it; the reason is the operating system's.
    """
    target = host_port(host, port)
    before = listening_sockets()
    try:
        if credentials is not None:
            bound = server.add_secure_port(target, credentials)
        else:
            bound = server.add_insecure_port(target)
    except RuntimeError:  # "Failed to bind to address ...", without the reason
        bound = 0
    if bound == 0:
        raise ListenError(what, target, bind_failure(host, port))
    new = listening_sockets().items() - before.items()
    suffix = f":{bound}"
    return bound, sorted(a for _, a in new if a.endswith(suffix)) or [host_port(host, bound)]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    pool: ModelPool
    health: HealthServicer
    service: InferenceService
    metrics: ServerMetrics
    metrics_port: int | None = None
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None
    http: HttpServer | None = None
    # The gRPC sockets as bound: ["127.0.0.1:8500"], ["127.0.0.1:8500", "[::1]:8500"], ...
    addresses: list[str] = field(default_factory=list)

    @property
    def http_port(self) -> int | None:
        """The HTTP port (`settings.http_port`), or None without HTTP."""
        return self.http.port if self.http is not None else None

    async def stop(self, grace: float) -> None:
        """Drain: NOT_SERVING, let in-flight calls finish within `grace`, free the models."""
        await self.health.enter_graceful_shutdown()
        self.service.ready = False
        if self.http is not None:
            await asyncio.gather(self.server.stop(grace), self.http.stop())
        else:
            await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.service.shadow is not None:  # its queue dropped, its last counts added
            await self.service.shadow.close()
        await self.pool.close()
        await self.service.jobs.close()
        self.service.close()
        if self.service.drift is not None:
            await asyncio.to_thread(self.service.drift.close)
        if self.service.predictions is not None:  # what is queued, within its bounded time
            await asyncio.to_thread(
                self.service.predictions.close, self.service.settings.prediction_log_close_s
            )
        self.metrics.stop()


def grpc_keepalive_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """gRPC core's channel arguments for HTTP/2 keepalive from `settings` (`grpc_keepalive_*`,
    `grpc_http2_*`: the names of Triton's flags and of gRPC's keepalive guide,
    https://github.com/grpc/grpc/blob/master/doc/keepalive.md)."""
    options = [
        ("grpc.keepalive_timeout_ms", settings.grpc_keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(settings.grpc_keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", settings.grpc_http2_max_pings_without_data),
        (
            "grpc.http2.min_recv_ping_interval_without_data_ms",
            settings.grpc_http2_min_recv_ping_interval_without_data_ms,
        ),
        ("grpc.http2.max_ping_strikes", settings.grpc_http2_max_ping_strikes),
    ]
    if settings.grpc_keepalive_time_ms is not None:
        options.append(("grpc.keepalive_time_ms", settings.grpc_keepalive_time_ms))
    return options


def _tracing_interceptor() -> Any:
    """OpenTelemetry's gRPC interceptor: a span per call, continuing the caller's trace."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return aio_server_interceptor()  # type: ignore[no-untyped-call]


async def create_server(settings: ServerSettings) -> RunningServer:
    """Start a server on `settings.host:settings.port` (and its other listeners) and load
    `settings.preload` models.

    Raises:
        RuntimeError: no tenants and a listener beyond loopback (`open_tenants`).
        perito_core.listening.ListenError: a listener could not bind its address; nothing is
            left bound or running.
    """
    tenants = open_tenants(settings)  # before anything is loaded or bound
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    registry = settings.open_registry()
    pool = ModelPool(registry, settings)
    for ref in settings.preload:
        name, _, version = ref.partition("@")
        await pool.preload(name, version)
    pool.start()

    # Room for the largest request plus protobuf framing; bigger messages are refused by
    # gRPC itself with RESOURCE_EXHAUSTED naming both sizes.
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        *grpc_keepalive_options(settings),
    ]
    metrics = ServerMetrics()
    metrics.watch_pool(pool)
    pool.count_routes(metrics.registry)
    jobs = JobService(settings, pool)
    jobs.start()
    metrics.watch_jobs(jobs.store)
    limiter = RateLimiter(jobs.store.redis)
    audit = AuditLog(jobs.store.redis, settings.job_retention.total_seconds())
    predictions = PredictionRecorder(settings, tenants)
    metrics.registry.register(PredictionLogCollector(predictions))
    predictions.start()
    service = InferenceService(
        settings, pool, jobs, limiter, audit, tenants, metrics, predictions=predictions
    )
    service.activity = settings.open_activity()
    shadow = service.shadow = ShadowTraffic(pool, settings, jobs.store.redis, metrics.registry)
    shadow.start()
    service.drift = DriftMonitor(
        jobs.store.redis, pool, window=settings.drift_window, interval_s=settings.drift_interval_s
    )
    metrics.registry.register(service.drift)
    service.drift.start()
    # Outermost first: tracing spans, then request ids, error mapping and metrics (which so
    # also count the calls auth refuses), then auth.
    slots = CallSlots(
        settings.max_calls_per_tenant if tenants.requires_auth else settings.max_concurrent_rpcs,
        settings.max_open_calls,
        settings.request_arrival_s,
    )
    authorizer = TenantInterceptor(tenants, limiter, audit, slots)
    interceptors: list[Any] = [CallInterceptor(metrics.observe_call), authorizer]
    if settings.tracing:
        tracing.enable()
        interceptors = [_tracing_interceptor(), *interceptors]
    # Calls past `max_concurrent_rpcs` (health checks count too) are refused by gRPC itself,
    # RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!" without a retry hint, before any
    # handler runs: a flood of callers cannot pile up handlers and requests without bound.
    server = grpc.aio.server(
        options=options,
        interceptors=interceptors,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    # The doors over the one inference service: perito.v1 and the Open Inference Protocol on
    # the gRPC port, OIP REST and the JSON API on the HTTP port.
    service_pb2_grpc.add_PeritoServicer_to_server(PeritoServicer(service), server)  # type: ignore[no-untyped-call]
    # OIP is not listed by reflection: its messages live in a descriptor pool of their own
    # (scripts/gen_protos.py), and its clients carry their own copy of the protocol.
    add_oip_servicer(OipServicer(service), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    credentials = None
    if settings.tls_cert_file is not None or settings.tls_key_file is not None:
        if settings.tls_cert_file is None or settings.tls_key_file is None:
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        credentials = grpc.ssl_server_credentials(
            [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())]
        )
    health_server: grpc.aio.Server | None = None
    http: HttpServer | None = None
    try:
        port, addresses = _add_port(server, "gRPC", settings.host, settings.port, credentials)
        await server.start()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        # Each service by its name, as grpc.health.v1 asks (a probe of the OIP door names it).
        for service_name in (SERVICE_NAME, OIP_SERVICE_NAME):
            await health.set(service_name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s on %s (%s%s; registry %s)",
            SERVICE_NAME,
            ", ".join(addresses),
            "TLS" if settings.tls_cert_file else "plaintext",
            f", {len(tenants.names)} tenants" if tenants.requires_auth else ", anonymous",
            registry.description,
        )
        metrics_port = None
        if settings.metrics_port is not None:
            metrics_host = settings.metrics_host or settings.host
            bound = metrics.serve(metrics_host, settings.metrics_port)
            metrics_port = int(bound[0].rpartition(":")[2])
            log.info("metrics on %s", ", ".join(f"http://{a}/metrics" for a in bound))
        health_port = None
        if settings.health_port is not None:
            # The same health states, on a plaintext port with nothing else: probes need no TLS
            # and no token, and this port gives no way to the API.
            health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
            health_port, bound = _add_port(
                health_server, "health checks", settings.host, settings.health_port
            )
            await health_server.start()
            log.info("health checks (plaintext) on %s", ", ".join(bound))
        if settings.http_port is not None:
            # The gRPC interceptor's own checks (tokens, roles, quota refusals) guard HTTP too.
            edge = HttpEdge(
                authorizer, metrics, settings.max_message_bytes, settings.request_arrival_s
            )
            app = http_app(OipRest(service, edge).routes(), JsonApi(service, edge).routes())
            http = await HttpServer.start(app, settings, grace=settings.grace_s)
            log.info("HTTP (OIP REST, JSON API) on %s", ", ".join(http.addresses))
    except BaseException:
        # A listener that cannot start ends the start: nothing stays bound or running.
        await server.stop(None)
        if health_server is not None:
            await health_server.stop(None)
        metrics.stop()
        await shadow.close()
        await pool.close()
        await jobs.close()
        service.close()
        service.drift.close()
        predictions.close(0)
        raise
    return RunningServer(
        server,
        port,
        pool,
        health,
        service,
        metrics,
        metrics_port,
        health_server,
        health_port,
        http,
        addresses,
    )


async def serve(settings: ServerSettings) -> None:
    """Run until SIGTERM / SIGINT, then shut down gracefully."""
    if settings.tracing:
        tracing.setup_tracing("perito-server")
    running = await create_server(settings)
    print(f"perito: serving on {', '.join(running.addresses)}", flush=True)
    if running.http is not None:
        print(f"perito: HTTP on {', '.join(running.http.addresses)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, running.service.reload_tenants)
    await stop.wait()
    log.info("shutting down (grace %.1fs)", settings.grace_s)
    await running.stop(settings.grace_s)
    print("perito: stopped", flush=True)
