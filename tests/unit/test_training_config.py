"""Training configs: YAML recipes, command-line overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from perito_training.config import ConfigError, load_config

RECIPES = sorted((Path(__file__).parents[2] / "training" / "recipes").glob("*.yaml"))


def test_there_is_a_recipe_for_each_use_case() -> None:
    assert {p.stem for p in RECIPES} >= {
        "car-damage",
        "concrete-cracks",
        "fashion-mnist",
        "minerals",
        "resnet18-finetune",
        "waste",
    }


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_is_a_valid_config(recipe: Path) -> None:
    config = load_config(recipe)
    assert config.name and config.description
    if config.data.root is not None:
        # Relative paths are taken from the recipe's folder, not the working directory.
        assert config.data.root.is_absolute()


def test_overrides_reach_any_field_with_yaml_typed_values(tmp_path: Path) -> None:
    recipe = Path(__file__).parents[2] / "training" / "recipes" / "car-damage.yaml"
    config = load_config(
        recipe,
        [
            "optim.lr=3e-4",
            "train.epochs=2",
            "augment.crop_scale=[0.8, 1.0]",
            "model.freeze=none",
            f"data.root={tmp_path}",
        ],
    )
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.train.epochs == 2
    assert config.augment.crop_scale == (0.8, 1.0)
    assert config.model.freeze == "none"
    assert config.data.root == tmp_path


def test_a_config_from_overrides_alone(tmp_path: Path) -> None:
    config = load_config(
        None,
        ["name=quick", "data.kind=folders", "data.root=photos", "model.architecture=cnn4"],
        base_dir=tmp_path,
    )
    assert config.data.root == tmp_path / "photos"
    assert config.train.epochs == 10  # defaults fill the rest


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr=-1"], "optim.lr: Input should be greater than 0"),
        (["optim.learning_rate=0.1"], "optim.learning_rate: Extra inputs are not permitted"),
        # A misspelt override is the override's, not the recipe's, with the field meant.
        (
            ["train.epoch=2"],
            "invalid training config: --set train.epoch: Extra inputs are not permitted "
            "(did you mean train.epochs",
        ),
        (["schedule.name=linear"], "schedule.name: Input should be"),
        (["train.epochs"], "is not KEY=VALUE"),
        (["data.kind=csv", "data.csv=null"], "data.kind csv needs data.csv"),
        (["data.val_fraction=0.6", "data.test_fraction=0.5"], "must leave images to train on"),
        (["name=Car Damage"], "name: String should match pattern"),
        (["model.architecture=vgg7", "model.widths=[32, 64]"], "vgg7 takes 4 model.widths"),
        (["model.widths=[32, 0, 64]"], "model.widths must be positive channel counts"),
    ],
)
def test_mistakes_are_reported_with_the_field(overrides: list[str], message: str) -> None:
    recipe = Path(__file__).parents[2] / "training" / "recipes" / "concrete-cracks.yaml"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(recipe, overrides)


def test_unreadable_or_malformed_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(listed)
