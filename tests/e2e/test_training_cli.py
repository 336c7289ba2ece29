"""From a folder of images to a served model version, through the CLI.

`perito train --publish` on generated crack photos (labels in the file-name suffix), then
`perito serve` on the registry: every test image's top-1 in `Classify` is the one the
trainer's own evaluation recorded, and `GetModel` shows the card.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import perito
from perito_core.models.registry import ModelRegistry
from perito_server.settings import ServerSettings
from tests.helpers import (
    ROOT,
    ServerThread,
    run_perito,
    subprocess_env,
    write_pattern_images,
)

pytestmark = pytest.mark.e2e

RECIPE = ROOT / "training" / "recipes" / "concrete-cracks.yaml"


perito_cli = run_perito


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The concrete-cracks recipe, shrunk to seconds, trained and published via the CLI."""
    work = tmp_path_factory.mktemp("train-cli")
    data = write_pattern_images(
        work / "concrete",
        classes=("negative", "positive"),
        per_class=80,
        size=40,
        suffixes={"negative": "N", "positive": "P"},
    )
    (data / "notes.txt").write_text("site notes, not an image")
    (data / "09999P.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    env = subprocess_env(
        PERITO_REGISTRY=str(work / "registry"), PERITO_CACHE_DIR=str(work / "cache")
    )
    result = perito_cli(
        "train",
        str(RECIPE),
        "--set",
        f"data.root={data}",
        "--set",
        "model.input_size=32",
        "--set",
        "train.epochs=8",
        "--set",
        "train.batch_size=16",
        "--set",
        "calibration.target_accuracy=0.9",
        "--out",
        str(work / "run"),
        "--no-progress",
        "--publish",
        "--alias",
        "staging",
        env=env,
    )
    assert "1 unreadable image(s) left out" in result.stdout
    assert "09999P.jpg" in result.stdout
    assert "published concrete-cracks@1" in result.stdout and "staging" in result.stdout
    return {"work": work, "data": data, "run": work / "run", "registry": work / "registry"}


def test_served_predictions_equal_the_trainers_evaluation(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    card = json.loads((trained["run"] / "card.json").read_text())
    assert card["metrics"]["accuracy"] >= 0.85  # chance is 0.5
    with (trained["run"] / "predictions" / "test.csv").open() as file:
        expected = {row["image"]: row for row in csv.DictReader(file)}
    assert len(expected) == card["metrics"]["images"] == 16  # the recipe holds out 10%
    settings = ServerSettings(
        port=0, registry=str(trained["registry"]), cache_dir=tmp_path / "cache"
    )
    with ServerThread(settings) as server, perito.Client(server.target) as client:
        names = sorted(expected)
        results = client.classify(
            [trained["data"] / name for name in names],
            model="concrete-cracks",
            version="staging",
            top_k=2,
        )
        model = client.get_model("concrete-cracks")
    for name, result in zip(names, results, strict=True):
        top = result.predictions[0]
        assert top.label == expected[name]["class_1"], name
        assert top.probability == pytest.approx(float(expected[name]["probability_1"]), abs=1e-4)
        # The threshold chosen on validation data travels with the model.
        assert result.uncertain == (top.probability < card["confidence_threshold"])
    served_card = model.versions[0].card
    assert served_card["metrics"]["accuracy"] == card["metrics"]["accuracy"]
    assert served_card["calibration"]["temperature"] == card["calibration"]["temperature"]
    assert served_card["training"]["dataset"]["fingerprint_sha256"]
    assert served_card["training"]["config"]["data"]["kind"] == "suffix"
    assert served_card["source"]["torch"]
    assert len(served_card["artifact"]["sha256"]) == 64
    assert model.aliases == {"staging": "1"}


def test_evaluate_recomputes_the_card_and_classifies_a_folder(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    env = subprocess_env()
    again = perito_cli("evaluate", str(trained["run"]), env=env)
    card = json.loads((trained["run"] / "card.json").read_text())
    assert (
        f"accuracy {card['metrics']['accuracy']:.4f} (card: {card['metrics']['accuracy']:.4f})"
        in again.stdout
    )

    folder = tmp_path / "inspection"
    for label in ("negative", "positive"):
        (folder / label).mkdir(parents=True)
    for image in sorted(trained["data"].glob("*N.*"))[:5]:
        (folder / "negative" / image.name).write_bytes(image.read_bytes())
    for image in sorted(trained["data"].glob("*P.png"))[:5]:
        (folder / "positive" / image.name).write_bytes(image.read_bytes())
    (folder / "positive" / "blank.jpg").write_bytes(b"")
    out = tmp_path / "out"
    shown = perito_cli(
        "evaluate", str(trained["run"]), "--images", str(folder), "--out", str(out), env=env
    )
    assert "10 of 11 images classified, 1 unreadable" in shown.stdout
    assert "labelled by folder: accuracy" in shown.stdout
    with (out / "predictions.csv").open() as file:
        rows = {row["image"]: row for row in csv.DictReader(file)}
    assert "empty" in rows["positive/blank.jpg"]["error"]
    first = next(row for row in rows.values() if not row["error"])
    assert first["class_1"] and first["class_2"] and not first["class_3"]  # two classes only


def test_publish_to_s3_makes_immutable_versions(
    trained: dict[str, Path], s3_endpoint: str, tmp_path: Path
) -> None:
    env = subprocess_env(PERITO_S3_ENDPOINT_URL=s3_endpoint, PERITO_CACHE_DIR=str(tmp_path))
    uri = "s3://models/perito"
    first = perito_cli(
        "publish", str(trained["run"]), "--registry", uri, "--alias", "production", env=env
    )
    second = perito_cli(
        "publish", str(trained["run"]), "--registry", uri, "--name", "cracks-b", env=env
    )
    again = perito_cli("publish", str(trained["run"]), "--registry", uri, "--json", env=env)
    assert "published concrete-cracks@1" in first.stdout
    assert "published cracks-b@1" in second.stdout
    published = json.loads(again.stdout)
    assert (published["name"], published["version"]) == ("concrete-cracks", "2")
    assert published["metrics"]["accuracy"] > 0.5
    from perito_core.storage import S3Options

    registry = ModelRegistry.open(uri, cache_dir=tmp_path, s3=S3Options(endpoint_url=s3_endpoint))
    assert registry.resolve("concrete-cracks", "production") == "1"
    manifest = registry.manifest("concrete-cracks", "2")
    assert manifest.confidence_threshold is not None
    assert manifest.training.config["model"]["architecture"] == "cnn4"


def test_training_mistakes_are_one_clear_line(trained: dict[str, Path], tmp_path: Path) -> None:
    env = subprocess_env()
    wrong = perito_cli("train", str(RECIPE), "--set", "optim.lr=fast", env=env, check=False)
    assert wrong.returncode == 1 and "optim.lr" in wrong.stderr and "Traceback" not in wrong.stderr
    missing = perito_cli(
        "train",
        str(RECIPE),
        "--set",
        f"data.root={tmp_path}/none",
        "--out",
        str(tmp_path / "r"),
        env=env,
        check=False,
    )
    assert "is not a folder" in missing.stderr and "Traceback" not in missing.stderr
    taken = perito_cli("train", str(RECIPE), "--out", str(trained["run"]), env=env, check=False)
    assert "already holds a run" in taken.stderr
    unfinished = perito_cli("publish", str(tmp_path), env=env, check=False)
    assert "no finished run" in unfinished.stderr
