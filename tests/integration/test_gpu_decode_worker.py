"""A worker chunk through the GPU decode path (`perito_core.imaging_device.prepare_batch`), run
on the CPU: the same answers, errors and quality as the Pillow path, item for item, on a real
Redis and a real model, with photos the device path takes and those it leaves to Pillow."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perito.v1.vocabulary import ItemState
from perito_core.jobs.store import ItemInput, ItemResult, JobStore
from tests.conftest import tiny_registry
from tests.helpers import create_job


def jpeg(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **params)
    return buffer.getvalue()


def write_images(folder: Path, photos: dict[str, Path]) -> list[ItemInput]:
    folder.mkdir()
    files: dict[str, bytes] = {}
    for name in ("coffee", "chelsea", "rocket", "astronaut", "china"):
        files[f"{name}.jpg"] = photos[name].read_bytes()
    with Image.open(photos["flower"]) as opened:
        flower = opened.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    files["rotated.jpg"] = jpeg(flower, exif=exif.tobytes())
    png = io.BytesIO()
    flower.save(png, "PNG")
    files["flower.png"] = png.getvalue()
    files["big.jpg"] = jpeg(flower.resize((1600, 1200)))
    files["truncated.jpg"] = files["big.jpg"][:20_000]
    for name, data in files.items():
        (folder / name).write_bytes(data)
    names = [*files, "missing.jpg"]
    return [ItemInput(id=name, uri=str(folder / name)) for name in names]


def run_chunk(
    tmp_path: Path, redis_url: str, registry: Path, items: list[ItemInput], name: str
) -> list[ItemResult]:
    from perito_worker.processing import WorkerRuntime, classify_chunk
    from perito_worker.settings import WorkerSettings

    store = JobStore.connect(redis_url)
    job, _ = create_job(
        store,
        items,
        output_uri=str(tmp_path / "results" / name),
        chunk_size=len(items),
        model="tiny",
        top_k=3,
        data_root=str(tmp_path / "job-data"),
    )
    settings = WorkerSettings(
        redis_url=redis_url,
        registry=str(registry),
        cache_dir=tmp_path / f"cache-{name}",
        local_roots=[tmp_path],
        batch_size=4,  # three batches: the pipeline runs the device path across batches
    )
    classify_chunk(WorkerRuntime(settings), job.id, 0, 0, len(items), lambda _: None)
    return store.results(job.id, 0, len(items))


def test_a_chunk_on_the_device_path_answers_as_the_pillow_path(
    tmp_path: Path,
    redis_url: str,
    tiny_model_file: Path,
    photos: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from perito_core import imaging_device
    from perito_worker import processing

    registry = tiny_registry(tmp_path / "registry", tiny_model_file)
    items = write_images(tmp_path / "images", photos)
    pillow = run_chunk(tmp_path, redis_url, registry, items, "pillow")
    taken: list[str] = []
    real = imaging_device.prepare_batch

    def on_the_cpu(*args: object) -> object:
        taken.append("batch")
        return real(*args)  # type: ignore[arg-type]

    # What a worker whose model runs on CUDA does, with the CPU as the device.
    monkeypatch.setattr(processing, "decode_device", lambda *_: torch.device("cpu"))
    monkeypatch.setattr(processing, "prepare_batch", on_the_cpu)
    device = run_chunk(tmp_path, redis_url, registry, items, "device")
    assert len(taken) == 3  # 11 items at batch size 4

    states = {r.id: (r.state, r.error.split(":")[0]) for r in pillow}
    assert states == {r.id: (r.state, r.error.split(":")[0]) for r in device}
    assert states["truncated.jpg"] == (ItemState.FAILED, "TRUNCATED")
    assert states["missing.jpg"] == (ItemState.FAILED, "NOT_FOUND")
    for want, got in zip(pillow, device, strict=True):
        if want.state is not ItemState.SUCCEEDED:
            continue
        assert got.input_sha256 == want.input_sha256
        assert [p[0] for p in got.predictions][:1] == [p[0] for p in want.predictions][:1]
        probabilities = np.array([p[2] for p in got.predictions])
        assert probabilities == pytest.approx([p[2] for p in want.predictions], abs=0.02)
        assert got.quality is not None and want.quality is not None
        got_measures, want_measures = got.quality.measures, want.quality.measures
        # The tiny model's 32-pixel input lets Pillow decode these photos at 1/8 (75x50 for
        # a 600x400 photo): few pixels to measure, so looser than the 224-pixel bounds of
        # tests/unit/test_imaging_device.py.
        assert got_measures.sharpness == pytest.approx(want_measures.sharpness, rel=0.05)
        assert got_measures.brightness == pytest.approx(want_measures.brightness, abs=0.5)
        assert (got_measures.width, got_measures.height) == (
            want_measures.width,
            want_measures.height,
        )
        assert got.quality.issues == want.quality.issues
