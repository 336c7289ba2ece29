"""Alias records during a rollout: canary shares, sticky keys, promotion, rollback, shadows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perito_core.errors import FailedPrecondition, InvalidArgument, ModelLoadError, NotFound
from perito_core.models.registry import ModelRegistry
from perito_core.models.rollout import AliasRoute, Canary, Shadow
from tests.conftest import publish_tiny


@pytest.fixture
def registry(tmp_path: Path, tiny_model_file: Path) -> ModelRegistry:
    registry = ModelRegistry.open(str(tmp_path / "registry"), cache_dir=tmp_path / "cache")
    for _ in range(3):
        publish_tiny(registry, tiny_model_file, name="car-damage")
    registry.set_alias("car-damage", "production", "1")
    return registry


def test_a_canary_takes_its_share_of_keys_and_keeps_each_key() -> None:
    canary = Canary("4", 30.0)
    keys = [f"claim-{i}" for i in range(10_000)]
    taken = [canary.takes(key, "car-damage/production") for key in keys]
    assert 0.28 < sum(taken) / len(keys) < 0.32
    assert taken == [canary.takes(key, "car-damage/production") for key in keys]
    # Another model's alias draws afresh: not the same claims on the canary side.
    other = [canary.takes(key, "minerals/production") for key in keys]
    # Independent draws agree on 0.3^2 + 0.7^2 = 58% of keys.
    assert 0.55 < sum(a == b for a, b in zip(taken, other, strict=True)) / len(keys) < 0.61


def test_a_request_without_a_key_is_drawn_at_random() -> None:
    route = AliasRoute("3", Canary("4", 30.0))
    picks = [route.pick("", "m/a") for _ in range(10_000)]
    assert 0.27 < picks.count("4") / len(picks) < 0.33


def test_canary_promote_and_rollback(registry: ModelRegistry) -> None:
    route = registry.set_canary("car-damage", "production", "2", 5)
    assert route == AliasRoute("1", Canary("2", 5.0))
    assert registry.route("car-damage", "production") == route
    assert registry.resolve("car-damage", "production") == "1"
    assert registry.aliases("car-damage") == {"production": "1"}

    assert registry.rollback_canary("car-damage", "production") == AliasRoute("1")
    with pytest.raises(FailedPrecondition, match="no canary"):
        registry.rollback_canary("car-damage", "production")

    registry.set_canary("car-damage", "production", "3", 50)
    assert registry.promote_canary("car-damage", "production") == AliasRoute("3")
    assert registry.resolve("car-damage", "production") == "3"
    with pytest.raises(FailedPrecondition, match="no canary"):
        registry.promote_canary("car-damage", "production")


def test_bad_canaries_are_refused_naming_what(registry: ModelRegistry) -> None:
    with pytest.raises(InvalidArgument, match="already serves version 1"):
        registry.set_canary("car-damage", "production", "1", 5)
    for percent in (0, 100, -1, float("nan"), 99.999, 0.001):
        with pytest.raises(InvalidArgument) as refused:
            registry.set_canary("car-damage", "production", "2", percent)
        assert refused.value.field == "canary"
    with pytest.raises(NotFound, match="version 9"):
        registry.set_canary("car-damage", "production", "9", 5)
    with pytest.raises(NotFound, match="alias 'staging'"):
        registry.set_canary("car-damage", "staging", "2", 5)


def test_a_move_ends_the_canary_and_keeps_the_shadow(registry: ModelRegistry) -> None:
    registry.set_shadow("car-damage", "production", "3", 0.2)
    registry.set_canary("car-damage", "production", "2", 5)
    registry.set_alias("car-damage", "production", "2")
    assert registry.route("car-damage", "production") == AliasRoute("2", None, Shadow("3", 0.2))
    # A shadow that becomes the alias's version is over.
    registry.set_alias("car-damage", "production", "3")
    assert registry.route("car-damage", "production") == AliasRoute("3")


def test_shadow_set_and_stopped(registry: ModelRegistry) -> None:
    route = registry.set_shadow("car-damage", "production", "2", 0.25)
    assert route.shadow == Shadow("2", 0.25)
    assert route.versions == ["1", "2"]
    with pytest.raises(InvalidArgument, match="already serves"):
        registry.set_shadow("car-damage", "production", "1", 0.25)
    with pytest.raises(InvalidArgument) as refused:
        registry.set_shadow("car-damage", "production", "2", 1.5)
    assert refused.value.field == "sample"
    assert registry.stop_shadow("car-damage", "production") == AliasRoute("1")
    assert registry.stop_shadow("car-damage", "production") == AliasRoute("1")


def test_an_old_alias_record_reads_as_before(registry: ModelRegistry, tmp_path: Path) -> None:
    path = tmp_path / "registry/models/car-damage/aliases/stable.json"
    path.write_text(json.dumps({"version": "2"}))
    assert registry.route("car-damage", "stable") == AliasRoute("2")
    assert registry.resolve("car-damage", "stable") == "2"


@pytest.mark.parametrize(
    "record",
    [
        {"version": "2", "canary": {"version": "../3", "percent": 5}},
        {"version": "2", "canary": {"version": "3", "percent": 150}},
        {"version": "2", "canary": {"version": "3"}},
        {"version": "2", "shadow": {"version": "3", "sample": 0}},
        {"version": "2", "shadow": "3"},
    ],
)
def test_a_damaged_rollout_record_is_never_half_read(
    registry: ModelRegistry, tmp_path: Path, record: dict[str, object]
) -> None:
    path = tmp_path / "registry/models/car-damage/aliases/stable.json"
    path.write_text(json.dumps(record))
    with pytest.raises(ModelLoadError):
        registry.route("car-damage", "stable")
    assert "stable" not in registry.aliases("car-damage")
