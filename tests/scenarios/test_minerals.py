"""Scenario: ten minerals from a CSV manifest, three architectures compared.

Generated mineral blobs (ten classes told apart by colour and texture: banded, crystalline,
fibrous, speckled, glossy) are listed in a CSV `path,label`. The `minerals` recipe is trained
three times, as its seed compared them: the 4-conv CNN, the 5-conv CNN (the recipe's own) and
EfficientNet-Lite0 transfer-learned from its real ImageNet weights. One table compares them,
and each is published and served with its card.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import perito
from perito_server.settings import ServerSettings
from perito_training.compare import compare_runs, summarize_run
from tests.helpers import ServerThread
from tests.scenarios.recipes import TrainedRun, registry_env, train
from tests.synthetic import MINERALS, write_minerals

# Training runs in the module's fixture: far longer than the suite's 300 s per test.
pytestmark = [pytest.mark.scenario, pytest.mark.timeout(1800)]

PER_CLASS = 30
# Measured on 40 test images: cnn4 0.85, cnn5 0.85, EfficientNet-Lite0 (frozen) 0.775 (see
# training/recipes/README.md); chance is 0.10.
MIN_ACCURACY = {"cnn4": 0.6, "cnn5": 0.6, "efficientnet_lite0": 0.55}
SMALL_CNN = {
    "model.input_size": 48,
    "train.batch_size": 16,
    "train.epochs": 10,
    "schedule.step_size": 7,
}
ARCHITECTURES: dict[str, dict[str, object]] = {
    "cnn4": {**SMALL_CNN, "model.architecture": "cnn4"},
    "cnn5": SMALL_CNN,  # the recipe's own
    # Transfer learning: ImageNet features frozen, a new head trained with AdamW. (On a few
    # hundred tiny images, unfreezing the backbone lets batch norm drift and costs accuracy.)
    "efficientnet_lite0": {
        "model.input_size": 64,
        "model.architecture": "efficientnet_lite0",
        "model.freeze": "backbone",
        "optim.name": "adamw",
        "optim.lr": 0.003,
        "schedule.name": "cosine",
        "train.batch_size": 16,
        "train.epochs": 6,
    },
}


@pytest.fixture(scope="module")
def minerals(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, TrainedRun]]:
    work = tmp_path_factory.mktemp("minerals")
    manifest = write_minerals(work / "minerals", PER_CLASS, seed=4)
    runs = {
        architecture: train(
            "minerals",
            work / "runs" / architecture,
            {"data.csv": manifest, **overrides},
            env=registry_env(work),
            publish=("candidate",),
            name=f"minerals-{architecture.replace('_', '-')}",
        )
        for architecture, overrides in ARCHITECTURES.items()
    }
    return work, runs


def test_three_architectures_compared_in_one_table(
    minerals: tuple[Path, dict[str, TrainedRun]],
) -> None:
    work, runs = minerals
    table = compare_runs([run.run_dir for run in runs.values()], work / "comparison.md")
    print(table)
    assert (work / "comparison.md").read_text() == table
    lines = table.splitlines()
    assert lines[0].startswith("| run | architecture |") and len(lines) == 2 + len(runs)
    summaries = {name: summarize_run(run.run_dir) for name, run in runs.items()}
    for architecture, summary in summaries.items():
        assert summary.architecture == architecture
        assert summary.accuracy >= MIN_ACCURACY[architecture], table
        assert f"| {architecture} |" in table
    # Best first, and the same test images for all three.
    accuracies = [float(line.split("|")[7]) for line in lines[2:]]
    assert accuracies == sorted(accuracies, reverse=True)
    assert len({summary.test_images for summary in summaries.values()}) == 1
    fingerprints = {run.card["training"]["dataset"]["fingerprint_sha256"] for run in runs.values()}
    assert len(fingerprints) == 1
    assert next(iter(runs.values())).card["labels"] == sorted(MINERALS)


def test_each_architecture_is_served_with_its_card(
    minerals: tuple[Path, dict[str, TrainedRun]], tmp_path: Path
) -> None:
    work, runs = minerals
    settings = ServerSettings(
        port=0, registry=str(work / "registry"), cache_dir=tmp_path / "server-cache"
    )
    with ServerThread(settings) as server, perito.Client(server.target, timeout=120) as client:
        for architecture, run in runs.items():
            name = f"minerals-{architecture.replace('_', '-')}"
            model = client.get_model(name)
            card = model.versions[0].card
            assert card["metrics"]["accuracy"] == run.accuracy
            assert card["training"]["config"]["model"]["architecture"] == architecture
            expected = run.test_predictions()
            some = sorted(expected)[:10]
            results = client.classify(
                [work / "minerals" / image for image in some], model=name, version="candidate"
            )
            assert [r.predictions[0].label for r in results] == [
                expected[image]["class_1"] for image in some
            ]
