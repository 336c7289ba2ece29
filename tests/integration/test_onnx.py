"""ONNX models end to end: imported with the CLI, served over gRPC and by a real worker.

Two Keras-shaped networks built in torch, normalisation outside the graph, exported with
`torch.onnx.export` (as a Keras user's `tf2onnx` would give them): a waste classifier (NHWC,
pixels / 255, one sigmoid unit for organic / recyclable) and a minerals classifier (NHWC,
Caffe-style BGR minus the ImageNet mean, 10-class softmax). `perito models import` publishes
them into an S3 registry (a local S3-protocol server) with their contracts; `Classify` over a
real socket and a bulk job through a real `perito worker` process must answer exactly what
ONNX Runtime answers when fed, by hand, the same decoded and resized pixels prepared as the
Keras pipeline would. A contract that contradicts the graph is refused at import, naming the
field; a tampered `model.onnx` is refused when it would load.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import perito
from perito_core.imaging import load_model_input
from perito_core.models.registry import ModelRegistry
from perito_core.storage import S3Options, make_s3_client
from tests.helpers import MakeStores, ServerThread, WorkerProcess, run_perito
from tests.onnx_helpers import (
    CAFFE_MEAN_BGR,
    MINERALS_LABELS,
    WASTE_LABELS,
    caffe_preprocess,
    keras_rescale,
    minerals_model,
    ort_probabilities,
    waste_model,
)
from tests.processes import free_port

pytest.importorskip("onnxruntime", reason="ONNX Runtime (perito[serve]) not installed")

pytestmark = pytest.mark.integration

REGISTRY = "s3://models/onnx-tests"
SIZE = 96


@dataclass
class Imported:
    """A model as imported: its file, labels and how a Keras pipeline prepares its input."""

    file: Path
    labels: list[str]
    keras_preprocess: Callable[[np.ndarray], np.ndarray]


@dataclass
class OnnxService:
    server: ServerThread
    client: perito.Client
    registry: ModelRegistry
    env: dict[str, str]
    work: Path
    models: dict[str, Imported]
    photos: dict[str, bytes]

    def expected(self, name: str) -> np.ndarray:
        """ONNX Runtime's probabilities for every photo, fed by hand as in training."""
        model = self.models[name]
        spec = self.registry.manifest(name, "1").input.spec()
        pixels = np.stack([load_model_input(data, spec) for data in self.photos.values()])
        output = ort_probabilities(model.file, model.keras_preprocess(pixels))
        if output.shape[1] == 1:  # the sigmoid unit: p(recyclable)
            return np.concatenate([1 - output, output], axis=1)
        return output


def _vector(predictions: list[perito.Prediction], classes: int) -> np.ndarray:
    vector = np.full(classes, np.nan)
    for prediction in predictions:
        vector[prediction.class_index] = prediction.probability
    return vector


@pytest.fixture(scope="module")
def onnx_service(s3_stores: MakeStores, photos: dict[str, Path]) -> Iterator[OnnxService]:
    stores = s3_stores("onnx", REGISTRY)
    work = stores.work
    models = {
        "waste": Imported(waste_model(work / "waste.onnx", SIZE), WASTE_LABELS, keras_rescale),
        "minerals": Imported(
            minerals_model(work / "minerals.onnx", SIZE), MINERALS_LABELS, caffe_preprocess
        ),
    }
    for name, model in models.items():
        (work / f"{name}.txt").write_text("\n".join(model.labels) + "\n")
    env = stores.worker_env()
    common = ["--input-size", str(SIZE), "--alias", "production"]
    run_perito(
        *("models", "import", str(models["waste"].file), "--name", "waste"),
        *("--labels", str(work / "waste.txt"), *common, "--resize-mode", "squash"),
        *("--layout", "NHWC", "--scale", "1/255", "--output", "sigmoid"),
        env=env,
    )
    run_perito(
        *("models", "import", str(models["minerals"].file), "--name", "minerals"),
        *("--labels", str(work / "minerals.txt"), *common),
        *("--layout", "nhwc", "--scale", "1", "--channel-order", "BGR"),
        *("--mean", ",".join(map(str, CAFFE_MEAN_BGR))),
        env=env,
    )
    registry = stores.open_registry("test-cache")
    photo_bytes = {name: path.read_bytes() for name, path in photos.items()}
    with (
        ServerThread(stores.server_settings(job_chunk_size=4)) as server,
        perito.Client(server.target, timeout=60) as client,
        WorkerProcess(env, work / "worker.log").wait_ready(),
    ):
        yield OnnxService(server, client, registry, env, work, models, photo_bytes)


def test_import_records_the_contract_in_the_manifest(onnx_service: OnnxService) -> None:
    waste = onnx_service.registry.manifest("waste", "1")
    assert waste.artifact.format == "onnx" and waste.artifact.file == "model.onnx"
    assert waste.tensor is not None
    assert (waste.tensor.layout, waste.tensor.dtype, waste.tensor.output) == (
        "NHWC",
        "float32",
        "sigmoid",
    )
    assert waste.tensor.scale == pytest.approx(1 / 255)
    assert waste.input.resize_mode == "squash"
    minerals = onnx_service.client.get_model("minerals")
    card = minerals.versions[-1].card
    assert card["artifact"]["format"] == "onnx"
    assert card["tensor"]["channel_order"] == "BGR"
    assert card["tensor"]["mean"] == list(CAFFE_MEAN_BGR)
    assert minerals.aliases == {"production": "1"}
    shown = run_perito(
        "models", "show", "waste", "--server", onnx_service.server.target, env=onnx_service.env
    ).stdout
    assert "onnx input: NHWC float32 RGB, (pixel x 0.00392157 - mean [0, 0, 0])" in shown
    assert "output: sigmoid" in shown


@pytest.mark.parametrize("name", ["waste", "minerals"])
def test_classify_answers_what_onnx_runtime_answers_on_the_same_pixels(
    onnx_service: OnnxService, name: str
) -> None:
    labels = onnx_service.models[name].labels
    expected = onnx_service.expected(name)
    # The photos must tell apart: a constant answer would pass with any preprocessing.
    assert float(expected.std(axis=0).max()) > 1e-3
    results = onnx_service.client.classify(
        list(onnx_service.photos.values()), model=name, version="production", top_k=len(labels)
    )
    served = np.stack([_vector(r.predictions, len(labels)) for r in results])
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert {r.form for r in results} == {"onnxruntime-fp32"}
    assert [r.predictions[0].label for r in results] == [labels[i] for i in expected.argmax(axis=1)]


@pytest.mark.parametrize("name", ["waste", "minerals"])
def test_a_bulk_job_through_a_worker_answers_the_same(onnx_service: OnnxService, name: str) -> None:
    labels = onnx_service.models[name].labels
    handle = onnx_service.client.submit_job(
        list(onnx_service.photos.values()), model=name, top_k=len(labels)
    )
    job = handle.wait(timeout=120)
    assert job.state is perito.JobState.SUCCEEDED, job
    assert job.succeeded == len(onnx_service.photos)
    items = sorted(onnx_service.client.job(job.id).results(), key=lambda item: item.index)
    assert all(item.classification is not None for item in items)
    served = np.stack(
        [_vector(item.classification.predictions, len(labels)) for item in items]  # type: ignore[union-attr]
    )
    np.testing.assert_allclose(served, onnx_service.expected(name), atol=1e-5)
    assert {item.classification.form for item in items} == {"onnxruntime-fp32"}  # type: ignore[union-attr]


def test_a_contract_that_contradicts_the_graph_is_refused_at_import(
    onnx_service: OnnxService,
) -> None:
    waste = onnx_service.models["waste"]
    base = [
        *("models", "import", str(waste.file), "--name", "waste"),
        *("--labels", str(onnx_service.work / "waste.txt"), "--input-size", str(SIZE)),
        *("--scale", "1/255", "--output", "sigmoid"),
    ]
    env = onnx_service.env
    transposed = run_perito(*base, "--layout", "NCHW", env=env, check=False)
    assert transposed.returncode == 1
    # The error names the file the user gave, not the name it would be stored under.
    assert (
        f"{waste.file.name}: layout NCHW contradicts input 'input' of shape [batch, 96, 96, 3]"
        in (transposed.stderr)
    )
    assert "which is NHWC" in transposed.stderr
    unknown = run_perito(*base, "--layout", "NCWH", env=env, check=False)
    assert unknown.returncode == 2
    assert "Invalid value for '--layout': 'NCWH'" in unknown.stderr
    smaller = run_perito(*base, "--layout", "NHWC", "--input-size", "64", env=env, check=False)
    assert smaller.returncode == 1 and "check the input size (64x64)" in smaller.stderr
    missing = [a for a in base if a not in ("--scale", "1/255")]
    unscaled = run_perito(*missing, "--layout", "NHWC", env=env, check=False)
    assert unscaled.returncode == 2 and "needs its input contract: --scale" in unscaled.stderr
    assert onnx_service.registry.list_versions("waste") == ["1"]  # nothing published


def test_a_tampered_model_onnx_is_refused_when_it_would_load(
    onnx_service: OnnxService, s3_endpoint: str
) -> None:
    run_perito(
        *("models", "import", str(onnx_service.models["waste"].file), "--name", "tampered"),
        *("--labels", str(onnx_service.work / "waste.txt"), "--input-size", str(SIZE)),
        *("--layout", "NHWC", "--scale", "1/255", "--output", "sigmoid"),
        env=onnx_service.env,
    )
    s3 = make_s3_client(S3Options(endpoint_url=s3_endpoint))
    key = "onnx-tests/models/tampered/1/model.onnx"
    data = bytearray(s3.get_object(Bucket="models", Key=key)["Body"].read())
    data[-1] ^= 0xFF
    s3.put_object(Bucket="models", Key=key, Body=bytes(data))
    photo = next(iter(onnx_service.photos.values()))
    with pytest.raises(perito.FailedPreconditionError, match="sha256") as refused:
        onnx_service.client.classify([photo], model="tampered")
    assert refused.value.reason == "MODEL_CHECKSUM_MISMATCH"


def test_the_web_page_classifies_with_an_onnx_model(onnx_service: OnnxService) -> None:
    """The web page's API (uvicorn on a real port, gRPC behind it) answers the same."""
    httpx = pytest.importorskip("httpx")
    uvicorn = pytest.importorskip("uvicorn")
    from perito_web.app import create_app

    port = free_port()
    config = uvicorn.Config(
        create_app(onnx_service.server.target, loopback_only=True),
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not web.started:
            assert time.monotonic() < deadline, "the web app did not start"
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            http.headers["X-CSRF-Token"] = http.get("/api/session").json()["csrf"]
            names = list(onnx_service.photos)
            answer = http.post(
                "/api/classify",
                data={"model": "waste@production", "top_k": "2"},
                files=[
                    ("image", (f"{n}.jpg", onnx_service.photos[n], "image/jpeg")) for n in names
                ],
            )
            assert answer.status_code == 200, answer.text
            served = np.array(
                [
                    [next(p["probability"] for p in r["predictions"] if p["class_index"] == i)
                     for i in range(2)]
                    for r in answer.json()
                ]
            )  # fmt: skip
            np.testing.assert_allclose(served, onnx_service.expected("waste"), atol=1e-5)
            card = http.get("/api/models/waste").json()["versions"][-1]["card"]
            assert card["tensor"]["output"] == "sigmoid"
    finally:
        web.should_exit = True
        thread.join(timeout=10)


# tritonclient's generated `inference.*` messages clash with the server's own in one process
# (duplicate symbols in protobuf's pool), so the client runs in its own, as a user's would.
TRITON_CALL = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient

target, model, *paths = sys.argv[1:]
client = grpcclient.InferenceServerClient(target)
images = np.array([open(p, "rb").read() for p in paths], dtype=np.object_)
tensor = grpcclient.InferInput("images", list(images.shape), "BYTES")
tensor.set_data_from_numpy(images)
result = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput("probabilities")])
print(json.dumps({
    "platform": client.get_model_metadata(model).platform,
    "probabilities": result.as_numpy("probabilities").tolist(),
}))
"""


def test_the_open_inference_protocol_serves_an_onnx_model(
    onnx_service: OnnxService, photos: dict[str, Path]
) -> None:
    """tritonclient's ModelMetadata and ModelInfer (BYTES images) over the same gRPC port."""
    pytest.importorskip("tritonclient", reason="tritonclient (a test dependency) not installed")
    paths = [str(photos[name]) for name in onnx_service.photos]
    answer = subprocess.run(
        [sys.executable, "-c", TRITON_CALL, onnx_service.server.target, "minerals", *paths],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(answer.stdout)
    assert result["platform"] == "onnxruntime_onnx"
    np.testing.assert_allclose(
        np.array(result["probabilities"]), onnx_service.expected("minerals"), atol=1e-5
    )
