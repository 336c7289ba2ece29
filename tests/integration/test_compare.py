"""`perito models compare` as an operator runs it: the `perito` CLI in its own process, over
a real redis-server (live: the shadows' summed counts) and a real `perito worker` (offline:
two bulk jobs over a folder of generated images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from perito_core.access.tenancy import add_tenant
from perito_core.drift import build_reference, window_key
from perito_core.models.comparison import Comparison, ComparisonStore
from perito_core.models.manifest import InputContract
from perito_training.export import export_torchscript
from tests.helpers import Stores, WorkerProcess, encoded, run_perito

pytestmark = pytest.mark.integration

LABELS = ["red", "green", "blue"]
# The network sees the pixels over 255 (no normalisation): its logits are the mean colour.
COLOUR_INPUT = InputContract(
    height=32, width=32, resize_size=32, resize_mode="squash", mean=(0.0,) * 3, std=(1.0,) * 3
)


class MeanColour(nn.Module):
    """Logits: 8 x the image's mean colour, its channels taken in `order` (version 1 reads
    red, green, blue; version 2 reads green and blue swapped: it calls green images blue and
    blue ones green, and agrees on red ones only)."""

    def __init__(self, order: tuple[int, int, int]) -> None:
        super().__init__()
        self.first, self.second, self.third = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        colour = x.mean(dim=(2, 3))
        channels = [colour[:, self.first], colour[:, self.second], colour[:, self.third]]
        return 8.0 * torch.stack(channels, dim=1)


def publish_colour_versions(stores: Stores) -> None:
    """Model `colour`: version 1 the mean colour (alias production), version 2 green and blue
    swapped and less sure of itself (temperature 2); both with a drift reference."""
    registry = stores.open_registry()
    probabilities = np.repeat(np.eye(3) * 0.9 + 0.1 / 3, 20, axis=0)
    reference = build_reference(probabilities, LABELS, built_on="60 colour photos")
    for version, (order, temperature) in enumerate((((0, 1, 2), 1.0), ((0, 2, 1), 2.0)), 1):
        path = stores.work / f"colour-{version}.pt"
        export_torchscript(MeanColour(order), COLOUR_INPUT, path, temperature=temperature)
        registry.publish(
            "colour",
            path,
            labels=LABELS,
            input=COLOUR_INPUT,
            aliases=("production",) if version == 1 else (),
            drift=reference,
        )


def write_images(folder: Path, counts: dict[str, int], seed: int = 0) -> None:
    """`counts[colour]` photos of that dominant colour (noisy, 40 x 40), and one file that is
    not an image."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for colour, count in counts.items():
        channel = LABELS.index(colour)
        for index in range(count):
            pixels = rng.integers(20, 90, (40, 40, 3)).astype(np.uint8)
            pixels[..., channel] = rng.integers(170, 250, (40, 40))
            (folder / f"{colour}-{index:03d}.png").write_bytes(encoded(pixels, "PNG"))
    (folder / "broken.png").write_bytes(b"not an image at all")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Stores:
    stores = Stores(tmp_path_factory.mktemp("compare"), redis_url)
    publish_colour_versions(stores)
    return stores


def perito(stores: Stores, *args: str, check: bool = True, **env: str) -> tuple[int, str, str]:
    result = run_perito(
        "models",
        "compare",
        *args,
        env=stores.worker_env(PERITO_RESULTS_URI=str(stores.work / "results"), **env),
        check=check,
        timeout=300,
    )
    return result.returncode, result.stdout, result.stderr


def shadow_counts(stores: Stores) -> Comparison:
    """What the servers' shadows summed for colour 1 -> 2: 400 images, 340 agreeing, in two
    servers' additions."""
    import redis

    store = ComparisonStore(redis.Redis.from_url(stores.redis_url))
    store.redis.delete(store.key("colour", "1", "2"))
    first, second = Comparison("colour", "1", "2"), Comparison("colour", "1", "2")
    eye = np.eye(3)
    for comparison, (red, green, blue, green_as_blue, blue_as_red) in (
        (first, (100, 50, 40, 20, 0)),
        (second, (80, 40, 30, 25, 15)),
    ):
        a = np.repeat(eye[[0, 1, 2, 1, 2]], [red, green, blue, green_as_blue, blue_as_red], axis=0)
        b = np.repeat(eye[[0, 1, 2, 2, 0]], [red, green, blue, green_as_blue, blue_as_red], axis=0)
        comparison.add(a * 0.9 + 0.03, b * 0.8 + 0.03, LABELS, LABELS)  # shift -0.1 each
        store.add(comparison)
    return store.read("colour", "1", "2")


def test_live_prints_what_every_server_summed(stores: Stores, tmp_path: Path) -> None:
    summed = shadow_counts(stores)
    assert (summed.compared, summed.agreed) == (400, 340)
    # An alias resolves: production is version 1.
    _, out, _ = perito(stores, "colour", "production", "2")
    lines = out.splitlines()
    assert "images compared    400" in lines
    assert "top-1 agreement    85.0%  (340 images; 95% interval 81.2% to 88.2%)" in lines
    assert any(line.startswith("confidence shift   -0.100 mean") for line in lines)
    start = lines.index("confusion (rows: version 1's top-1, columns: version 2's)")
    assert [line.split() for line in lines[start + 1 : start + 4]] == [
        ["blue", "green", "red"],
        ["blue", "70", "0", "15"],
        ["green", "45", "90", "0"],
    ]
    start = next(i for i, line in enumerate(lines) if line.startswith("disagreements"))
    assert [line.split() for line in lines[start + 1 :]] == [
        ["green", "->", "blue", "45"],
        ["blue", "->", "red", "15"],
    ]

    plot = tmp_path / "confusion.png"
    _, out, _ = perito(stores, "colour", "1", "2", "--json", "--plot", str(plot))
    data = json.loads(out)
    assert (data["compared"], data["agreed"], data["source"]) == (400, 340, "shadow")
    assert data["agreement_interval"] == pytest.approx([0.8117, 0.8817], abs=1e-4)
    assert data["mean_shift"] == pytest.approx(-0.1)
    assert data["confusion"][:2] == [
        {"incumbent": "red", "candidate": "red", "images": 180},
        {"incumbent": "green", "candidate": "green", "images": 90},
    ]
    # 3 labels a side, at least 4 counted: (4 x 0.6 + 3) x (4 x 0.6 + 2) inches at 100 dpi.
    with Image.open(plot) as image:
        assert (image.format, image.size) == ("PNG", (540, 440))
        assert len(image.convert("RGB").getcolors(1 << 16) or []) > 10  # drawn, not blank

    _, out, _ = perito(stores, "colour")
    assert "  1 -> 2  400 images, 85.0% agree" in out.splitlines()


def test_live_needs_the_models_read_role(stores: Stores) -> None:
    tenants = stores.work / "tenants.yaml"
    token = add_tenant(tenants, "jobs-only", roles=["jobs"], models=["*"])
    code, _, err = perito(
        stores,
        "colour",
        "1",
        "2",
        check=False,
        PERITO_TENANTS_FILE=str(tenants),
        PERITO_TOKEN=token,
    )
    assert code == 1
    assert "lacks the role 'models:read'" in err


def test_an_unknown_version_is_refused(stores: Stores) -> None:
    code, _, err = perito(stores, "colour", "1", "9", check=False)
    assert code == 1 and "9" in err and "Traceback" not in err


def test_offline_compares_two_jobs_over_the_same_folder(stores: Stores) -> None:
    images = stores.work / "images"
    # Version 2 agrees on the red photos only: 12 of 40, 30%.
    write_images(images, {"red": 12, "green": 16, "blue": 12})
    with WorkerProcess(stores.worker_env(), stores.work / "worker.log").wait_ready(120):
        _, out, err = perito(stores, "colour", "production", "2", "--images", str(images))
        _, again, _ = perito(stores, "colour", "1", "2", "--images", str(images), "--json")
    lines = out.splitlines()
    assert "images compared    40" in lines, out
    assert "not compared       1 (failed on either side)" in lines
    assert any(line.startswith("top-1 agreement    30.0%  (12 images;") for line in lines)
    start = next(i for i, line in enumerate(lines) if line.startswith("disagreements"))
    assert [line.split() for line in lines[start + 1 : start + 3]] == [
        ["green", "->", "blue", "16"],
        ["blue", "->", "green", "12"],
    ]
    assert lines[-1].split()[0] == "broken.png" and "version 1: failed" in lines[-1]
    assert "version 1: 41/41 done (1 failed), " in err  # the progress, on stderr

    data = json.loads(again)
    assert (data["compared"], data["agreed"], data["source"]) == (40, 12, "images")
    assert data["mean_shift"] < -0.05  # version 2 is less sure (temperature 2)
    assert set(data["jobs"]) == {"1", "2"}
    assert [item["id"] for item in data["failed"]] == ["broken.png"]
    # A hand-picked folder is no live traffic: neither version's drift window was fed.
    import redis

    with redis.Redis.from_url(stores.redis_url) as client:
        assert not client.exists(window_key("colour", "1"), window_key("colour", "2"))
