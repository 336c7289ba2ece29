"""Scenario: fine-tuning ResNet-18 from a weights file on six new classes.

No ImageNet weights can be downloaded here, so the scenario makes its own: a first run trains
a ResNet-18 from scratch on four shapes and saves its weights as a torchvision-format state
dict (what `torch.save(resnet18(...).state_dict(), path)` writes). The `resnet18-finetune`
recipe starts from that file on six shapes it has never seen (head first, then the whole
network), is published, and `perito evaluate RUN --images DIR` writes the top-3 of every
external photo, as `Classify` gives them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import perito
from perito_server.settings import ServerSettings
from tests.helpers import ServerThread, run_perito, subprocess_env
from tests.scenarios.recipes import TrainedRun, registry_env, train
from tests.synthetic import (
    FINETUNE_SHAPES,
    PRETRAIN_SHAPES,
    write_objects,
)

# Training runs in the module's fixture: far longer than the suite's 300 s per test.
pytestmark = [pytest.mark.scenario, pytest.mark.timeout(1800)]

# Chance is 1/4 (pre-training) and 1/6 (fine-tuning). Measured with 300 shapes a class for
# pre-training and 100 for fine-tuning (one thread, batch 32): the first run reached 0.54 on
# 180 test images (it overfits: training accuracy 0.85); fine-tuned from its weights, 0.43 and
# 0.41 on 90 test images in two runs (10 and 8 of 24 external images right), 3 minutes for the
# whole scenario. With 100 and 40 shapes it reached only 0.25. Unfreezing the backbone still
# costs a few points here (the features are weak), which the bounds leave room for.
# The figures move with the CPU's kernels: on an AVX-512 EPYC, 10 epochs of pre-training gave
# 0.47 and the fine-tuned model 0.36 (the same before and after the serving renovation); 16
# epochs gave 0.54 and 0.47. So pre-training runs 16 epochs, and the fine-tuning bound is
# what chance cannot reach rather than one run's figure: 27 of 90 test images right (0.30)
# happens by chance (1/6 each) with probability 0.12% (binomial: mean 15, sd 3.5).
MIN_PRETRAIN_ACCURACY = 0.35
MIN_ACCURACY = 0.3
EXTERNAL_PER_CLASS = 4


def torchvision_weights(run: TrainedRun, path: Path) -> Path:
    """The run's best weights as a torchvision ResNet-18 state dict (no wrapper prefix)."""
    saved = torch.load(run.run_dir / "checkpoints" / "best.pt", weights_only=True)
    state = {
        key.removeprefix("network."): tensor
        for key, tensor in saved["model"].items()
        if key.startswith("network.")
    }
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainedRun]:
    work = tmp_path_factory.mktemp("resnet18")
    env = registry_env(work)
    # 32 px, whole image (squash), no random crops: a shape cropped at that size is another
    # shape. Measured at 64 px with the recipe's crops: 40-60 s an epoch on 2 busy cores and
    # 0.31 after 7 epochs from scratch.
    small = {
        "model.input_size": 32,
        "model.resize_mode": "squash",
        "augment.crop_scale": "null",
        # One thread and batches of 32: two threads fight on 2 busy cores, and at batch 16
        # ResNet-18's fixed cost per step dominates (measured: 5 s an epoch, against 26-55 s).
        "train.batch_size": 32,
        "train.threads": 1,
        "train.num_workers": 0,
    }
    pretrain = train(
        "resnet18-finetune",
        work / "pretrain",
        {
            "data.root": write_objects(work / "shapes-a", PRETRAIN_SHAPES, 300, seed=6),
            "model.weights": "null",
            "model.freeze": "none",
            "model.unfreeze_at_epoch": "null",
            # From scratch on 200 photos, the recipe's SGD at 0.01 is slow to start and 0.05
            # diverged (measured): AdamW with a cosine schedule.
            "optim.name": "adamw",
            "optim.lr": 0.002,
            "schedule.name": "cosine",
            "train.epochs": 16,
            "train.early_stopping_patience": "null",
            **small,
        },
        env=env,
    )
    assert pretrain.accuracy >= MIN_PRETRAIN_ACCURACY
    weights = torchvision_weights(pretrain, work / "resnet18-shapes.pth")
    # It really is torchvision's format: a plain ResNet-18 with a 4-class head loads it.
    from torchvision.models import resnet18

    resnet18(num_classes=len(PRETRAIN_SHAPES)).load_state_dict(
        torch.load(weights, weights_only=True)
    )
    run = train(
        "resnet18-finetune",
        work / "finetune",
        {
            "data.root": write_objects(work / "shapes-b", FINETUNE_SHAPES, 100, seed=7),
            "model.weights": weights,
            # The head alone for four epochs at half the recipe's rate, then the whole network
            # (backbone at a tenth): unfrozen at epoch 3 with the full rate, the loss jumped
            # and the run stopped early at 0.43 (measured).
            "optim.lr": 0.005,
            "model.unfreeze_at_epoch": 5,
            "train.epochs": 10,
            **small,
        },
        env=env,
        publish=("production",),
    )
    assert "frozen" in run.stdout  # the head trained alone first
    return work, run


def test_the_finetuned_model_starts_from_the_weights_file(
    finetuned: tuple[Path, TrainedRun],
) -> None:
    _, run = finetuned
    assert run.card["labels"] == sorted(FINETUNE_SHAPES)
    assert run.card["training"]["config"]["model"]["weights"].endswith("resnet18-shapes.pth")


def test_the_finetuned_model_learns_six_new_classes(finetuned: tuple[Path, TrainedRun]) -> None:
    _, run = finetuned
    assert run.accuracy >= MIN_ACCURACY


def test_evaluate_writes_the_top3_of_every_external_image(
    finetuned: tuple[Path, TrainedRun], tmp_path: Path
) -> None:
    work, run = finetuned
    external = write_objects(tmp_path / "external", FINETUNE_SHAPES, EXTERNAL_PER_CLASS, seed=99)
    out = tmp_path / "evaluation"
    shown = run_perito(
        "evaluate",
        str(run.run_dir),
        "--images",
        str(external),
        "--out",
        str(out),
        env=subprocess_env(),
    )
    count = len(FINETUNE_SHAPES) * EXTERNAL_PER_CLASS
    assert f"{count} of {count} images classified, 0 unreadable" in shown.stdout
    with (out / "predictions.csv").open(newline="") as file:
        rows = {row["image"]: row for row in csv.DictReader(file)}
    assert len(rows) == count
    for name, row in rows.items():
        ranked = [row[f"class_{k}"] for k in (1, 2, 3)]
        assert len(set(ranked)) == 3 and set(ranked) <= set(FINETUNE_SHAPES), name
        probabilities = [float(row[f"probability_{k}"]) for k in (1, 2, 3)]
        assert probabilities == sorted(probabilities, reverse=True), name
    right = sum(row["class_1"] == row["label"] for row in rows.values())
    print(f"resnet18 fine-tune: {right}/{count} external images right")

    # The published version gives the same top-3 over gRPC.
    settings = ServerSettings(
        port=0, registry=str(work / "registry"), cache_dir=tmp_path / "server-cache"
    )
    names = sorted(rows)
    with ServerThread(settings) as server, perito.Client(server.target, timeout=120) as client:
        results = client.classify(
            [external / name for name in names], model="objects-resnet18", top_k=3
        )
    for name, result in zip(names, results, strict=True):
        assert [p.label for p in result.predictions] == [
            rows[name][f"class_{k}"] for k in (1, 2, 3)
        ], name
