"""A served form's batch size, measured at load or set: exported on /metrics, logged, and the
batcher's forward passes never larger."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import perito
from perito_core.models.registry import ModelRegistry
from tests.conftest import publish_tiny
from tests.helpers import TINY_INPUT, ServerThread

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
SERVED = (("form", "torchscript-fp32"), ("model", "tiny"), ("version", "1"))


def scrape(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def classify_concurrently(server: ServerThread, calls: int, images: int) -> None:
    """`calls` callers at once, each classifying `images` images; every answer checked."""
    image = np.full((TINY_INPUT.height, TINY_INPUT.width, 3), 90, dtype=np.uint8)

    def call(_: int) -> None:
        with perito.Client(server.target, timeout=60) as client:
            answers = client.classify([image] * images, model="tiny")
        assert len(answers) == images
        assert all(answer.label in {"minor", "moderate", "severe"} for answer in answers)

    with ThreadPoolExecutor(calls) as pool:
        list(pool.map(call, range(calls)))


@pytest.fixture
def registry(tmp_path: Path, tiny_model_file: Path) -> Path:
    root = tmp_path / "registry"
    publish_tiny(ModelRegistry.open(str(root), cache_dir=tmp_path / "publish"), tiny_model_file)
    return root


def test_the_measured_batch_size_is_exported_and_caps_the_batches(
    registry: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="perito_core.models.batching"),
        ServerThread.serving(
            registry,
            tmp_path / "cache",
            preload=["tiny"],
            metrics_port=0,
            max_batch_size=4,
            preferred_batch_size="auto",  # the suite sets 4 (tests/conftest.py)
        ) as server,
    ):
        classify_concurrently(server, calls=4, images=8)
        samples = scrape(server.running.metrics_port)  # type: ignore[attr-defined]

    preferred = samples[("perito_preferred_batch_size", SERVED)]
    assert preferred in {1, 2, 4}
    rates = {
        dict(labels)["batch_size"]: rate
        for (name, labels), rate in samples.items()
        if name == "perito_forward_images_per_second"
    }
    assert set(rates) == {"1", "2", "4"}
    assert all(rate > 0 for rate in rates.values())
    assert rates[str(int(preferred))] >= 0.97 * max(rates.values())
    # Every forward pass held at most the preferred size, and every image was run.
    count = samples[("perito_batch_size_count", SERVED)]
    bucket = tuple(sorted((*SERVED, ("le", f"{preferred:.1f}"))))
    within = samples[("perito_batch_size_bucket", bucket)]
    assert within == count
    assert samples[("perito_images_classified_total", SERVED)] == 32
    assert "tiny@1, torchscript-fp32: batch 1: " in caplog.text
    assert f"-> {int(preferred)} (the smallest within 3%" in caplog.text


def test_a_set_batch_size_is_used_without_measuring(registry: Path, tmp_path: Path) -> None:
    with ServerThread.serving(
        registry,
        tmp_path / "cache",
        preload=["tiny"],
        metrics_port=0,
        max_batch_size=4,
        preferred_batch_size=1,
    ) as server:
        classify_concurrently(server, calls=4, images=4)
        samples = scrape(server.running.metrics_port)  # type: ignore[attr-defined]

    assert samples[("perito_preferred_batch_size", SERVED)] == 1
    assert not [name for name, _ in samples if name == "perito_forward_images_per_second"]
    # Sixteen images, one forward pass each.
    assert samples[("perito_batch_size_count", SERVED)] == 16
    assert samples[("perito_images_classified_total", SERVED)] == 16
