"""Explanations end to end, over a real socket through the SDK, for a TorchScript model
published through the registry and the same network imported as ONNX with `perito models
import`: the heat map's peak lies where the class is decided.

The model is trained here in a few seconds on generated 32 x 32 photos of noise whose class
is which corner holds a small red square (`top-left` or `bottom-right`); it must look at that
corner to answer, so an explanation that does not point there is wrong.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import perito
from perito_core.models.registry import ModelRegistry
from tests.helpers import TINY_INPUT, ServerThread, perito_command, run_perito, subprocess_env
from tests.onnx_helpers import export_onnx

pytest.importorskip("onnxruntime", reason="ONNX Runtime (perito[serve]) not installed")

pytestmark = pytest.mark.integration

LABELS = ["top-left", "bottom-right"]
SIDE = 32
PATCH = 8  # pixels: the red square, 2 x 2 cells of the 8 x 8 heat map
MAX_EXPLANATIONS = 4  # the server's and the SDK's default


def corner_photos(classes: np.ndarray, seed: int) -> np.ndarray:
    """uint8 (N, 32, 32, 3) noise, each with a red square in its class's corner."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (len(classes), SIDE, SIDE, 3), dtype=np.uint8)
    for image, label in zip(images, classes, strict=True):
        at = 0 if label == 0 else SIDE - PATCH
        image[at : at + PATCH, at : at + PATCH] = (255, 0, 0)
    return images


def corner_network() -> nn.Module:
    """Normalised NCHW floats -> logits; flattened, not pooled, so it can tell where."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, len(LABELS)),
    )


def heavy_network() -> nn.Module:
    """Untrained, and slow on purpose: the 32 x 32 input upsampled to 512 x 512 and convolved
    (about 0.4 GFLOP an image), so that an explanation's 50 forward passes take far longer
    than the call's own one."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Upsample(scale_factor=16),
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, len(LABELS)),
    ).eval()


def normalise(images: np.ndarray) -> torch.Tensor:
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - 0.5) / 0.25  # TINY_INPUT's mean and std


def trained_network() -> nn.Module:
    classes = np.random.default_rng(1).integers(0, 2, 512)
    inputs, targets = normalise(corner_photos(classes, seed=2)), torch.from_numpy(classes)
    network = corner_network()
    optimiser = torch.optim.Adam(network.parameters(), lr=3e-3)
    for _ in range(4):
        for start in range(0, len(inputs), 64):
            loss = nn.functional.cross_entropy(
                network(inputs[start : start + 64]), targets[start : start + 64]
            )
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    network.eval()
    with torch.no_grad():
        check = np.array([0, 1] * 16)
        predicted = network(normalise(corner_photos(check, seed=3))).argmax(dim=1).numpy()
    assert (predicted == check).all(), "the corner model did not learn its task"
    return network


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


@dataclass
class Corners:
    server: ServerThread
    client: perito.Client
    work: Path
    photos: dict[str, bytes]  # "top-left-0.png" -> PNG bytes


@pytest.fixture(scope="module")
def corners(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corners]:
    from perito_training.export import export_torchscript

    work = tmp_path_factory.mktemp("explanations")
    network = trained_network()
    registry_root = work / "registry"
    registry = ModelRegistry.open(str(registry_root), cache_dir=work / "publish-cache")
    export_torchscript(network, TINY_INPUT, work / "model.pt")
    registry.publish("corners", work / "model.pt", labels=LABELS, input=TINY_INPUT)
    export_torchscript(heavy_network(), TINY_INPUT, work / "heavy.pt")
    registry.publish("heavy", work / "heavy.pt", labels=LABELS, input=TINY_INPUT)
    export_onnx(network, (1, 3, SIDE, SIDE), work / "corners.onnx")
    (work / "labels.txt").write_text("\n".join(LABELS) + "\n")
    env = subprocess_env(PERITO_REGISTRY=str(registry_root), PERITO_CACHE_DIR=str(work / "c"))
    run_perito(
        *("models", "import", str(work / "corners.onnx"), "--name", "corners-onnx"),
        *("--labels", str(work / "labels.txt"), "--input-size", str(SIDE)),
        *("--resize-mode", "squash", "--layout", "NCHW", "--scale", "1/255"),
        *("--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--output", "logits"),
        env=env,
    )
    classes = np.array([0, 1, 0, 1])
    photos = {
        f"{LABELS[label]}-{index}.png": png(image)
        for index, (label, image) in enumerate(
            zip(classes, corner_photos(classes, seed=4), strict=True)
        )
    }
    with (
        ServerThread.serving(
            registry_root,
            work / "cache",
            http_port=0,
            max_explanations_per_request=MAX_EXPLANATIONS,
        ) as server,
        perito.Client(server.target, timeout=60) as client,
    ):
        yield Corners(server, client, work, photos)


def peak(explanation: perito.Explanation) -> tuple[int, int]:
    grid = np.asarray(explanation.grid)
    assert grid.shape == (explanation.grid_height, explanation.grid_width)
    row, col = np.unravel_index(int(grid.argmax()), grid.shape)
    return int(row), int(col)


@pytest.mark.parametrize("model", ["corners", "corners-onnx"])
def test_the_heat_map_peaks_in_the_corner_that_decides(corners: Corners, model: str) -> None:
    ids = list(corners.photos)
    results = corners.client.classify(
        list(corners.photos.values()), model=model, ids=ids, explain=True
    )
    assert [r.predictions[0].label for r in results] == [i.rsplit("-", 1)[0] for i in ids]
    for result in results:
        explanation = result.explanation
        assert explanation is not None
        assert explanation.method == "occlusion"
        assert (explanation.grid_height, explanation.grid_width) == (8, 8)
        assert explanation.class_index == result.predictions[0].class_index
        assert explanation.label == result.predictions[0].label
        cells = [value for row in explanation.grid for value in row]
        assert max(cells) == pytest.approx(1.0) and min(cells) >= 0.0
        row, col = peak(explanation)
        # The square covers cells 0-1 (top left) or 6-7 (bottom right) of each side.
        square = {0, 1} if explanation.label == "top-left" else {6, 7}
        assert row in square and col in square, (result.image_id, row, col)
        with Image.open(io.BytesIO(explanation.overlay_png)) as overlay:
            assert overlay.format == "PNG" and overlay.size == (SIDE, SIDE)


def test_save_writes_the_overlay_png(corners: Corners, tmp_path: Path) -> None:
    photo = corners.photos["top-left-0.png"]
    [result] = corners.client.classify([photo], model="corners", explain=True)
    assert result.explanation is not None
    result.explanation.save(tmp_path / "x.png")
    assert (tmp_path / "x.png").read_bytes() == result.explanation.overlay_png
    with Image.open(tmp_path / "x.png") as saved:
        pixels = np.asarray(saved.convert("RGB")).astype(int)
    # The overlay is reddest over the square.
    redness = pixels[..., 0] - pixels[..., 2]
    assert redness[:PATCH, :PATCH].mean() > redness[PATCH:, PATCH:].mean()


def test_without_explain_no_explanation(corners: Corners) -> None:
    [result] = corners.client.classify([corners.photos["top-left-0.png"]], model="corners")
    assert result.explanation is None


def test_more_images_than_the_limit_are_refused_naming_explain(corners: Corners) -> None:
    photos = list(corners.photos.values())
    too_many = [*photos, photos[0]]  # 5, the server explains at most 4 per call
    with perito.Client(
        corners.server.target, limits=perito.Limits(max_explanations_per_request=64)
    ) as unsplit:
        with pytest.raises(perito.InvalidArgumentError) as refused:
            unsplit.classify(too_many, model="corners", explain=True)
        assert [v.field for v in refused.value.violations] == ["explain"]
        assert f"{MAX_EXPLANATIONS}" in str(refused.value)
        # The same images without explain are answered.
        assert len(unsplit.classify(too_many, model="corners")) == 5
    # The SDK's own limit splits an explained call into parts the server takes.
    assert all(
        r.explanation is not None
        for r in corners.client.classify(too_many, model="corners", explain=True)
    )


def test_the_json_api_answers_the_explanation(corners: Corners) -> None:
    port = corners.server.running.http_port  # type: ignore[attr-defined]
    body = {
        "images": [
            {"id": "a", "content": base64.b64encode(corners.photos["bottom-right-1.png"]).decode()}
        ],
        "explain": True,
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/models/corners-onnx:classify",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.load(response)
    explanation = answer["results"][0]["explanation"]
    assert explanation["label"] == "bottom-right"
    assert base64.b64decode(explanation["overlay_png"]).startswith(b"\x89PNG")
    assert len(explanation["grid"]) == explanation["grid_height"] * explanation["grid_width"] == 64


def test_cli_writes_one_overlay_per_image_inside_the_folder(
    corners: Corners, tmp_path: Path
) -> None:
    for name, data in corners.photos.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "explained"
    files = [str(tmp_path / name) for name in corners.photos]
    result = subprocess.run(
        [*perito_command(), "classify", *files, "--model", "corners", "--explain", str(out)],
        capture_output=True,
        text=True,
        env=subprocess_env(PERITO_SERVER=corners.server.target),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 4 and all(name.endswith(".png") for name in written)
    for path in out.iterdir():
        with Image.open(path) as overlay:
            assert overlay.size == (SIDE, SIDE)


def test_cli_classifies_a_file_whose_path_is_longer_than_an_image_id_may_be(
    corners: Corners, tmp_path: Path
) -> None:
    """`perito classify` names each image by its path as typed; a file deep in a folder tree
    (path over the API's 256-character id) is still classified, named by the path's end."""
    folder = tmp_path
    for _ in range(6):
        folder = folder / ("deep-" * 10)
    folder.mkdir(parents=True)
    photo = folder / "claim-photo.png"
    photo.write_bytes(corners.photos["top-left-0.png"])
    assert len(str(photo)) > 256
    result = subprocess.run(
        [*perito_command(), "classify", str(photo), "--model", "corners", "--json"],
        capture_output=True,
        text=True,
        env=subprocess_env(PERITO_SERVER=corners.server.target),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    (answer,) = json.loads(result.stdout)
    assert answer["image_id"].startswith("...") and answer["image_id"].endswith("/claim-photo.png")
    assert len(answer["image_id"]) == 256 and answer["predictions"]


def test_an_explanation_past_the_deadline_is_deadline_exceeded_at_the_deadline(
    corners: Corners,
) -> None:
    port = corners.server.running.http_port  # type: ignore[attr-defined]
    photo = base64.b64encode(corners.photos["top-left-0.png"]).decode()

    def call(explain: bool, timeout: float | None = None) -> tuple[int, dict[str, Any], float]:
        headers = {"content-type": "application/json"}
        if timeout is not None:
            headers["X-Server-Timeout"] = f"{timeout:.3f}"
        body = {"images": [{"id": "a", "content": photo}], "explain": explain}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/models/heavy:classify",
            data=json.dumps(body).encode(),
            headers=headers,
        )
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.load(response), time.monotonic() - started
        except urllib.error.HTTPError as error:
            return error.code, json.load(error), time.monotonic() - started

    # Sized on this machine now: one plain call, and one explained call with no deadline.
    plain = min(call(explain=False)[2] for _ in range(3))
    status, answer, explained = call(explain=True)
    assert status == 200 and "explanation" in answer["results"][0]
    assert explained > 9 * plain, (plain, explained)  # the heavy model does its job
    deadline = (plain * explained) ** 0.5  # well after a plain call, well before an explained one

    status, answer, _ = call(explain=False, timeout=deadline)
    assert status == 200, answer
    status, answer, elapsed = call(explain=True, timeout=deadline)
    assert status == 504 and answer["error"]["status"] == "DEADLINE_EXCEEDED", answer
    # Answered at its deadline, not after the explanation it no longer waits for.
    assert elapsed < (deadline + explained) / 2, (deadline, elapsed, explained)
