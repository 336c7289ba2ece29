"""Optional OpenTelemetry tracing (`PERITO_TRACING=true`, `pip install 'perito[tracing]'`).

Spans go to the OTLP endpoint of the standard `OTEL_EXPORTER_OTLP_ENDPOINT` variable. The
server traces every RPC (OpenTelemetry's gRPC interceptor, which also continues a caller's
trace: `perito_server.app`) with child spans for decoding and for the batched forward pass;
the worker traces each chunk. Without the packages or the setting, `span()` costs nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any


def available() -> bool:
    return importlib.util.find_spec("opentelemetry.sdk") is not None


def setup_tracing(service_name: str) -> None:
    """Export spans over OTLP/gRPC as `service_name` (the global tracer provider)."""
    if not available():
        raise RuntimeError("tracing needs: pip install 'perito[tracing]'")
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    enable()


# Set by `setup_tracing`: until then `span` does nothing (no lookup, no no-op tracer: it sits
# on every call's path).
_enabled = False


def enable() -> None:
    """Make `span` record (to the global tracer provider) in this process and its forks."""
    global _enabled
    _enabled = True


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    """A child span of whatever is current, once `setup_tracing` has run (else nothing)."""
    if not _enabled:
        yield
        return
    from opentelemetry import trace

    with trace.get_tracer("perito").start_as_current_span(name, attributes=attributes):
        yield
