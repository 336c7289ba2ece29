"""The photo-quality gate through every door, over real sockets, on a model imported with
`perito models import --min-sharpness` as a user would.

The model (an ONNX graph: the image's mean colour over its L2 norm) answers NaN for an
all-black frame, so a black frame the gate refuses proves it never reached the model: the
non-finite counter does not move. Through a real server (gRPC and HTTP) and a real
`perito worker`:

- by default a poor photo is answered and flagged: `quality.issues` names BLURRY, UNIFORM,
  UNDEREXPOSED (the SDK, the JSON API, OIP's `perito_quality` response parameter, bulk results);
- with the REFUSE policy it fails with reason POOR_QUALITY naming its issues, and the SDK's
  `on_invalid="skip"` answers the other photo; OIP (tritonclient), all or nothing, fails the
  call naming the image;
- the card's threshold (set by the import flag) decides, and a request's override replaces it.
"""

from __future__ import annotations

import base64
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image, ImageFilter
from prometheus_client.parser import text_string_to_metric_families
from torch import nn
from tritonclient.utils import InferenceServerException

import perito
from tests.helpers import ServerThread, Stores, WorkerProcess, encoded, run_perito
from tests.onnx_helpers import export_onnx
from tests.processes import free_port

pytest.importorskip("onnxruntime", reason="ONNX Runtime (perito[serve]) not installed")
skimage_data = pytest.importorskip("skimage.data")

pytestmark = pytest.mark.integration

SIZE = 32
LABELS = ["red", "green", "blue"]
CARD_MIN_SHARPNESS = 100.0  # `perito models import --min-sharpness 100`
REASON = "POOR_QUALITY"


class ColourDirection(nn.Module):
    """NHWC pixels in [0, 1]; logits: the mean colour over its L2 norm, times 8. An all-black
    image is 0 / 0: NaN logits, if it ever reaches the model."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        colour = images.mean(dim=(1, 2))
        norm = torch.sqrt((colour * colour).sum(dim=1, keepdim=True))
        return 8.0 * colour / norm


_PHOTO = Image.fromarray(skimage_data.astronaut()).resize((96, 96), Image.Resampling.BOX)
# Sharpness about 4,000: clean.
SHARP = encoded(np.asarray(_PHOTO), "PNG")
# Sharpness about 80: over the default threshold (15), under the card's (100).
SOFT = encoded(np.asarray(_PHOTO.filter(ImageFilter.GaussianBlur(1.5))), "PNG")
# Sharpness about 9: blurry by any threshold here.
BLURRED = encoded(np.asarray(_PHOTO.filter(ImageFilter.GaussianBlur(3))), "PNG")
BLACK = encoded(np.zeros((96, 96, 3), dtype=np.uint8), "PNG")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def not_finite_count(port: int) -> float:
    return sum(
        value
        for (name, _), value in scrape(port).items()
        if name == "perito_model_outputs_refused_total"
    )


def rejected_count(port: int) -> float:
    return scrape(port).get(("perito_images_rejected_total", (("reason", REASON),)), 0.0)


def reason_of(body: dict[str, Any]) -> str:
    return str(next(d["reason"] for d in body["details"] if d["@type"].endswith("ErrorInfo")))


@dataclass
class Service:
    server: ServerThread
    client: perito.Client
    work: Path

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.server.running.http_port}"  # type: ignore[attr-defined]

    @property
    def metrics_port(self) -> int:
        return self.server.running.metrics_port  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Service]:
    work = tmp_path_factory.mktemp("quality")
    stores = Stores(work, redis_url)
    model = export_onnx(ColourDirection(), (1, SIZE, SIZE, 3), work / "colour.onnx")
    (work / "labels.txt").write_text("\n".join(LABELS) + "\n")
    env = stores.worker_env()
    run_perito(
        *("models", "import", str(model), "--name", "colour", "--labels", str(work / "labels.txt")),
        *("--input-size", str(SIZE), "--layout", "NHWC", "--scale", "1/255", "--output", "logits"),
        *("--min-sharpness", str(CARD_MIN_SHARPNESS)),
        env=env,
    )
    settings = stores.server_settings(http_port=free_port(), metrics_port=0)
    with (
        ServerThread(settings) as server,
        perito.Client(server.target, timeout=60) as client,
        WorkerProcess(env, work / "worker.log").wait_ready(),
    ):
        yield Service(server, client, work)


def test_the_import_flag_is_the_cards_threshold(service: Service) -> None:
    card = service.client.get_model("colour").versions[0].card
    assert card["quality"] == {
        "min_sharpness": CARD_MIN_SHARPNESS,
        "fitted_on": "perito models import",
    }


def test_poor_photos_are_answered_and_flagged_by_default(service: Service) -> None:
    sharp, soft, blurred = service.client.classify(
        [SHARP, SOFT, BLURRED], model="colour", ids=["sharp", "soft", "blurred"]
    )
    assert sharp.quality is not None and sharp.quality.issues == []
    assert (sharp.quality.width, sharp.quality.height, sharp.quality.resolution) == (96, 96, 3.0)
    # The card's 100 decides for the soft photo, which the default (15) would pass.
    assert soft.quality is not None and soft.quality.issues == ["BLURRY"]
    assert 15 < soft.quality.sharpness < CARD_MIN_SHARPNESS
    assert blurred.quality is not None and blurred.quality.issues == ["BLURRY"]
    assert all(result.predictions for result in (sharp, soft, blurred))
    # The provenance names the issues too (what a prediction log or dispute reads).
    assert blurred.provenance is not None and blurred.provenance.quality_issues == ["BLURRY"]
    assert sharp.provenance is not None and sharp.provenance.quality_issues == []


def test_a_request_override_changes_the_verdict(service: Service) -> None:
    soft, blurred = service.client.classify(
        [SOFT, BLURRED], model="colour", quality_thresholds={"min_sharpness": 50.0}
    )
    assert soft.quality is not None and soft.quality.issues == []
    assert blurred.quality is not None and blurred.quality.issues == ["BLURRY"]
    (sharp,) = service.client.classify(
        [SHARP], model="colour", quality_thresholds={"min_sharpness": 1e6}
    )
    assert sharp.quality is not None and sharp.quality.issues == ["BLURRY"]
    with pytest.raises(perito.InvalidArgumentError) as refused:
        service.client.classify(
            [SHARP], model="colour", quality_thresholds={"max_dark_fraction": 2.0}
        )
    assert refused.value.violations[0].field == "quality_thresholds.max_dark_fraction"


def test_refused_photos_fail_poor_quality_and_never_reach_the_model(service: Service) -> None:
    port = service.metrics_port
    not_finite, rejected = not_finite_count(port), rejected_count(port)
    with pytest.raises(perito.InvalidArgumentError) as refused:
        service.client.classify(
            [SHARP, BLURRED, BLACK],
            model="colour",
            ids=["sharp.png", "blurred.png", "black.png"],
            quality_policy="refuse",
        )
    assert refused.value.reason == REASON
    assert [v.field for v in refused.value.violations] == ["images[1]", "images[2]"]
    blurred, black = (v.description for v in refused.value.violations)
    assert "blurred.png" in blurred and "BLURRY (sharpness" in blurred
    assert "black.png" in black and "UNDEREXPOSED" in black and "UNIFORM" in black

    results = service.client.classify(
        [SHARP, BLURRED, BLACK], model="colour", quality_policy="refuse", on_invalid="skip"
    )
    assert isinstance(results[0], perito.Classification) and results[0].predictions
    assert [r.error.reason for r in results[1:] if isinstance(r, perito.RejectedImage)] == [
        REASON,
        REASON,
    ]
    # The black frame would have made the model answer NaN: it never ran on it.
    assert not_finite_count(port) == not_finite
    assert rejected_count(port) - rejected == 4  # two per refused call
    # Flagged only, the black frame reaches the model, which fails on it.
    with pytest.raises(perito.InvalidArgumentError) as ran:
        service.client.classify([BLACK], model="colour")
    assert ran.value.reason == "MODEL_OUTPUT_NOT_FINITE"


def _json_body(policy: str) -> dict[str, Any]:
    return {
        "images": [
            {"id": "sharp", "content": base64.b64encode(SHARP).decode()},
            {"id": "blurred", "content": base64.b64encode(BLURRED).decode()},
        ],
        "quality_policy": policy,
    }


def test_the_json_api_flags_and_refuses(service: Service) -> None:
    url = f"http://{service.http}/v1/models/colour:classify"
    answer = httpx.post(url, json=_json_body("QUALITY_POLICY_FLAG"), timeout=30)
    assert answer.status_code == 200, answer.text
    sharp, blurred = answer.json()["results"]
    assert sharp["quality"]["issues"] == []
    assert sharp["quality"]["width"] == 96
    assert blurred["quality"]["issues"] == ["BLURRY"]

    refused = httpx.post(url, json=_json_body("QUALITY_POLICY_REFUSE"), timeout=30)
    assert refused.status_code == 400
    body = refused.json()["error"]
    assert reason_of(body) == REASON and "blurred" in body["message"]


def test_oip_grpc_carries_quality_and_refuses_all_or_nothing(service: Service) -> None:
    client = grpcclient.InferenceServerClient(service.server.target)
    tensor = grpcclient.InferInput("images", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([SHARP, BLURRED], dtype=np.object_))
    answer = client.infer("colour", [tensor])
    quality = json.loads(answer.get_response().parameters["perito_quality"].string_param)
    assert [q["issues"] for q in quality] == [[], ["BLURRY"]]

    with pytest.raises(InferenceServerException) as refused:
        client.infer("colour", [tensor], parameters={"quality_policy": "refuse"})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert REASON in refused.value.message() and "input 'images', image 1" in str(
        refused.value.message()
    )
    # An override passes it.
    passed = client.infer(
        "colour", [tensor], parameters={"quality_policy": "refuse", "min_sharpness": 1.0}
    )
    assert passed.as_numpy("probabilities").shape == (2, 3)


def test_oip_rest_carries_quality_and_refuses(service: Service) -> None:
    client = httpclient.InferenceServerClient(service.http)
    tensor = httpclient.InferInput("images", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([SHARP, BLURRED], dtype=np.object_), binary_data=True)
    answer = client.infer("colour", [tensor])
    quality = json.loads(answer.get_response()["parameters"]["perito_quality"])
    assert [q["issues"] for q in quality] == [[], ["BLURRY"]]
    with pytest.raises(InferenceServerException) as refused:
        client.infer("colour", [tensor], parameters={"quality_policy": "refuse"})
    assert REASON in str(refused.value.message())
    with pytest.raises(InferenceServerException) as bad:
        client.infer("colour", [tensor], parameters={"quality_policy": "maybe"})
    assert "quality_policy" in str(bad.value.message())


def test_bulk_results_carry_quality(service: Service) -> None:
    handle = service.client.submit_job(
        [SHARP, BLURRED], model="colour", inline=True, ids=["sharp", "blurred"]
    )
    job = handle.wait(timeout=120)
    assert job.state == perito.JobState.SUCCEEDED, job
    items = list(handle.results())
    by_id = {item.image_id: item for item in items}
    assert by_id["blurred"].classification is not None
    assert by_id["blurred"].classification.quality is not None
    assert by_id["blurred"].classification.quality.issues == ["BLURRY"]
    files = {
        Path(uri.removeprefix("file://")).suffix: Path(uri.removeprefix("file://"))
        for uri in job.result_uris
    }
    jsonl, table = files[".jsonl"], files[".csv"]
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [line["quality"]["issues"] for line in lines] == [[], ["BLURRY"]]
    assert lines[1]["quality"]["width"] == 96
    with table.open() as file:
        rows = list(csv.DictReader(file))
    assert [row["quality_issues"] for row in rows] == ["", "BLURRY"]
