"""The web page in headless Chromium: a real photo in, the right label on screen; a folder
as a bulk job with its progress at its own URL; a model's card with its confusion matrix.
With tenants: sign-in with a token, CSRF refusals, and each tenant seeing its own jobs only."""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from perito_web.app import create_app
from tests.conftest import publish_lite0, publish_tiny
from tests.helpers import ServerThread, Stores, WorkerProcess, free_port

pytestmark = pytest.mark.e2e

UPLOAD_LIMIT = 1024 * 1024

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
    """`create_app` under uvicorn in a thread, on a free port of 127.0.0.1 (loopback only)."""

    def __init__(self, target: str, **options: int) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            create_app(target, loopback_only=True, **options),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
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
    stores = Stores(tmp_path_factory.mktemp("web"), redis_url)
    registry = stores.open_registry()
    publish_lite0(registry, lite0_dir, aliases=("production",), confidence_threshold=0.5)
    publish_tiny(
        registry,
        tiny_model_file,
        name="car-damage",
        metrics=CARD_METRICS,
        description="Car damage severity from claim photos.",
    )
    with (
        WorkerProcess(stores.worker_env(), stores.work / "worker.log").wait_ready(),
        ServerThread(stores.server_settings()) as server,
        WebThread(server.target) as url,
    ):
        yield url


def test_the_http_api_answers_with_json_and_clear_errors(
    site: str, photos: dict[str, Path]
) -> None:
    with httpx.Client(base_url=site, timeout=60) as http:
        # The service runs without auth (anonymous, loopback): a session starts by itself,
        # and every API call carries its CSRF token.
        session = http.get("/api/session").json()
        assert session["authenticated"] and session["anonymous"]
        assert http.get("/api/models").status_code == 403  # no CSRF token
        http.headers["X-CSRF-Token"] = session["csrf"]
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

        page.click("nav a[data-tab=job]")
        page.select_option("#job-model", LITE0)
        page.set_input_files("#files", [str(photos[n]) for n in ("coffee", "rocket", "china")])
        page.click("#job-button")
        expect(page.locator("#job-state")).to_have_text("succeeded", timeout=120_000)
        expect(page.locator("#job-results tr")).to_have_count(4)
        expect(page.locator("#job-results")).to_contain_text("espresso")
        expect(page.locator("#job-results tr").nth(1)).to_contain_text("coffee.jpg")
        page.screenshot(path=str(tmp_path / "job.png"), full_page=True)
        # The job has its own URL: opened afresh (a colleague's browser), it shows the job.
        job_url = page.url
        assert "/jobs/" in job_url
        other = browser.new_page()
        other.goto(job_url)
        expect(other.locator("#job-state")).to_have_text("succeeded", timeout=30_000)
        expect(other.locator("#job-results tr")).to_have_count(4)
        other.close()

        page.click("nav a[data-tab=models]")
        page.click("#model-list a[data-model=car-damage]")
        expect(page.locator("#model-card")).to_contain_text("Test accuracy 91.0%")
        expect(page.locator("#model-card table.matrix td")).to_have_count(9)
        assert page.url.endswith("/models/car-damage")
        page.screenshot(path=str(tmp_path / "models.png"), full_page=True)
        page.goto(site + "/models/car-damage")  # a model's own link
        expect(page.locator("#model-card")).to_contain_text("Test accuracy 91.0%")
        browser.close()
    for name in ("classify", "job", "models"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def tenant_site(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_file: Path, redis_url: str
) -> Iterator[tuple[str, dict[str, str], str]]:
    """A service with two tenants (acme, globex) behind the page; no worker, so jobs stay
    queued. Yields the page's URL, each tenant's token, and the service's address."""
    from perito_core.access.tenancy import add_tenant

    work = tmp_path_factory.mktemp("web-tenants")
    stores = Stores(work, redis_url)
    publish_tiny(stores.open_registry(), tiny_model_file, name="car-damage")
    tenants_file = work / "tenants.yaml"
    tokens = {
        name: add_tenant(
            tenants_file,
            name,
            roles=["classify", "jobs", "models:read"],
            models=["car-damage"],
            read=[str(work / name)],
        )
        for name in ("acme", "globex")
    }
    with (
        ServerThread(stores.server_settings(tenants_file=tenants_file)) as server,
        WebThread(server.target, max_upload_bytes=UPLOAD_LIMIT) as url,
    ):
        yield url, tokens, server.target


def _login(http: httpx.Client, token: str) -> None:
    answer = http.post("/api/login", json={"token": token})
    assert answer.status_code == 200, answer.text
    assert "httponly" in answer.headers["set-cookie"].lower()
    assert "samesite=strict" in answer.headers["set-cookie"].lower()
    http.headers["X-CSRF-Token"] = answer.json()["csrf"]


def test_the_api_needs_a_session_and_its_csrf_token(
    tenant_site: tuple[str, dict[str, str], str], photos: dict[str, Path]
) -> None:
    url, tokens, _ = tenant_site
    image = {"image": ("coffee.jpg", photos["coffee"].read_bytes(), "image/jpeg")}
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/api/session").json() == {"authenticated": False}
        assert http.get("/api/models").status_code == 401
        assert http.post("/api/login", json={"token": "prt_wrong"}).status_code == 401
        # Login takes JSON only: a cross-site HTML form cannot send it.
        assert http.post("/api/login", data={"token": tokens["acme"]}).status_code == 415
        _login(http, tokens["acme"])
        # acme's jobs so far (the session's Redis is shared: other tests' acme may have some).
        before = [j["id"] for j in http.get("/api/jobs").json()]
        csrf = http.headers.pop("X-CSRF-Token")
        forged = http.post("/api/jobs", data={"model": "car-damage"}, files=image)
        assert forged.status_code == 403 and "CSRF" in forged.json()["error"]
        wrong = http.post(
            "/api/jobs",
            data={"model": "car-damage"},
            files=image,
            headers={"X-CSRF-Token": "x" + csrf},
        )
        assert wrong.status_code == 403
        cross = http.post(
            "/api/jobs",
            data={"model": "car-damage"},
            files=image,
            headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
        )
        assert cross.status_code == 403
        http.headers["X-CSRF-Token"] = csrf
        # None of the forged ones were made.
        assert [j["id"] for j in http.get("/api/jobs").json()] == before
        made = http.post("/api/jobs", data={"model": "car-damage"}, files=image)
        assert made.status_code == 202 and made.json()["tenant"] == "acme"
        assert [j["id"] for j in http.get("/api/jobs").json()] == [made.json()["id"], *before]

        # Bounded while streaming: a body over the limit is cut off at the limit with 413,
        # whether it says its length (refused before a byte is read) or streams in chunks.
        def chunks() -> Iterator[bytes]:
            yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
            for _ in range(4):
                yield b"x" * (UPLOAD_LIMIT // 2)

        streamed = http.post(
            "/api/classify",
            content=chunks(),
            headers={"Content-Type": "multipart/form-data; boundary=b"},
        )
        assert streamed.status_code == 413
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as raw:
            raw.sendall(
                b"POST /api/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1099511627776\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
            )
            assert raw.recv(100).startswith(b"HTTP/1.1 413")


def test_the_page_signs_in_and_shows_only_the_tenants_jobs(
    tenant_site: tuple[str, dict[str, str], str], photos: dict[str, Path], tmp_path: Path
) -> None:
    if CHROMIUM is None:
        pytest.skip("apt-get install chromium")
    from playwright.sync_api import expect, sync_playwright

    import perito

    url, tokens, target = tenant_site
    with perito.Client(target, token=tokens["globex"]) as globex:
        theirs = globex.submit_job(
            [photos["rocket"].read_bytes()], model="car-damage", inline=True
        ).last
    forged_form = tmp_path / "attack.html"
    forged_form.write_text(
        f'<form id="f" method="POST" action="{url}/api/jobs" enctype="multipart/form-data">'
        '<input name="model" value="car-damage"></form>'
        '<script>document.getElementById("f").submit()</script>'
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "/jobs")
        expect(page.locator("#login")).to_be_visible()
        page.fill("#token", "prt_not-a-token")
        page.click("#login-button")
        expect(page.locator("#login-error")).to_contain_text("unknown token")
        page.fill("#token", tokens["acme"])
        page.click("#login-button")
        expect(page.locator("#job-list")).to_be_visible()
        page.click("nav a[data-tab=job]")
        page.set_input_files("#files", [str(photos["coffee"])])
        page.click("#job-button")
        # Queued here, unless a worker of another test's service shares this Redis.
        expect(page.locator("#job-state")).to_have_text(
            re.compile("queued|running|succeeded"), timeout=30_000
        )
        mine = page.url.rsplit("/", 1)[-1]
        with perito.Client(target, token=tokens["acme"]) as acme:
            acmes = [job.id for job in acme.list_jobs()]
        assert mine in acmes and theirs.id not in acmes
        page.click("nav a[data-tab=job]")
        expect(page.locator("#job-list a.job-link")).to_have_count(len(acmes))
        expect(page.locator("#job-list")).to_contain_text(mine)
        expect(page.locator("#job-list")).not_to_contain_text(theirs.id)
        # Another tenant's job link: not found, as for any job that does not exist.
        page.goto(f"{url}/jobs/{theirs.id}")
        expect(page.locator("#job-line")).to_contain_text("not found")
        # A same-origin script without the CSRF token is refused.
        status = page.evaluate(
            "async () => (await fetch('/api/jobs', {method: 'POST', body: new FormData()})).status"
        )
        assert status == 403
        # A form on another site posting to the page: no cookie (SameSite), no CSRF token.
        attacker = browser.new_page()
        attacker.goto(forged_form.as_uri())
        attacker.wait_for_timeout(1000)
        page.goto(url + "/jobs")
        expect(page.locator("#job-list a.job-link")).to_have_count(len(acmes))
        page.click("#logout-button")
        expect(page.locator("#login")).to_be_visible()
        page.goto(f"{url}/jobs/{mine}")
        expect(page.locator("#login")).to_be_visible()
        browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="apt-get install chromium")
def test_the_page_shows_where_the_model_looked(
    site: str, photos: dict[str, Path], tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(site)
        page.select_option("#model", f"{LITE0}@production")
        page.set_input_files("#photo", str(photos["coffee"]))
        page.check("#explain")
        page.click("#classify-button")
        expect(page.locator("#top-label")).to_contain_text("espresso", timeout=60_000)
        expect(page.locator("#explained")).to_be_visible(timeout=60_000)
        expect(page.locator("#explanation-caption")).to_contain_text("espresso")
        # The overlay is the model's 224 x 224 input, decoded by the browser.
        size = page.eval_on_selector("#explanation", "i => [i.naturalWidth, i.naturalHeight]")
        assert size == [224, 224]
        # Beside the top-k (left of the bars, level with them), not wrapped below the answer.
        overlay, bars = (
            page.locator("#explanation").bounding_box(),
            page.locator("#bars").bounding_box(),
        )
        assert overlay is not None and bars is not None
        assert overlay["x"] + overlay["width"] <= bars["x"]
        assert overlay["y"] < bars["y"] + bars["height"]
        page.screenshot(path=str(tmp_path / "explained.png"), full_page=True)
        # Unticked, the next answer has no overlay.
        page.uncheck("#explain")
        page.click("#classify-button")
        expect(page.locator("#top-label")).to_contain_text("espresso", timeout=60_000)
        expect(page.locator("#explained")).to_be_hidden()
        browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="apt-get install chromium")
def test_a_blurred_photo_is_answered_with_a_retake_warning_above_the_answer(
    site: str, photos: dict[str, Path], tmp_path: Path
) -> None:
    from PIL import Image, ImageFilter
    from playwright.sync_api import expect, sync_playwright

    with Image.open(photos["coffee"]) as sharp:
        blurred = sharp.convert("RGB").filter(ImageFilter.GaussianBlur(8))
    blurred.save(tmp_path / "coffee-blurred.jpg", quality=90)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(site)
        page.select_option("#model", f"{LITE0}@production")
        page.set_input_files("#photo", str(tmp_path / "coffee-blurred.jpg"))
        page.click("#classify-button")
        # Flagged, not refused: the warning, and the answer under it.
        expect(page.locator("#retake")).to_have_text("retake: too blurry", timeout=60_000)
        expect(page.locator("#top-label")).to_be_visible()
        warning, answer = (
            page.locator("#retake").bounding_box(),
            page.locator("#bars").bounding_box(),
        )
        assert warning is not None and answer is not None
        assert warning["y"] + warning["height"] <= answer["y"]
        page.screenshot(path=str(tmp_path / "retake.png"), full_page=True)

        # The sharp photo next: no warning left over from the blurred one.
        page.set_input_files("#photo", str(photos["coffee"]))
        page.click("#classify-button")
        expect(page.locator("#top-label")).to_contain_text("espresso", timeout=60_000)
        expect(page.locator("#retake")).to_be_hidden()

        # In a job's results, the blurred photo's row says so and the sharp one's does not.
        page.click("nav a[data-tab=job]")
        page.select_option("#job-model", LITE0)
        page.set_input_files(
            "#files", [str(tmp_path / "coffee-blurred.jpg"), str(photos["coffee"])]
        )
        page.click("#job-button")
        expect(page.locator("#job-state")).to_have_text("succeeded", timeout=120_000)
        rows = page.locator("#job-results tr")
        expect(rows).to_have_count(3)
        expect(rows.nth(1)).to_contain_text("coffee-blurred.jpg")
        expect(rows.nth(1).locator(".retake")).to_have_text("retake: too blurry")
        expect(rows.nth(2).locator(".retake")).to_have_count(0)
        browser.close()
