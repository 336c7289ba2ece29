"""A request's routing key: checked the same for every door, carried by every SDK call."""

from __future__ import annotations

import pytest

from perito._requests import Limits, classify_parts
from perito_core.errors import InvalidArgument
from perito_server.model_pool import MAX_ROUTING_KEY_CHARS, check_routing_key


def test_a_key_up_to_the_limit_is_taken_as_sent() -> None:
    key = "claim-" + "x" * (MAX_ROUTING_KEY_CHARS - 6)
    assert check_routing_key(key) == key
    assert check_routing_key("") == "" and check_routing_key(None) == ""


def test_a_longer_key_is_refused_naming_the_field_and_the_limit() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_routing_key("k" * (MAX_ROUTING_KEY_CHARS + 1))
    assert caught.value.field == "routing_key"
    assert f"{MAX_ROUTING_KEY_CHARS + 1} characters; the limit is 256" in caught.value.message


@pytest.mark.parametrize("value", [42, 1.5, True, ["claim-1"]])
def test_an_oip_parameter_that_is_not_a_string_is_refused_by_its_name(value: object) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_routing_key(value, "perito_routing_key")
    assert caught.value.field == "perito_routing_key"
    assert "must be a string" in caught.value.message


def test_every_part_of_a_split_classify_carries_the_key() -> None:
    images = [b"\x89PNG" + bytes([i]) * 10 for i in range(5)]
    template, parts, _ = classify_parts(
        images,
        model="car-damage@production",
        version="",
        top_k=1,
        confidence_threshold=0.0,
        ids=None,
        limits=Limits(max_images_per_request=2),
        routing_key="claim-7",
    )
    assert len(parts) == 3 and template.routing_key == "claim-7"
