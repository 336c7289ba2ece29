"""The web page in headless Chromium: a real photo in, the right label on screen; a folder
as a bulk job with its progress; a model's card with its confusion matrix."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from perito_core.registry import ModelRegistry
from perito_server.settings import ServerSettings
from perito_web.app import create_app
from tests.conftest import publish_lite0, publish_tiny
from tests.helpers import ServerThread, WorkerProcess, free_port, subprocess_env

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LITE0 = "imagenet-efficientnet-lite0"
CARD_METRICS = {
    "accuracy": 0.91,
    "images": 300,
    "macro_avg": {"precision": 0.9, "recall": 0.9, "f1": 0.9},
    "per_class": {
        name: {"precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 100}
        for name in ("minor", "moderate", "severe")
    },
    "confusion_matrix": {
        "labels": ["minor", "moderate", "severe"],
        "matrix": [[93, 6, 1], [5, 88, 7], [0, 8, 92]],
    },
}


class WebThread:
    """`create_app` under uvicorn in a thread, on a free port."""

    def __init__(self, target: str) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            create_app(target), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("the web app did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory,
    lite0_dir: Path,
    tiny_model_file: Path,
    redis_url: str,
) -> Iterator[str]:
    work = tmp_path_factory.mktemp("web")
    registry = ModelRegistry.open(str(work / "registry"), cache_dir=work / "publish-cache")
    publish_lite0(registry, lite0_dir, aliases=("production",), confidence_threshold=0.5)
    publish_tiny(
        registry,
        tiny_model_file,
        name="car-damage",
        metrics=CARD_METRICS,
        description="Car damage severity from claim photos.",
    )
    settings = ServerSettings(
        port=0,
        registry=str(work / "registry"),
        cache_dir=work / "server-cache",
        redis_url=redis_url,
        results_uri=str(work / "results"),
        local_roots=[work],
    )
    worker = WorkerProcess(
        subprocess_env(
            PERITO_REDIS_URL=redis_url,
            PERITO_REGISTRY=str(work / "registry"),
            PERITO_CACHE_DIR=str(work / "worker-cache"),
            PERITO_LOCAL_ROOTS=f'["{work}"]',
            PERITO_NICE="0",
        ),
        work / "worker.log",
    ).wait_ready()
    try:
        with ServerThread(settings) as server, WebThread(server.target) as url:
            yield url
    finally:
        worker.stop()


def test_the_http_api_answers_with_json_and_clear_errors(
    site: str, photos: dict[str, Path]
) -> None:
    with httpx.Client(base_url=site, timeout=60) as http:
        assert [m["name"] for m in http.get("/api/models").json()] == ["car-damage", LITE0]
        answer = http.post(
            "/api/classify",
            data={"model": f"{LITE0}@production", "top_k": "2"},
            files={"image": ("coffee.jpg", photos["coffee"].read_bytes(), "image/jpeg")},
        )
        assert answer.status_code == 200
        [result] = answer.json()
        assert result["predictions"][0]["label"] == "espresso"
        assert len(result["predictions"]) == 2
        broken = http.post(
            "/api/classify",
            data={"model": LITE0},
            files={"image": ("x.jpg", b"not a photo", "image/jpeg")},
        )
        assert broken.status_code == 400
        assert "not a recognised image" in broken.json()["violations"][0]["description"]
        missing = http.get("/api/models/claims")
        assert missing.status_code == 404 and "claims" in missing.json()["error"]
        assert http.post("/api/classify", data={"model": LITE0}).status_code == 400


@pytest.mark.skipif(CHROMIUM is None, reason="apt-get install chromium")
def test_a_photo_uploaded_in_the_browser_shows_the_right_label(
    site: str, photos: dict[str, Path], tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(site)
        page.select_option("#model", f"{LITE0}@production")
        page.set_input_files("#photo", str(photos["coffee"]))
        page.click("#classify-button")
        expect(page.locator("#top-label")).to_contain_text("espresso", timeout=60_000)
        expect(page.locator("#verdict .badge")).to_have_text("confident")
        assert page.locator("#bars .bar").count() == 5
        page.screenshot(path=str(tmp_path / "classify.png"), full_page=True)

        page.set_input_files("#photo", str(photos["chelsea"]))
        page.click("#classify-button")
        # Tabby / tiger / Egyptian cat split the vote: under the model's 0.5 threshold.
        expect(page.locator("#verdict .badge")).to_contain_text("uncertain", timeout=60_000)

        page.click("nav button[data-tab=job]")
        page.select_option("#job-model", LITE0)
        page.set_input_files("#files", [str(photos[n]) for n in ("coffee", "rocket", "china")])
        page.click("#job-button")
        expect(page.locator("#job-state")).to_have_text("succeeded", timeout=120_000)
        expect(page.locator("#job-results tr")).to_have_count(4)
        expect(page.locator("#job-results")).to_contain_text("espresso")
        expect(page.locator("#job-results tr").nth(1)).to_contain_text("coffee.jpg")
        page.screenshot(path=str(tmp_path / "job.png"), full_page=True)

        page.click("nav button[data-tab=models]")
        page.click("#model-list button[data-model=car-damage]")
        expect(page.locator("#model-card")).to_contain_text("Test accuracy 91.0%")
        expect(page.locator("#model-card table.matrix td")).to_have_count(9)
        page.screenshot(path=str(tmp_path / "models.png"), full_page=True)
        browser.close()
    for name in ("classify", "job", "models"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
