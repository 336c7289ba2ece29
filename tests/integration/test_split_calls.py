"""A `classify` the SDK splits into parts behaves like one call, against a real server: bad
images are named by the caller's own index, and `on_invalid="skip"` keeps the rest."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

import perito
from tests.conftest import tiny_registry
from tests.helpers import ServerThread

pytestmark = pytest.mark.integration

COUNT, BAD = 70, 66  # 70 photos, the 67th truncated: in the second 64-image part, its 3rd


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_file: Path) -> Iterator[str]:
    root = tmp_path_factory.mktemp("split-registry")
    registry = tiny_registry(root / "registry", tiny_model_file)
    with ServerThread.serving(registry, root / "cache") as running:
        yield running.target


@pytest.fixture(scope="module")
def seventy_photos(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, Path]) -> list[Path]:
    folder = tmp_path_factory.mktemp("seventy")
    paths = []
    for index, source in zip(range(COUNT), itertools.cycle(photos.values()), strict=False):
        path = folder / f"photo-{index:02d}.jpg"
        content = source.read_bytes()
        path.write_bytes(content[: len(content) // 2] if index == BAD else content)
        paths.append(path)
    return paths


async def _classify(
    target: str, asynchronous: bool, images: list[Path], **options: object
) -> list[perito.Classification | perito.RejectedImage]:
    if asynchronous:
        async with perito.AsyncClient(target, timeout=120) as aclient:
            return await aclient.classify(images, model="tiny", **options)  # type: ignore[no-any-return, call-overload]
    with perito.Client(target, timeout=120) as client:
        return client.classify(images, model="tiny", **options)  # type: ignore[no-any-return, call-overload]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_a_bad_photo_is_named_by_its_index_in_the_callers_list(
    server: str, seventy_photos: list[Path], asynchronous: bool
) -> None:
    with pytest.raises(perito.InvalidArgumentError) as caught:
        await _classify(server, asynchronous, seventy_photos)
    error = caught.value
    assert [v.field for v in error.violations] == [f"images[{BAD}]"]
    assert f"images[{BAD}] (id 'photo-{BAD}.jpg')" in error.violations[0].description
    assert error.message.startswith(f"images[{BAD}] (id 'photo-{BAD}.jpg')")
    assert "images[2]" not in str(error)  # its index inside the second part


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_skip_returns_every_photo_with_the_bad_one_rejected(
    server: str, seventy_photos: list[Path], asynchronous: bool
) -> None:
    results = await _classify(server, asynchronous, seventy_photos, on_invalid="skip")
    assert len(results) == COUNT
    assert [r.image_id for r in results] == [p.name for p in seventy_photos]
    rejected = results[BAD]
    assert isinstance(rejected, perito.RejectedImage) and rejected.index == BAD
    assert [v.field for v in rejected.error.violations] == [f"images[{BAD}]"]
    assert "photo-66.jpg" in rejected.error.message
    others = [r for i, r in enumerate(results) if i != BAD]
    assert all(isinstance(r, perito.Classification) and r.error is None for r in others)
    assert {r.label for r in others if isinstance(r, perito.Classification)} <= {
        "minor",
        "moderate",
        "severe",
    }
