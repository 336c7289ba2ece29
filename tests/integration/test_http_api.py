"""The JSON API over a real socket: curl, httpx and schemathesis against `perito serve
--http-port` (its own process, a real Redis for jobs, a bearer token)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import perito
from tests.conftest import tiny_registry
from tests.helpers import VENV_BIN, perito_serve_with_http
from tests.processes import Proc

pytestmark = pytest.mark.integration

TOKEN = "http-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 2 * 1024 * 1024


@dataclass
class Served:
    grpc_url: str
    base: str
    process: Proc


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_file: Path, redis_url: str
) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("http")
    tiny_registry(work / "registry", tiny_model_file, aliases=("production",))
    (work / "results").mkdir()
    with perito_serve_with_http(
        work,
        # A database of its own: no other test's worker takes these jobs' chunks.
        PERITO_REDIS_URL=redis_url.rsplit("/", 1)[0] + "/7",
        PERITO_AUTH_TOKENS=f'["{TOKEN}"]',
        PERITO_RESULTS_URI=str(work / "results"),
        PERITO_LOCAL_ROOTS=json.dumps([str(work)]),
        PERITO_MAX_MESSAGE_BYTES=str(MAX_BODY),
        PERITO_MAX_QUEUE_BYTES=str(4 * MAX_BODY),
    ) as serve:
        yield Served(serve.grpc_url, f"http://{serve.http_url}", serve.process)


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.base, timeout=60) as client:
        yield client


def _classify_over_grpc(served: Served, images: list[Path]) -> list[perito.Classification]:
    with perito.Client(served.grpc_url, token=TOKEN, timeout=60) as client:
        return client.classify(images, model="tiny", top_k=3)


def _same_answer(results: list[dict[str, object]], expected: list[perito.Classification]) -> None:
    assert len(results) == len(expected)
    for got, want in zip(results, expected, strict=True):
        assert got["image_id"] == want.image_id
        predictions = got["predictions"]
        assert isinstance(predictions, list)
        assert [p["label"] for p in predictions] == [p.label for p in want.predictions]
        assert [p["probability"] for p in predictions] == pytest.approx(
            [p.probability for p in want.predictions], rel=1e-5
        )
        assert got["uncertain"] == want.uncertain
        assert got["margin"] == pytest.approx(want.margin, rel=1e-4, abs=1e-6)


def test_curl_multipart_upload_answers_what_classify_answers(
    served: Served, photos: dict[str, Path]
) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is a system dependency of the tests (make system-deps installs it)"
    files = [photos["coffee"], photos["chelsea"]]
    completed = subprocess.run(
        [
            curl, "--silent", "--show-error", "--fail-with-body",
            "-H", f"Authorization: Bearer {TOKEN}",
            "-F", f"images=@{files[0]}", "-F", f"images=@{files[1]}", "-F", "top_k=3",
            f"{served.base}/v1/models/tiny@production:classify",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    answer = json.loads(completed.stdout)
    assert answer["model"] == "tiny" and answer["model_version"] == "1"
    _same_answer(answer["results"], _classify_over_grpc(served, files))
    assert answer["results"][0]["form"]


def test_json_with_base64_images_answers_what_classify_answers(
    served: Served, http: httpx.Client, photos: dict[str, Path]
) -> None:
    files = [photos["rocket"], photos["china"]]
    body = {
        "images": [
            {"content": base64.b64encode(path.read_bytes()).decode(), "id": path.name}
            for path in files
        ],
        "top_k": 3,
    }
    response = http.post("/v1/models/tiny:classify", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"]
    _same_answer(response.json()["results"], _classify_over_grpc(served, files))


def test_jobs_submit_get_results_and_cancel(http: httpx.Client, photos: dict[str, Path]) -> None:
    images = [
        {"content": base64.b64encode(photos[name].read_bytes()).decode(), "id": f"{name}.jpg"}
        for name in ("coffee", "chelsea", "rocket")
    ]
    body = {"model": "tiny", "images": {"images": images}, "request_id": "http-job-1"}
    submitted = http.post("/v1/jobs", json=body, headers=AUTH)
    assert submitted.status_code == 200, submitted.text
    job = submitted.json()
    assert job["model"] == "tiny" and job["total_items"] == "3"
    # The same request id answers the same job (AIP-155), over HTTP too.
    assert http.post("/v1/jobs", json=body, headers=AUTH).json()["id"] == job["id"]
    got = http.get(f"/v1/jobs/{job['id']}", headers=AUTH)
    assert got.status_code == 200 and got.json()["id"] == job["id"]
    assert job["id"] in {j["id"] for j in http.get("/v1/jobs", headers=AUTH).json()["jobs"]}

    # No worker runs here: cancelling ends every item `cancelled`.
    cancelled = http.post(f"/v1/jobs/{job['id']}:cancel", headers=AUTH)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] in ("JOB_STATE_CANCELLED", "JOB_STATE_CANCELLING")
    page = http.get(f"/v1/jobs/{job['id']}/results", params={"page_size": 2}, headers=AUTH)
    assert page.status_code == 200, page.text
    assert len(page.json()["results"]) == 2 and page.json()["next_page_token"]
    lines = http.get(
        f"/v1/jobs/{job['id']}/results",
        params={"page_size": 2},
        headers={**AUTH, "Accept": "application/x-ndjson"},
    )
    assert lines.headers["content-type"].startswith("application/x-ndjson")
    items = [json.loads(line) for line in lines.text.splitlines()]
    assert [item["image_id"] for item in items] == ["coffee.jpg", "chelsea.jpg", "rocket.jpg"]


def test_models_list_and_card(http: httpx.Client) -> None:
    listed = http.get("/v1/models", headers=AUTH)
    assert listed.status_code == 200
    assert [m["name"] for m in listed.json()["models"]] == ["tiny"]
    model = http.get("/v1/models/tiny", headers=AUTH).json()
    assert model["aliases"] == {"production": "1"}
    assert model["versions"][0]["labels"] == ["minor", "moderate", "severe"]
    card = model["versions"][0]["card"]
    # The card's whole numbers are JSON integers, as in manifest.json (Struct holds doubles).
    assert card["input"]["height"] == 32 and isinstance(card["input"]["height"], int)


def _error(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    """The AIP-193 error of `response`, checked for its status and code."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["status"] == code
    assert isinstance(error["message"], str) and isinstance(error["details"], list)
    return error  # type: ignore[no-any-return]


def test_the_callers_timeout_bounds_the_call(http: httpx.Client, photos: dict[str, Path]) -> None:
    upload = [("images", ("a.jpg", photos["coffee"].read_bytes()))]
    url = "/v1/models/tiny:classify"
    late = http.post(url, files=upload, headers={**AUTH, "X-Server-Timeout": "0.000001"})
    _error(late, 504, "DEADLINE_EXCEEDED")
    in_time = http.post(url, files=upload, headers={**AUTH, "X-Server-Timeout": "30"})
    assert in_time.status_code == 200, in_time.text
    for text in ("soon", "-1", "0", "nan", "1e9"):
        bad = http.post(url, files=upload, headers={**AUTH, "X-Server-Timeout": text})
        error = _error(bad, 400, "INVALID_ARGUMENT")
        assert "X-Server-Timeout" in str(error["message"])


def test_refusals_are_aip193_errors_with_the_grpc_codes_status(
    http: httpx.Client, photos: dict[str, Path]
) -> None:
    jpeg = photos["coffee"].read_bytes()
    unknown = http.post(
        "/v1/models/no-such-model:classify",
        files=[("images", ("a.jpg", jpeg))],
        headers=AUTH,
    )
    _error(unknown, 404, "NOT_FOUND")
    bad = http.post(
        "/v1/models/tiny:classify",
        files=[("images", ("a.jpg", jpeg)), ("images", ("b.jpg", b"not an image"))],
        headers=AUTH,
    )
    error = _error(bad, 400, "INVALID_ARGUMENT")
    assert "images[1] (id 'b.jpg')" in str(error["message"])
    violations = [d for d in error["details"] if "BadRequest" in d["@type"]]  # type: ignore[attr-defined,index]
    assert violations[0]["fieldViolations"][0]["field"] == "images[1]"
    missing = http.post("/v1/models/tiny:classify", files=[("images", ("a.jpg", jpeg))])
    _error(missing, 401, "UNAUTHENTICATED")
    wrong = http.get("/v1/jobs/x", headers={"Authorization": "Bearer nope"})
    _error(wrong, 401, "UNAUTHENTICATED")
    # OIP REST keeps the protocol's {"error": "<message>"}, with the same status.
    oip = http.get("/v2/models/no-such-model", headers=AUTH)
    assert oip.status_code == 404 and isinstance(oip.json()["error"], str)
    assert oip.json()["status"] == "NOT_FOUND"


def test_a_body_over_the_limit_is_refused_while_it_streams(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the bound is on what arrives
        for _ in range(2 * MAX_BODY // 65536 + 1):
            yield b"x" * 65536

    response = http.post(
        "/v1/models/tiny:classify",
        content=chunks(),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    error = _error(response, 413, "RESOURCE_EXHAUSTED")
    assert str(MAX_BODY) in str(error["message"])
    # Without a token nothing is read: 401 whatever the body.
    assert http.post("/v1/models/tiny:classify", content=chunks()).status_code == 401


def test_schemathesis_finds_no_server_error_and_only_documented_answers(
    served: Served, tmp_path: Path
) -> None:
    """Generated requests for every operation of /openapi.json (a few examples each, to
    stay fast): no 5xx, every status, content type, header and body as documented. Half the
    model names are the served model's, so requests get past NOT_FOUND to the model."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        '[dictionaries.models]\nvalues = ["tiny", "tiny@production"]\n\n'
        '[parameters]\n"path.model" = { dictionary = "models", probability = 0.5 }\n'
    )
    completed = subprocess.run(
        [
            str(VENV_BIN / "schemathesis"), "--config-file", str(config),
            "run", f"{served.base}/openapi.json",
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_headers_conformance,response_schema_conformance",
            "--max-examples", "8", "--phases", "examples,coverage,fuzzing", "--seed", "18",
            "--header", f"Authorization: Bearer {TOKEN}", "--request-timeout", "30",
            "--suppress-health-check", "all", "--workers", "1",
            "--report", "junit", "--report-dir", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=280, check=False,
        cwd=tmp_path,  # its caches (.schemathesis/) stay out of the checkout
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-2000:]
