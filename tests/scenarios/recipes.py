"""What the scenarios share: run a recipe through the real `perito` CLI, timed, and read
back what the run folder holds."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import ROOT, run_perito, subprocess_env

RECIPES = ROOT / "training" / "recipes"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class TrainedRun:
    """A finished `perito train` run: its folder, card, console output and wall time."""

    run_dir: Path
    card: dict[str, Any]
    stdout: str
    seconds: float

    @property
    def accuracy(self) -> float:
        return float(self.card["metrics"]["accuracy"])

    def test_predictions(self) -> dict[str, dict[str, str]]:
        """`predictions/test.csv` by image name (relative to the data root)."""
        with (self.run_dir / "predictions" / "test.csv").open(newline="") as file:
            return {row["image"]: row for row in csv.DictReader(file)}

    def figures(self) -> str:
        metrics = self.card["metrics"]
        return (
            f"{self.card['name']}: test accuracy {self.accuracy:.4f} on {metrics['images']} "
            f"images, macro F1 {metrics['macro_avg']['f1']:.4f}, "
            f"{self.card['training']['epochs_run']} epochs in "
            f"{self.card['training']['seconds']:.0f} s of training, {self.seconds:.0f} s in all"
        )


def registry_env(work: Path) -> dict[str, str]:
    """The environment of CLI calls that publish into the scenario's local registry."""
    return subprocess_env(
        PERITO_REGISTRY=str(work / "registry"), PERITO_CACHE_DIR=str(work / "cli-cache")
    )


def train(
    recipe: str,
    out: Path,
    overrides: dict[str, object],
    *,
    env: dict[str, str],
    publish: tuple[str, ...] = (),
    name: str | None = None,
) -> TrainedRun:
    """`perito train training/recipes/RECIPE.yaml --set K=V ... --out OUT [--publish ...]`.

    `publish` holds the aliases to publish under (the run is published when it is given),
    `name` the model name to publish as (default: the recipe's).
    """
    args = ["train", str(RECIPES / f"{recipe}.yaml"), "--out", str(out), "--no-progress"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    if publish:
        args.append("--publish")
        for alias in publish:
            args += ["--alias", alias]
        if name:
            args += ["--name", name]
    started = time.monotonic()
    result = run_perito(*args, env=env, timeout=900)
    seconds = time.monotonic() - started
    card = json.loads((out / "card.json").read_text())
    trained = TrainedRun(out, card, result.stdout, seconds)
    print(trained.figures())
    return trained
