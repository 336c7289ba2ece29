"""The JSON API over a real socket: curl and httpx against `perito serve --http-port` (its
own process, a real Redis for jobs, a bearer token). schemathesis runs over its OpenAPI
document in test_openapi_fuzz.py."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

import perito
from perito.v1 import jobs_pb2, models_pb2, service_pb2_grpc
from perito_server import paging
from tests.conftest import tiny_registry
from tests.helpers import perito_serve_with_http
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


def test_a_multipart_form_takes_the_quality_and_precision_fields_the_json_body_takes(
    http: httpx.Client, photos: dict[str, Path]
) -> None:
    """`quality_policy`, `precision` and the quality thresholds were refused in a multipart
    form ("unknown form field") though the JSON body takes them; a field given twice (which
    one counts?) was taken."""
    files = [("images", ("a.jpg", photos["rocket"].read_bytes()))]
    url = "/v1/models/tiny:classify"
    strict = {"quality_policy": "refuse", "quality_thresholds.min_sharpness": "1e9"}
    refused = http.post(url, files=files, data=strict, headers=AUTH)
    assert refused.status_code == 400, refused.text  # no photo is that sharp: POOR_QUALITY
    assert "POOR_QUALITY" in refused.text, refused.text
    flagged = http.post(
        url, files=files, data={**strict, "quality_policy": "flag", "precision": "fp32"},
        headers=AUTH,
    )  # fmt: skip
    assert flagged.status_code == 200, flagged.text
    assert "BLURRY" in flagged.json()["results"][0]["quality"]["issues"]
    twice = http.post(
        url, files=[*files, ("top_k", (None, "3")), ("top_k", (None, "4"))], headers=AUTH
    )
    assert twice.status_code == 400 and "top_k: given twice" in twice.text, twice.text
    bad = http.post(url, files=files, data={"quality_policy": "maybe"}, headers=AUTH)
    assert bad.status_code == 400 and "quality_policy" in bad.text, bad.text


def test_a_body_naming_another_model_or_version_than_the_path_is_refused(
    http: httpx.Client, photos: dict[str, Path]
) -> None:
    """The path names the model: a JSON body's `"model": "other"` was overridden in silence,
    and a multipart `version` field beside `@1` in the path was ignored."""
    image = {"content": base64.b64encode(photos["rocket"].read_bytes()).decode()}
    refused = http.post(
        "/v1/models/tiny:classify", json={"images": [image], "model": "other"}, headers=AUTH
    )
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["message"].startswith("model: the body names 'other'")
    refused = http.post(
        "/v1/models/tiny@1:classify", json={"images": [image], "version": "2"}, headers=AUTH
    )
    assert refused.status_code == 400, refused.text
    form = http.post(
        "/v1/models/tiny@1:classify",
        files=[("images", ("a.jpg", photos["rocket"].read_bytes()))],
        data={"version": "2"},
        headers=AUTH,
    )
    assert form.status_code == 400, form.text
    assert form.json()["error"]["message"].startswith("version: the form names '2'")
    same = http.post(
        "/v1/models/tiny:classify", json={"images": [image], "model": "tiny"}, headers=AUTH
    )
    assert same.status_code == 200, same.text


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
    # A trailing slash is an unknown path: the JSON 404, never a redirect to the Host
    # header's site (Starlette's default), with or without a token.
    for headers in ({"Host": "evil.example"}, {**AUTH, "Host": "evil.example"}):
        slashed = http.get("/v1/jobs/", headers=headers, follow_redirects=False)
        assert slashed.status_code == 404, (slashed.status_code, slashed.headers)
        assert "location" not in slashed.headers


LISTS = {  # path: the list in its answer
    "/v1/models": "models",
    "/v1/jobs": "jobs",
    "/v1/jobs/{job}/results": "results",
}


def test_page_size_bounds_are_one_rule_on_every_list(
    http: httpx.Client, served: Served, photos: dict[str, Path]
) -> None:
    """Google AIP-158 on each list call, over HTTP and gRPC: a negative page size is
    INVALID_ARGUMENT naming page_size, any size up to int32's largest is served (cut to the
    call's largest page), past int32 over HTTP is 400 naming page_size too."""
    images = [
        {"content": base64.b64encode(photos[name].read_bytes()).decode(), "id": name}
        for name in ("coffee", "chelsea", "rocket")
    ]
    submitted = http.post("/v1/jobs", json={"model": "tiny", "images": {"images": images}},
                          headers=AUTH)  # fmt: skip
    job = submitted.json()["id"]
    for path, items in LISTS.items():
        url = path.format(job=job)
        for size in (-1, -(2**31), 2**31, "many"):
            error = _error(http.get(url, params={"page_size": size}, headers=AUTH), 400,
                           "INVALID_ARGUMENT")  # fmt: skip
            assert _violation(error) == "page_size" and "page_size" in str(error["message"])
        everything = http.get(url, headers=AUTH).json()[items]
        if items == "jobs":  # this one and the other tests'
            assert job in {j["id"] for j in everything}
        else:
            assert len(everything) == {"models": 1, "results": 3}[items]
        one = http.get(url, params={"page_size": 1}, headers=AUTH).json()
        assert one[items] == everything[:1]
        assert bool(one["next_page_token"]) == (len(everything) > 1)
        largest = http.get(url, params={"page_size": 2**31 - 1}, headers=AUTH)
        assert largest.status_code == 200, (url, largest.text)
        assert largest.json()[items] == everything and not largest.json()["next_page_token"]
    requests = {
        "ListModels": models_pb2.ListModelsRequest(page_size=-1),
        "ListJobs": jobs_pb2.ListJobsRequest(page_size=-1),
        "ListJobResults": jobs_pb2.ListJobResultsRequest(job_id=job, page_size=-1),
    }
    with grpc.insecure_channel(served.grpc_url) as channel:
        stub = service_pb2_grpc.PeritoStub(channel)
        for method, request in requests.items():
            with pytest.raises(grpc.RpcError) as refused:
                getattr(stub, method)(request, metadata=[("authorization", f"Bearer {TOKEN}")])
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, method
            assert "page_size" in str(refused.value.details()), method
            request.page_size = 2**31 - 1
            answer = getattr(stub, method)(request, metadata=[("authorization", f"Bearer {TOKEN}")])
            assert not answer.next_page_token, method


def test_a_made_up_page_token_is_a_400_never_a_server_error(
    http: httpx.Client, photos: dict[str, Path]
) -> None:
    """Tokens are opaque: one the server did not make is refused naming page_token (a model
    name is ListModels' token: any text starts the listing after it)."""
    image = {"content": base64.b64encode(photos["coffee"].read_bytes()).decode()}
    job = http.post("/v1/jobs", json={"model": "tiny", "images": {"images": [image]}},
                    headers=AUTH).json()["id"]  # fmt: skip
    for token in ("x", "-1:", "1e999:x", "\u00e9", "9" * 400, " "):
        for url in ("/v1/jobs", f"/v1/jobs/{job}/results"):
            answer = http.get(url, params={"page_token": token}, headers=AUTH)
            assert answer.status_code in (200, 400), (url, token, answer.text)
            if answer.status_code == 400:
                assert _violation(_error(answer, 400, "INVALID_ARGUMENT")) == "page_token"
        models = http.get("/v1/models", params={"page_token": token}, headers=AUTH)
        assert models.status_code == 200, models.text
    refused = http.get("/v1/jobs", params={"page_token": "x"}, headers=AUTH)
    assert _violation(_error(refused, 400, "INVALID_ARGUMENT")) == "page_token"


def test_a_page_larger_than_the_largest_is_the_largest(
    tmp_path: Path, tiny_model_file: Path, redis_url: str
) -> None:
    """1001 models: ListModels with any page size past 1000 answers 1000 and a token for the
    last one, over HTTP and gRPC (it answered all of them in one page)."""
    tiny_registry(tmp_path / "registry", tiny_model_file)
    models = tmp_path / "registry" / "models"
    largest = paging.LIST_MODELS.largest
    manifest = json.loads((models / "tiny" / "1" / "manifest.json").read_text())
    for number in range(largest):  # the same model under 1000 more names
        name = f"m{number:04d}"
        shutil.copytree(models / "tiny", models / name)
        (models / name / "1" / "manifest.json").write_text(json.dumps({**manifest, "name": name}))
    with perito_serve_with_http(
        tmp_path, PERITO_REDIS_URL=redis_url.rsplit("/", 1)[0] + "/7"
    ) as serve:
        base = f"http://{serve.http_url}/v1/models"
        for size in (largest + 1, 2**31 - 1):
            first = httpx.get(base, params={"page_size": size}, timeout=120).json()
            assert len(first["models"]) == largest and first["next_page_token"]
            rest = httpx.get(
                base, params={"page_token": first["next_page_token"]}, timeout=60
            ).json()
            assert [m["name"] for m in rest["models"]] == ["tiny"] and not rest["next_page_token"]
        with grpc.insecure_channel(serve.grpc_url) as channel:
            stub = service_pb2_grpc.PeritoStub(channel)
            page = stub.ListModels(models_pb2.ListModelsRequest(page_size=5000), timeout=120)
            assert len(page.models) == largest and page.next_page_token
        with perito.Client(serve.grpc_url, timeout=120) as client:  # the SDK follows the tokens
            assert len(client.list_models()) == largest + 1


def _violation(error: dict[str, object]) -> str:
    """The field the AIP-193 error's BadRequest names."""
    details = error["details"]
    assert isinstance(details, list)
    fields = [v["field"] for d in details for v in d.get("fieldViolations", [])]
    assert len(fields) == 1, error
    return str(fields[0])


def test_an_integer_no_field_holds_is_refused_naming_its_field(http: httpx.Client) -> None:
    """A 400-digit integer is valid JSON; converting it to a float field's value raised
    OverflowError (500)."""
    huge = "1" + "0" * 400
    image = base64.b64encode(b"x").decode()
    for field, body in {
        "confidence_threshold": f'{{"images":[{{"content":"{image}"}}],'
        f'"confidence_threshold":{huge}}}',
        "quality_thresholds.min_sharpness": f'{{"images":[{{"content":"{image}"}}],'
        f'"quality_thresholds":{{"min_sharpness":{huge}}}}}',
    }.items():
        answer = http.post(
            "/v1/models/tiny:classify",
            content=body,
            headers={**AUTH, "Content-Type": "application/json"},
        )
        error = _error(answer, 400, "INVALID_ARGUMENT")
        assert _violation(error) == field
        assert "integer of 401 digits" in str(error["message"]), error


def test_a_lone_surrogate_is_refused_naming_its_field(http: httpx.Client) -> None:
    """JSON's \\u escapes can spell what is not Unicode text: refused naming the field, in
    the JSON API's words; a surrogate pair (an emoji) is text like any other."""
    bodies = {
        "prefix": {"model": "tiny", "prefix": "/photos/\ud800"},
        "labels.site": {
            "model": "tiny",
            "uris": {"uris": ["/a.jpg"]},
            "labels": {"site": "\udc80"},
        },
        "uris.uris[1]": {"model": "tiny", "uris": {"uris": ["/a.jpg", "/b\udfff.jpg"]}},
    }
    for field, body in bodies.items():
        answer = http.post(
            "/v1/jobs",
            content=json.dumps(body),  # ASCII with \u escapes, as a client would send it
            headers={**AUTH, "Content-Type": "application/json"},
        )
        error = _error(answer, 400, "INVALID_ARGUMENT")
        assert _violation(error) == field
        message = str(error["message"])
        assert message.startswith(f"{field} is not Unicode text"), message
        for internal in ("SubmitJobRequest", "Unpaired", "ParseError", "Traceback"):
            assert internal not in message, message
    image = {"content": base64.b64encode(b"x").decode(), "id": "\ud83d"}
    classify = http.post(
        "/v1/models/tiny:classify",
        content=json.dumps({"images": [image]}),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert _violation(_error(classify, 400, "INVALID_ARGUMENT")) == "images[0].id"
    emoji = {"model": "tiny", "prefix": "/nowhere/\U0001f600"}  # \ud83d\ude00 on the wire
    paired = http.post(
        "/v1/jobs", content=json.dumps(emoji), headers={**AUTH, "Content-Type": "application/json"}
    )
    refused = _error(paired, 400, "INVALID_ARGUMENT")  # checked as a path: under no root
    assert _violation(refused) == "prefix" and "/nowhere/\U0001f600" in str(refused["message"])


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
