"""Provenance and the card's figures on every answer, through every door, over real sockets.

One server (gRPC and HTTP) and one `perito worker` process over a registry folder holding
the tiny model three times: `carded` (a card with per-class figures and a reliability curve
whose every bin holds 100 images), `sparse` (a curve of 5 images a bin: too few to say) and
`plain` (no card, as an imported model). Every hash is checked against `sha256sum` of the
file on disk: the photos sent, the registry's `model.pt`.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

import perito
from perito_core.models.registry import ModelRegistry
from tests.conftest import publish_tiny
from tests.helpers import ServerThread, Stores, WorkerProcess

pytestmark = pytest.mark.integration

LABELS = ["minor", "moderate", "severe"]
PHOTOS = ("coffee", "chelsea", "rocket")
PER_CLASS = {
    "minor": {"precision": 0.91, "recall": 0.82, "f1": 0.86, "support": 40},
    "moderate": {"precision": 0.73, "recall": 0.64, "f1": 0.68, "support": 30},
    "severe": {"precision": 0.95, "recall": 0.97, "f1": 0.96, "support": 30},
}


def curve(count: int) -> list[dict[str, float | int]]:
    """15 equal-width bins of `count` images each, bin i right for 0.30 + 0.04 i of them."""
    return [
        {"lower": i / 15, "upper": (i + 1) / 15, "count": count, "accuracy": 0.30 + 0.04 * i}
        for i in range(15)
    ]


def bin_accuracy(probability: float) -> float:
    """What `curve` says for a top-1 `probability`: the bin with lower < p <= upper."""
    index = next(i for i in range(15) if i / 15 < probability <= (i + 1) / 15)
    return 0.30 + 0.04 * index


def sha256sum(path: Path) -> str:
    """The coreutils tool's answer, not Python's."""
    out = subprocess.run(["sha256sum", str(path)], check=True, capture_output=True, text=True)
    return out.stdout.split()[0]


@dataclass
class Served:
    server: ServerThread
    stores: Stores
    photos: dict[str, Path]
    artifact: Path  # carded's model.pt in the registry folder

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.server.running.http_port}"  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_file: Path,
    photos: dict[str, Path],
    redis_url: str,
) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("provenance")
    stores = Stores(work, redis_url)
    registry = ModelRegistry.open(stores.registry_uri, cache_dir=work / "publish-cache")
    card = {"metrics": {"per_class": PER_CLASS, "split": "test"}}
    publish_tiny(
        registry, tiny_model_file, "carded", calibration={"reliability": curve(100)}, **card
    )
    publish_tiny(registry, tiny_model_file, "sparse", calibration={"reliability": curve(5)})
    publish_tiny(registry, tiny_model_file, "plain")
    [artifact] = [p for p in Path(stores.registry_uri).rglob("model.pt") if "carded" in p.parts]
    images = work / "claims"
    images.mkdir()
    sent = {}
    for name in PHOTOS:
        sent[name] = images / f"{name}.jpg"
        sent[name].write_bytes(photos[name].read_bytes())
    settings = stores.server_settings(http_port=0, watchdog_interval_s=1)
    with (
        ServerThread(settings) as server,
        WorkerProcess(stores.worker_env(), work / "worker.log") as worker,
    ):
        worker.wait_ready()
        yield Served(server, stores, sent, artifact)


def check_provenance(provenance: perito.Provenance, served: Served, photo: str) -> None:
    assert provenance.input_sha256 == sha256sum(served.photos[photo])
    assert provenance.model == "carded"
    assert provenance.model_version == "1"
    assert provenance.artifact_sha256 == sha256sum(served.artifact)
    assert provenance.form == "torchscript-fp32"
    assert provenance.form_files == {"model.pt": sha256sum(served.artifact)}


def test_the_sdk_answer_names_the_photo_and_the_model_files_by_their_sha256(
    served: Served,
) -> None:
    paths = [served.photos[name] for name in PHOTOS]
    with perito.Client(served.server.target, timeout=60) as client:
        results = client.classify(
            paths, model="carded", metadata=[("x-request-id", "claim-17-check")]
        )
    for name, result in zip(PHOTOS, results, strict=True):
        assert result.provenance is not None
        check_provenance(result.provenance, served, name)
        assert result.provenance.request_id == "claim-17-check"
        assert result.provenance.quality_issues == []

    async def classify_async() -> list[perito.Classification]:
        async with perito.AsyncClient(served.server.target, timeout=60) as client:
            return await client.classify(paths, model="carded")

    for name, result in zip(PHOTOS, asyncio.run(classify_async()), strict=True):
        assert result.provenance is not None
        check_provenance(result.provenance, served, name)
        assert result.provenance.request_id  # the server's own, logged with the call


def test_the_card_figures_come_with_the_answer_and_only_where_the_card_has_them(
    served: Served,
) -> None:
    with perito.Client(served.server.target, timeout=60) as client:
        [carded] = client.classify([served.photos["coffee"]], model="carded", top_k=3)
        [sparse] = client.classify([served.photos["coffee"]], model="sparse", top_k=3)
        [plain] = client.classify([served.photos["coffee"]], model="plain", top_k=3)
    assert carded.expected_accuracy == pytest.approx(bin_accuracy(carded.probability), abs=1e-6)
    for prediction in carded.predictions:
        scores = PER_CLASS[prediction.label]
        assert prediction.card_precision == pytest.approx(scores["precision"], abs=1e-6)
        assert prediction.card_recall == pytest.approx(scores["recall"], abs=1e-6)
    # 5 images a bin are too few to say; no card, no figures.
    assert sparse.expected_accuracy is None
    assert plain.expected_accuracy is None
    for prediction in (*sparse.predictions, *plain.predictions):
        assert prediction.card_precision is None and prediction.card_recall is None


def test_the_json_api_answer_carries_provenance_and_figures(served: Served) -> None:
    body = {
        "images": [
            {"id": name, "content": base64.b64encode(served.photos[name].read_bytes()).decode()}
            for name in PHOTOS
        ]
    }
    response = httpx.post(
        f"{served.http}/v1/models/carded:classify",
        json=body,
        headers={"x-request-id": "json-call-1"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    for name, result in zip(PHOTOS, response.json()["results"], strict=True):
        provenance = result["provenance"]
        assert provenance["input_sha256"] == sha256sum(served.photos[name])
        assert provenance["artifact_sha256"] == sha256sum(served.artifact)
        assert provenance["form_files"] == [
            {"file": "model.pt", "sha256": sha256sum(served.artifact)}
        ]
        assert provenance["request_id"] == "json-call-1"
        top = result["predictions"][0]
        assert result["expected_accuracy"] == pytest.approx(bin_accuracy(top["probability"]))
        assert top["card_precision"] == pytest.approx(PER_CLASS[top["label"]]["precision"])
    plain = httpx.post(f"{served.http}/v1/models/plain:classify", json=body, timeout=60).json()
    assert "expected_accuracy" not in plain["results"][0]
    assert "card_precision" not in plain["results"][0]["predictions"][0]


def test_oip_responses_carry_provenance_as_parameters(served: Served) -> None:
    import numpy as np

    data = [served.photos[name].read_bytes() for name in PHOTOS]
    digests = [sha256sum(served.photos[name]) for name in PHOTOS]
    tensor = np.array(data, dtype=np.object_)

    grpc_client = grpcclient.InferenceServerClient(served.server.target)
    grpc_input = grpcclient.InferInput("images", [len(data)], "BYTES")
    grpc_input.set_data_from_numpy(tensor)
    answer = grpc_client.infer("carded", [grpc_input], headers={"x-request-id": "oip-grpc-1"})
    parameters = answer.get_response().parameters
    assert json.loads(parameters["perito_input_sha256"].string_param) == digests
    assert parameters["perito_artifact_sha256"].string_param == sha256sum(served.artifact)
    assert parameters["perito_form"].string_param == "torchscript-fp32"
    assert json.loads(parameters["perito_form_sha256"].string_param) == {
        "model.pt": sha256sum(served.artifact)
    }
    assert parameters["perito_model_version"].string_param == "1"
    assert parameters["perito_request_id"].string_param == "oip-grpc-1"
    probabilities = answer.as_numpy("probabilities")
    expected = json.loads(parameters["perito_expected_accuracy"].string_param)
    assert expected == pytest.approx([bin_accuracy(float(row.max())) for row in probabilities])

    http_client = httpclient.InferenceServerClient(served.http.removeprefix("http://"))
    http_input = httpclient.InferInput("images", [len(data)], "BYTES")
    http_input.set_data_from_numpy(tensor, binary_data=True)
    rest = http_client.infer("plain", [http_input]).get_response()["parameters"]
    assert json.loads(rest["perito_input_sha256"]) == digests
    assert rest["perito_artifact_sha256"] == sha256sum(served.artifact)  # the same model.pt
    assert json.loads(rest["perito_expected_accuracy"]) == [None, None, None]


def test_a_bulk_job_records_provenance_in_every_result(served: Served) -> None:
    with perito.Client(served.server.target, timeout=60) as client:
        handle = client.submit_job(str(served.photos["coffee"].parent), model="carded")
        job = handle.wait(timeout=120)
        assert job.succeeded == len(PHOTOS), job
        listed = list(handle.results())
    by_id = {Path(item.uri).stem: item for item in listed}
    for name in PHOTOS:
        classification = by_id[name].classification
        assert classification is not None and classification.provenance is not None
        check_provenance(classification.provenance, served, name)
        assert classification.provenance.request_id == job.id
        assert classification.expected_accuracy == pytest.approx(
            bin_accuracy(classification.probability), abs=1e-6
        )

    folder = Path(job.output_uri)
    deadline = time.monotonic() + 30
    while not (folder / "results.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    for line in lines:
        name = Path(line["uri"]).stem
        provenance = line["provenance"]
        assert provenance["input_sha256"] == sha256sum(served.photos[name])
        assert provenance["artifact_sha256"] == sha256sum(served.artifact)
        assert provenance["form_files"] == [
            {"file": "model.pt", "sha256": sha256sum(served.artifact)}
        ]
        assert provenance["request_id"] == job.id
    with (folder / "results.csv").open(newline="") as table:
        rows = list(csv.DictReader(table))
    assert {Path(row["uri"]).stem: row["input_sha256"] for row in rows} == {
        name: sha256sum(served.photos[name]) for name in PHOTOS
    }
    for row in rows:
        assert row["artifact_sha256"] == sha256sum(served.artifact)
        assert (row["model"], row["model_version"], row["form"]) == (
            "carded",
            "1",
            "torchscript-fp32",
        )
        assert row["request_id"] == job.id


def test_a_compiled_form_s_answer_names_its_own_files_by_their_sha256(
    fp32_form_registry: Path, photos: dict[str, Path], tmp_path: Path
) -> None:
    with (
        ServerThread.serving(fp32_form_registry, tmp_path, precision="fp32") as server,
        perito.Client(server.target, timeout=60) as client,
    ):
        [result] = client.classify([photos["coffee"]], model="tiny")
    provenance = result.provenance
    assert provenance is not None and provenance.form == "openvino-fp32"
    [version] = [p for p in fp32_form_registry.rglob("model.pt") if "tiny" in p.parts]
    files = {
        str(path.relative_to(version.parent)): sha256sum(path)
        for path in (version.parent / "forms" / "openvino-fp32").rglob("*")
        if path.is_file()
    }
    assert provenance.form_files == files and len(files) >= 2  # the IR's .xml and .bin
    assert provenance.artifact_sha256 == sha256sum(version)
    assert provenance.input_sha256 == sha256sum(photos["coffee"])
