"""The prediction log and `perito verify` over real sockets: a real server (gRPC), real
redis-server, S3 over HTTP (moto), a tenants file with two tenants each logging to its own
prefix, and the `perito` CLI as a process.

What a user would notice: every answer and refusal is in the caller's own log and nobody
else's, a photo sent twice is stored once, a log whose store is down costs callers nothing
but counts what it dropped, no tenant can reach another's log through the API, and
`perito verify` passes an untouched log and names a swapped image and a replaced artifact."""

from __future__ import annotations

import hashlib
import json
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import perito
from perito.v1 import classify_pb2, image_pb2, service_pb2_grpc
from perito_core.access.tenancy import hash_token
from perito_core.prediction_log import read_events
from tests.conftest import publish_tiny, tiny_registry
from tests.helpers import (
    MakeStores,
    ServerThread,
    Stores,
    encoded,
    moto_s3_server,
    redis_server,
    run_perito,
    subprocess_env,
)

pytestmark = pytest.mark.integration

REGISTRY = "s3://models/prediction-log-tests"
TOKENS = {"acme": "prt_acme-prediction-log", "globex": "prt_globex-prediction-log"}


def log_uri(tenant: str) -> str:
    return f"s3://results/{tenant}/prediction-log/"


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    return encoded(pixels, "JPEG")


@dataclass
class Logged:
    server: ServerThread
    stores: Stores
    s3: Any

    def classify(self, tenant: str, *images: bytes) -> classify_pb2.ClassifyResponse:
        stub = service_pb2_grpc.PeritoStub(grpc.insecure_channel(self.server.target))
        request = classify_pb2.ClassifyRequest(
            model="tiny",
            images=[image_pb2.Image(id=f"{n}.jpg", content=b) for n, b in enumerate(images)],
        )
        response: classify_pb2.ClassifyResponse = stub.Classify(
            request, metadata=[("authorization", f"Bearer {TOKENS[tenant]}")], timeout=60
        )
        return response

    def keys(self, tenant: str, under: str = "") -> list[str]:
        prefix = f"{tenant}/prediction-log/{under}"
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket="results", Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def events(self, tenant: str, at_least: int = 0) -> list[dict[str, Any]]:
        """The tenant's logged events, waiting up to 30 s for `at_least` of them (records are
        written off the request path, in batches)."""
        deadline = time.monotonic() + 30
        while True:
            events = [
                event
                for key in self.keys(tenant, "records/")
                for event in read_events(
                    self.s3.get_object(Bucket="results", Key=key)["Body"].read().decode()
                )
            ]
            if len(events) >= at_least or time.monotonic() > deadline:
                return sorted(events, key=lambda e: e["time"])
            time.sleep(0.1)

    def verify(self, *args: str) -> tuple[int, str]:
        result = run_perito(
            "verify", *args, "--registry", REGISTRY, env=self.stores.worker_env(), check=False
        )
        return result.returncode, result.stdout + result.stderr


def write_tenants(path: Path) -> None:
    entries = []
    for name in ("acme", "globex"):
        entries.append(
            {
                "name": name,
                "tokens": [hash_token(TOKENS[name])],
                "roles": ["classify", "jobs", "models:read"],
                "models": ["tiny"],
                "storage": {
                    "read": [f"s3://inspections/{name}/"],
                    "write": [f"s3://results/{name}/"],
                },
                "prediction_log": {"uri": log_uri(name), "retention": "400d"},
            }
        )
    path.write_text(json.dumps({"tenants": entries}))


@pytest.fixture(scope="module")
def logged(s3_stores: MakeStores, tiny_model_file: Path) -> Iterator[Logged]:
    stores = s3_stores("prediction-log", REGISTRY, results_uri="s3://results/jobs")
    publish_tiny(stores.open_registry(), tiny_model_file)
    tenants_file = stores.work / "tenants.yaml"
    write_tenants(tenants_file)
    settings = stores.server_settings(
        tenants_file=tenants_file, prediction_log_flush_s=0.1, metrics_port=0, http_port=0
    )
    with ServerThread(settings) as server:
        yield Logged(server, stores, stores.s3_client())


def test_every_answer_and_refusal_is_logged_for_its_tenant_alone_each_photo_once(
    logged: Logged,
) -> None:
    photo = jpeg(1)
    answers = [logged.classify("acme", photo) for _ in range(2)]
    with pytest.raises(grpc.RpcError) as refused:
        logged.classify("acme", b"not an image")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    events = logged.events("acme", at_least=3)
    assert [e["data"]["outcome"] for e in events] == ["OK", "OK", "INVALID_ARGUMENT"]
    assert {e["type"] for e in events} == {"dev.perito.classification.v1"}
    assert {e["data"]["tenant"] for e in events} == {"acme"}
    top = answers[0].results[0].predictions[0]
    logged_top = events[0]["data"]["answer"]["results"][0]["predictions"][0]
    assert (logged_top["label"], logged_top["probability"]) == (
        top.label,
        pytest.approx(top.probability),
    )
    assert events[2]["data"]["error"]["field"].startswith("images[0]")

    sha = hashlib.sha256(photo).hexdigest()
    assert [e["data"]["inputs"][0]["sha256"] for e in events[:2]] == [sha, sha]
    stored = logged.keys("acme", "inputs/")
    assert stored == sorted(
        f"acme/prediction-log/inputs/sha256/{d[:2]}/{d}"
        for d in (sha, hashlib.sha256(b"not an image").hexdigest())
    )  # the photo sent twice is there once
    body = logged.s3.get_object(
        Bucket="results",
        Key=stored[stored.index(f"acme/prediction-log/inputs/sha256/{sha[:2]}/{sha}")],
    )["Body"].read()
    assert body == photo
    assert logged.events("globex") == []  # nothing of acme's in globex's log

    logged.classify("globex", jpeg(2))
    (theirs,) = logged.events("globex", at_least=1)
    assert theirs["data"]["tenant"] == "globex"
    assert len(logged.events("acme")) == 3  # and nothing of globex's in acme's


def test_oip_calls_are_logged_over_grpc_and_rest_and_verify_them(logged: Logged) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    headers = {"authorization": f"Bearer {TOKENS['globex']}"}
    before = len(logged.events("globex"))
    photos = np.array([jpeg(10), jpeg(11)], dtype=np.object_)
    encoded_input = grpcclient.InferInput("images", [2], "BYTES")
    encoded_input.set_data_from_numpy(photos)
    by_grpc = grpcclient.InferenceServerClient(logged.server.target).infer(
        "tiny", [encoded_input], headers=headers
    )
    pixels = np.random.default_rng(12).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
    pixels_input = httpclient.InferInput("pixels", [1, 32, 32, 3], "UINT8")
    pixels_input.set_data_from_numpy(pixels)
    port = logged.server.running.http_port  # type: ignore[attr-defined]
    by_rest = httpclient.InferenceServerClient(f"127.0.0.1:{port}").infer(
        "tiny", [pixels_input], headers=headers
    )

    events = logged.events("globex", at_least=before + 2)[before:]
    assert len(events) == 2
    grpc_event, rest_event = sorted(events, key=lambda e: len(e["data"]["inputs"]), reverse=True)
    assert [i["sha256"] for i in grpc_event["data"]["inputs"]] == [
        hashlib.sha256(bytes(p)).hexdigest() for p in photos
    ]
    assert (
        rest_event["data"]["inputs"][0]["sha256"] == hashlib.sha256(pixels[0].tobytes()).hexdigest()
    )
    assert rest_event["data"]["inputs"][0]["pixels"] == [32, 32, 3]
    assert grpc_event["data"]["door"] != rest_event["data"]["door"]
    for event, result in ((grpc_event, by_grpc), (rest_event, by_rest)):
        answered = [r["predictions"][0]["probability"] for r in event["data"]["answer"]["results"]]
        assert answered == pytest.approx(result.as_numpy("probabilities").max(axis=1).tolist())
        assert [r["provenance"]["input_sha256"] for r in event["data"]["answer"]["results"]] == [
            i["sha256"] for i in event["data"]["inputs"]
        ]
    code, report = logged.verify(log_uri("globex"))
    assert code == 0, report


def test_no_tenant_reaches_another_tenants_log_through_the_api(logged: Logged) -> None:
    logged.classify("acme", jpeg(3))
    logged.events("acme", at_least=1)
    target = logged.server.target
    with perito.Client(target, token=TOKENS["globex"]) as globex:
        for source in (log_uri("acme"), log_uri("acme") + "inputs/", log_uri("acme") + "records/"):
            with pytest.raises(perito.PermissionDeniedError) as caught:
                globex.submit_job(source, model="tiny", output_uri="s3://results/globex/out/")
            assert "acme" not in str(caught.value).replace(source, "")
        with pytest.raises(perito.PermissionDeniedError):
            globex.submit_job(
                "s3://inspections/globex/", model="tiny", output_uri=log_uri("acme") + "records/"
            )


def test_verify_passes_an_untouched_log_and_names_a_swapped_image(logged: Logged) -> None:
    logged.classify("acme", jpeg(4), jpeg(5))
    logged.events("acme", at_least=1)
    code, report = logged.verify(log_uri("acme"))
    assert code == 0, report
    assert "every check passed" in report

    key = logged.keys("acme", "inputs/")[0]
    original = logged.s3.get_object(Bucket="results", Key=key)["Body"].read()
    logged.s3.put_object(Bucket="results", Key=key, Body=jpeg(99))
    try:
        code, report = logged.verify(log_uri("acme"), "--json")
        other = hashlib.sha256(jpeg(5)).hexdigest()
        if other == key.rpartition("/")[2]:
            other = hashlib.sha256(jpeg(4)).hexdigest()
        one = logged.verify(log_uri("acme"), "--input-sha256", other)  # another photo's answers
    finally:
        logged.s3.put_object(Bucket="results", Key=key, Body=original)
    assert code == 1
    result = json.loads(report[report.index("{") :])
    bad = [item for item in result["items"] if not item["ok"]]
    assert bad and {item["input_sha256"] for item in bad} == {key.rpartition("/")[2]}
    assert all(item["checks"]["input"] == "mismatch" for item in bad)
    assert all("swapped image" in " ".join(item["problems"]) for item in bad)
    assert one[0] == 0 and "1 images checked: every check passed" in one[1], one[1]
    assert logged.verify(log_uri("acme"))[0] == 0  # put back: passes again


def test_verify_names_a_replaced_artifact(logged: Logged, tmp_path: Path) -> None:
    import torch

    from perito_training.export import export_torchscript
    from tests.helpers import TINY_INPUT, tiny_network

    logged.classify("acme", jpeg(6))
    logged.events("acme", at_least=1)
    pages = logged.s3.get_paginator("list_objects_v2").paginate(
        Bucket="models", Prefix="prediction-log-tests/"
    )
    (artifact,) = [
        o["Key"]
        for page in pages
        for o in page.get("Contents", [])
        if o["Key"].endswith("model.pt")
    ]
    original = logged.s3.get_object(Bucket="models", Key=artifact)["Body"].read()
    torch.manual_seed(7)
    export_torchscript(tiny_network(3), TINY_INPUT, tmp_path / "other.pt")
    logged.s3.put_object(Bucket="models", Key=artifact, Body=(tmp_path / "other.pt").read_bytes())
    try:
        code, report = logged.verify(log_uri("acme"))
    finally:
        logged.s3.put_object(Bucket="models", Key=artifact, Body=original)
    assert code == 1, report
    assert "artifact" in report and "mismatch" in report
    assert "every check passed" not in report


def dropped(port: int, reason: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "perito_prediction_log_dropped_total"
        and sample.labels.get("reason") == reason
    )


def test_a_log_store_that_is_down_costs_callers_nothing_and_counts_the_drops(
    tmp_path: Path, tiny_model_file: Path
) -> None:
    registry = tiny_registry(tmp_path / "registry", tiny_model_file)
    with moto_s3_server() as endpoint:
        pass  # started and stopped: its port now refuses connections, as a dead store does
    with (
        redis_server() as redis_url,
        ServerThread.serving(
            registry,
            tmp_path / "cache",
            redis_url=redis_url,
            metrics_port=0,
            s3_endpoint_url=endpoint,
            prediction_log_uri="s3://logs/perito/",
            prediction_log_flush_s=0.1,
        ) as server,
    ):
        stub = service_pb2_grpc.PeritoStub(grpc.insecure_channel(server.target))
        request = classify_pb2.ClassifyRequest(
            model="tiny", images=[image_pb2.Image(content=jpeg(n)) for n in range(2)]
        )
        for _ in range(20):
            response = stub.Classify(request, timeout=10)
            assert [len(r.predictions) for r in response.results] == [3, 3]
        port = server.running.metrics_port  # type: ignore[attr-defined]
        deadline = time.monotonic() + 60
        while dropped(port, "storage_error") < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dropped(port, "storage_error") == 20
        assert dropped(port, "queue_full") == 0


def test_the_tenants_file_keeps_each_log_in_its_own_tenants_storage(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.yaml"

    def tenants_list(globex_log: str) -> tuple[int, str]:
        tenants.write_text(
            textwrap.dedent(
                f"""\
                tenants:
                  - name: globex
                    tokens: ["{hash_token("g")}"]
                    roles: [classify]
                    storage: {{write: ["s3://results/globex/"]}}
                    prediction_log: {{uri: "{globex_log}"}}
                """
            )
        )
        result = run_perito(
            "tenants", "list", "--tenants-file", str(tenants), env=subprocess_env(), check=False
        )
        return result.returncode, result.stdout + result.stderr

    code, shown = tenants_list("s3://results/globex/log/")
    assert code == 0, shown
    assert "prediction log s3://results/globex/log/" in shown
    code, shown = tenants_list("s3://results/acme/prediction-log/")
    assert code != 0
    assert "prediction_log" in shown and "s3://results/acme/prediction-log/" in shown


def test_oip_quality_parameter_refusals_are_logged_over_grpc_and_rest(logged: Logged) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    headers = {"authorization": f"Bearer {TOKENS['globex']}"}
    before = len(logged.events("globex"))
    photos = np.array([jpeg(20)], dtype=np.object_)
    by_grpc = grpcclient.InferInput("images", [1], "BYTES")
    by_grpc.set_data_from_numpy(photos)
    by_rest = httpclient.InferInput("images", [1], "BYTES")
    by_rest.set_data_from_numpy(photos, binary_data=True)
    port = logged.server.running.http_port  # type: ignore[attr-defined]
    clients: list[Any] = [
        (grpcclient.InferenceServerClient(logged.server.target), by_grpc),
        (httpclient.InferenceServerClient(f"127.0.0.1:{port}"), by_rest),
    ]
    for client, tensor in clients:
        with pytest.raises(InferenceServerException, match="quality_policy"):
            client.infer(
                "tiny", [tensor], headers=headers, parameters={"quality_policy": "sometimes"}
            )

    events = logged.events("globex", at_least=before + 2)[before:]
    assert len(events) == 2
    assert [e["data"]["outcome"] for e in events] == ["INVALID_ARGUMENT"] * 2
    assert [e["data"]["error"]["field"] for e in events] == ["quality_policy"] * 2
    assert len({e["data"]["door"] for e in events}) == 2
