"""OpenTelemetry: with tracing on, each RPC is a span, with decode and batch spans inside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import perito
from tests.conftest import tiny_registry
from tests.helpers import ServerThread

pytestmark = pytest.mark.integration


def test_classify_calls_are_traced(tmp_path: Path, tiny_model_file: Path) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # what setup_tracing does, with OTLP instead

    registry = tiny_registry(tmp_path / "registry", tiny_model_file, name="car-damage")
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    with (
        ServerThread.serving(registry, tmp_path / "cache", tracing=True) as server,
        perito.Client(server.target) as client,
    ):
        client.classify([image, image], model="car-damage")
    spans = {span.name: span for span in exporter.get_finished_spans()}
    call = spans["/perito.v1.Perito/Classify"]
    for child in ("perito.decode", "perito.batch"):
        assert spans[child].parent is not None
        assert spans[child].parent.span_id == call.context.span_id
        assert spans[child].context.trace_id == call.context.trace_id
    assert spans["perito.batch"].attributes["model"] == "car-damage"
