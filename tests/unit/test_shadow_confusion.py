"""The shadow's confusion on /metrics stays bounded: a server exports at most `limit` label
pairs per version pair, the first it meets, and counts every later pair under `(other)`."""

from __future__ import annotations

from perito_server.shadow import CONFUSION_PAIRS, OTHER, ConfusionPairs

PAIR = ("car-damage", "3", "4")


def test_the_first_pairs_keep_their_labels_and_the_rest_become_other() -> None:
    pairs = ConfusionPairs(limit=3)
    shown = [pairs.labels(PAIR, f"a{i}", f"b{i}") for i in range(5)]
    assert shown == [("a0", "b0"), ("a1", "b1"), ("a2", "b2"), (OTHER, OTHER), (OTHER, OTHER)]
    # A pair already exported keeps its labels after the bound is reached.
    assert pairs.labels(PAIR, "a1", "b1") == ("a1", "b1")


def test_each_version_pair_has_its_own_bound() -> None:
    pairs = ConfusionPairs(limit=1)
    assert pairs.labels(PAIR, "dent", "scratch") == ("dent", "scratch")
    assert pairs.labels(PAIR, "scratch", "dent") == (OTHER, OTHER)
    assert pairs.labels(("car-damage", "3", "5"), "scratch", "dent") == ("scratch", "dent")


def test_a_thousand_class_model_exports_a_bounded_number_of_series() -> None:
    pairs = ConfusionPairs()
    shown = {pairs.labels(PAIR, f"c{i}", f"c{j}") for i in range(1000) for j in range(0, 1000, 7)}
    assert len(shown) == CONFUSION_PAIRS + 1
