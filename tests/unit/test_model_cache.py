"""The loaded-model cache the server's pool and each worker share: held by form, found by the
precision asked for, at most `capacity` forms, least recently used dropped first."""

from __future__ import annotations

import pytest

from perito_core.models.cache import ModelCache


def test_a_form_loaded_for_two_precisions_is_held_once() -> None:
    cache: ModelCache[str] = ModelCache(2)
    first, dropped = cache.add("tiny", "1", "auto", "openvino-int8", lambda: "int8 copy")
    again, _ = cache.add("tiny", "1", "int8", "openvino-int8", lambda: "a second copy")
    assert (first, again, dropped) == ("int8 copy", "int8 copy", [])
    assert cache.get("tiny", "1", "int8") == "int8 copy"
    assert len(cache) == 1 and cache.get("tiny", "1", "fp32") is None


def test_the_least_recently_used_form_is_dropped_with_every_precision_it_served() -> None:
    cache: ModelCache[str] = ModelCache(2)
    cache.add("a", "1", "auto", "int8", lambda: "a")
    cache.add("a", "1", "int8", "int8", lambda: "a")
    cache.add("b", "1", "auto", "fp32", lambda: "b")
    assert cache.get("a", "1", "int8") == "a"  # a is now the most recently used
    _, dropped = cache.add("c", "1", "auto", "fp32", lambda: "c")
    assert dropped == ["b"]
    assert cache.versions() == [("a", "1"), ("c", "1")]
    assert cache.models() == ["a", "c"]
    _, dropped = cache.add("d", "1", "auto", "fp32", lambda: "d")
    assert dropped == ["a"]
    assert cache.get("a", "1", "auto") is None and cache.get("a", "1", "int8") is None


def test_make_room_drops_before_a_load_and_clear_drops_all() -> None:
    cache: ModelCache[str] = ModelCache(2)
    cache.add("a", "1", "auto", "fp32", lambda: "a")
    assert cache.make_room() == []
    cache.add("b", "1", "auto", "fp32", lambda: "b")
    assert cache.make_room() == ["a"]
    assert cache.clear() == ["b"]
    assert len(cache) == 0 and cache.get("b", "1", "auto") is None


def test_a_capacity_under_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ModelCache(0)
