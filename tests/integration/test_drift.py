"""Drift detection end to end: a model imported with `perito models import --calibration` (its
card's reference from held-out images), a real server and a real Redis, traffic through the
SDK, the verdict read through `perito models drift` and the server's /metrics.

Held-out images of the training distribution (generated car photos, another seed than the
reference's) stay quiet; darkened copies of them are detected within `DETECTED_WITHIN` images
once they start arriving, the window being `WINDOW` images (the mix of old and new images a
real window holds when the photos change).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageEnhance
from prometheus_client.parser import text_string_to_metric_families

import perito
from perito_core.access.tenancy import add_tenant
from perito_core.drift import WINDOW_TTL_S, window_key
from tests.helpers import ServerThread, Stores, WorkerProcess, run_perito
from tests.synthetic import CAR_SEVERITIES, write_car_damage

pytestmark = pytest.mark.integration

MODEL = "drift-cars"
WINDOW = 150
BATCH = 10
# Darkened images needed before the verdict turns, at most (measured: see the report).
DETECTED_WITHIN = 60


@dataclass
class Service:
    server: ServerThread
    client: perito.Client
    env: dict[str, str]
    work: Path
    redis_url: str

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        port = self.server.running.metrics_port  # type: ignore[attr-defined]
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name.startswith("perito_drift")
        }

    def gauge(self, name: str, version: str = "1", **labels: str) -> float | None:
        key = tuple(sorted({"model": MODEL, "version": version, **labels}.items()))
        return self.metrics().get((name, key))

    def drift(self, *args: str) -> dict[str, object]:
        shown = run_perito("models", "drift", MODEL, "--json", *args, env=self.env)
        report: dict[str, object] = json.loads(shown.stdout)
        return report


def images_of(folder: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(folder.rglob("*.jpg"))]


def darkened(content: bytes, factor: float = 0.45) -> bytes:
    image = ImageEnhance.Brightness(Image.open(io.BytesIO(content))).enhance(factor)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=92)
    return out.getvalue()


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, tiny_model_file: Path
) -> Iterator[Service]:
    work = tmp_path_factory.mktemp("drift")
    stores = Stores(work, redis_url)
    env = stores.worker_env(PERITO_DRIFT_WINDOW=str(WINDOW))
    (work / "labels.txt").write_text("\n".join(CAR_SEVERITIES) + "\n")
    held_out = write_car_damage(work / "held-out", 60, seed=1)
    imported = run_perito(
        *("models", "import", str(tiny_model_file), "--name", MODEL),
        *("--labels", str(work / "labels.txt"), "--input-size", "32", "--resize-mode", "squash"),
        *("--calibration", str(held_out)),
        env=env,
    )
    assert "drift reference: 180 images of held-out" in imported.stdout
    # Version 2: the same file without a reference.
    run_perito(
        *("models", "import", str(tiny_model_file), "--name", MODEL),
        *("--labels", str(work / "labels.txt"), "--input-size", "32", "--resize-mode", "squash"),
        env=env,
    )
    settings = stores.server_settings(metrics_port=0, drift_window=WINDOW, drift_interval_s=0.3)
    with ServerThread(settings) as server, perito.Client(server.target, timeout=60) as client:
        yield Service(server, client, env, work, redis_url)


def wait_for_window(service: Service, images: int, version: str = "1") -> None:
    """Until the server's gauge shows the window holding `images` (written and evaluated)."""
    deadline = time.monotonic() + 20
    while service.gauge("perito_drift_window_images", version) != images:
        assert time.monotonic() < deadline, service.metrics()
        time.sleep(0.1)


def test_drift_stays_quiet_on_the_training_distribution_and_catches_darker_photos(
    service: Service,
) -> None:
    # The families are listed before any sample.
    port = service.server.running.metrics_port  # type: ignore[attr-defined]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for family in ("p_value", "psi", "window_images", "detected"):
        assert f"# TYPE perito_drift_{family} gauge" in text

    live = images_of(write_car_damage(service.work / "live", 50, seed=2))
    assert len(live) == WINDOW
    for start in range(0, len(live), BATCH):
        service.client.classify(live[start : start + BATCH], model=MODEL, version="1")
    wait_for_window(service, WINDOW)
    # The window goes 30 days after its last write.
    import redis

    with redis.Redis.from_url(service.redis_url) as client:
        assert WINDOW_TTL_S - 60 < client.ttl(window_key(MODEL, "1")) <= WINDOW_TTL_S
    quiet = service.drift("--version", "1")
    assert quiet["verdict"] == "no_drift", quiet
    assert quiet["window_images"] == WINDOW
    signals = {s["signal"]: s for s in quiet["signals"]}  # type: ignore[attr-defined]
    assert {"softmax", "predicted_class", "confidence", "brightness", "sharpness"} <= set(signals)
    assert service.gauge("perito_drift_detected") == 0
    assert service.gauge("perito_drift_p_value", signal="brightness") == pytest.approx(
        signals["brightness"]["p_value"]
    )

    # Darker photos arrive, BATCH at a time: the window slides over them.
    shifted = [darkened(content) for content in live]
    sent = 0
    while service.gauge("perito_drift_detected") != 1:
        assert sent < DETECTED_WITHIN, f"not detected after {sent} darker images"
        service.client.classify(shifted[sent : sent + BATCH], model=MODEL, version="1")
        sent += BATCH
        time.sleep(1.6)  # a flush (1 s) and an evaluation (0.3 s)
    print(f"drift detected after {sent} darker images in a window of {WINDOW}")
    assert service.drift()["verdict"] == "no_reference"  # the latest, version 2, has none
    alarm = service.drift("--version", "1")
    assert alarm["verdict"] == "drift", alarm
    assert alarm["p_value"] < 0.05  # type: ignore[operator]
    # Once the window holds only darker photos, their brightness is what differs most.
    for start in range(sent, len(shifted), BATCH):
        service.client.classify(shifted[start : start + BATCH], model=MODEL, version="1")
    deadline = time.monotonic() + 20
    while (service.gauge("perito_drift_psi", signal="brightness") or 0) < 1:
        assert time.monotonic() < deadline, service.metrics()
        time.sleep(0.2)
    shown = service.drift("--version", "1")
    brightness = next(s for s in shown["signals"] if s["signal"] == "brightness")  # type: ignore[attr-defined]
    assert brightness["p_value"] < 1e-6 and brightness["psi"] > 1, brightness
    table = run_perito("models", "drift", MODEL, "--version", "1", env=service.env).stdout
    assert "verdict: drift" in table and "brightness" in table


def test_a_version_without_a_reference_exports_nothing_and_the_cli_says_why(
    service: Service,
) -> None:
    live = images_of(service.work / "held-out")[:20]
    service.client.classify(live, model=MODEL, version="2")
    time.sleep(1.5)
    assert service.gauge("perito_drift_window_images", "2") is None
    shown = run_perito("models", "drift", MODEL, "--version", "2", env=service.env).stdout
    assert f"{MODEL}@2 has no drift reference" in shown
    versions = service.client.get_model(MODEL).versions
    assert "drift" not in versions[1].card
    # Version 1's card carries a summary of its reference, not its distributions.
    summary = versions[0].card["drift"]
    assert summary["images"] == 180 and "brightness" in summary["signals"], summary
    assert "softmax" not in summary and "confidence" not in summary


def test_the_cli_needs_models_read_on_the_model(service: Service) -> None:
    tenants = service.work / "tenants.yaml"
    for roles, models, refusal in (
        (["jobs"], ["*"], "lacks the role 'models:read'"),
        (["models:read"], ["other-*"], MODEL),
    ):
        token = add_tenant(tenants, f"t{len(models[0])}", roles=roles, models=models)
        env = {**service.env, "PERITO_TENANTS_FILE": str(tenants), "PERITO_TOKEN": token}
        shown = run_perito("models", "drift", MODEL, "--version", "1", env=env, check=False)
        assert shown.returncode == 1 and refusal in shown.stderr, shown.stderr
        assert "window" not in shown.stdout
    token = add_tenant(tenants, "reader", roles=["models:read"], models=["drift-*"])
    env = {**service.env, "PERITO_TENANTS_FILE": str(tenants), "PERITO_TOKEN": token}
    shown = run_perito("models", "drift", MODEL, "--version", "1", env=env)
    assert f"{MODEL}@1: {WINDOW} images in the window" in shown.stdout


def test_a_version_only_bulk_jobs_answer_with_has_its_gauges(
    service: Service, tiny_model_file: Path
) -> None:
    """The server exported gauges only for the versions it served or fed itself: a version
    only bulk workers used had none, though its window filled."""
    imported = run_perito(
        *("models", "import", str(tiny_model_file), "--name", MODEL),
        *("--labels", str(service.work / "labels.txt"), "--input-size", "32"),
        *("--resize-mode", "squash", "--calibration", str(service.work / "held-out")),
        env=service.env,
    )
    assert "drift reference: 180 images of held-out" in imported.stdout
    version = service.client.get_model(MODEL).latest_version
    with WorkerProcess(service.env, service.work / "worker.log").wait_ready():
        job = service.client.submit_job(service.work / "held-out", model=MODEL, version=version)
        assert job.wait(120).state is perito.JobState.SUCCEEDED
        wait_for_window(service, WINDOW, version)  # 180 images classified
    assert service.gauge("perito_drift_detected", version) == 0
