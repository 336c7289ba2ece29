"""Scenario: a building inspector's crack detector, from photos to a bulk job.

Generated concrete surfaces (crops of scikit-image's real brick, gravel and grass photos,
half with dark branching cracks; labels in the file name, `00001P.jpg` / `00002N.jpg`) train
the `concrete-cracks` recipe through `perito train --publish`. A real `perito worker` and a
real redis-server then run a bulk job over a held-out folder, and every item's verdict is
the one `perito evaluate --images` gives offline for the same file.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import perito
from tests.helpers import ServerThread, Stores, WorkerProcess, run_perito, subprocess_env
from tests.scenarios.recipes import TrainedRun, registry_env, train
from tests.synthetic import write_concrete_cracks

# Training runs in the module's fixture: far longer than the suite's 300 s per test.
pytestmark = [pytest.mark.scenario, pytest.mark.timeout(1800)]

TRAIN_IMAGES = 400
HELD_OUT_IMAGES = 100
# Measured: 0.85 test accuracy (40 images), 0.96 on the held-out 100 (see
# training/recipes/README.md); chance is 0.5.
MIN_ACCURACY = 0.75


@dataclass
class Cracks:
    work: Path
    run: TrainedRun
    held_out: Path


@pytest.fixture(scope="module")
def cracks(tmp_path_factory: pytest.TempPathFactory) -> Cracks:
    work = tmp_path_factory.mktemp("cracks")
    data = write_concrete_cracks(work / "concrete", TRAIN_IMAGES, seed=1)
    held_out = write_concrete_cracks(
        work / "held-out", HELD_OUT_IMAGES, seed=2, start=TRAIN_IMAGES + 1
    )
    run = train(
        "concrete-cracks",
        work / "run",
        {
            "data.root": data,
            "model.input_size": 64,
            "train.epochs": 8,
            "train.batch_size": 16,
        },
        env=registry_env(work),
        publish=("production",),
    )
    assert "published concrete-cracks@1" in run.stdout
    return Cracks(work, run, held_out)


@pytest.fixture(scope="module")
def service(cracks: Cracks, redis_url: str) -> Iterator[perito.Client]:
    """The registry served by a real gRPC server, with one real `perito worker` for jobs."""
    stores = Stores(cracks.work, redis_url)
    with (
        WorkerProcess(stores.worker_env(), stores.work / "worker.log").wait_ready(120),
        ServerThread(stores.server_settings()) as server,
        perito.Client(server.target, timeout=60) as client,
    ):
        yield client


def is_cracked(name: str) -> bool:
    return Path(name).stem.endswith("P")


def test_the_recipe_learns_cracks(cracks: Cracks) -> None:
    card = cracks.run.card
    assert card["labels"] == ["negative", "positive"]
    assert card["metrics"]["images"] == TRAIN_IMAGES // 10  # the recipe holds out 10%
    assert cracks.run.accuracy >= MIN_ACCURACY
    assert card["metrics"]["roc_auc"]["binary"] >= MIN_ACCURACY


def test_a_bulk_job_over_held_out_photos_matches_the_offline_evaluation(
    cracks: Cracks, service: perito.Client
) -> None:
    offline_dir = cracks.work / "offline"
    run_perito(
        "evaluate",
        str(cracks.run.run_dir),
        "--images",
        str(cracks.held_out),
        "--out",
        str(offline_dir),
        env=subprocess_env(),
    )
    with (offline_dir / "predictions.csv").open(newline="") as file:
        offline = {row["image"]: row for row in csv.DictReader(file)}
    assert len(offline) == HELD_OUT_IMAGES

    handle = service.submit_job(
        cracks.held_out, model="concrete-cracks", version="production", top_k=2
    )
    job = handle.wait(timeout=600)
    assert job.state is perito.JobState.SUCCEEDED, job
    assert (job.total, job.succeeded, job.failed) == (HELD_OUT_IMAGES, HELD_OUT_IMAGES, 0)
    assert job.model_version == "1"

    served: dict[str, str] = {}
    for item in handle.results():
        assert item.classification is not None, item
        name = Path(item.uri).name
        top = item.classification.predictions[0]
        expected = offline[name]
        assert top.label == expected["class_1"], name
        assert top.probability == pytest.approx(float(expected["probability_1"]), abs=1e-4)
        served[name] = top.label
    assert sorted(served) == sorted(offline)

    right = sum((label == "positive") == is_cracked(name) for name, label in served.items())
    bulk_accuracy = right / len(served)
    print(
        f"bulk job over {len(served)} held-out photos: accuracy {bulk_accuracy:.4f} "
        f"(offline test split: {cracks.run.accuracy:.4f})"
    )
    assert bulk_accuracy >= MIN_ACCURACY
    # The held-out photos come from the same generator: the job does at least as well as the
    # test split said, within what 40 test images can tell.
    assert bulk_accuracy >= cracks.run.accuracy - 0.1
