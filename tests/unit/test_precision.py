"""Which precision serves a request: the caller may ask only for a more exact form than the
server's setting (`perito_core.models.selection.requested_precision`)."""

from __future__ import annotations

import pytest

from perito_core.errors import InvalidArgument
from perito_core.models.selection import requested_precision


@pytest.mark.parametrize(
    ("requested", "server", "served"),
    [
        ("", "auto", "auto"),
        ("", "int8", "int8"),
        ("int8", "int8", "int8"),
        ("int8", "auto", "int8"),
        ("bf16", "int8", "bf16"),
        ("fp32", "auto", "fp32"),
        ("torchscript", "fp32", "torchscript"),
        ("torchscript", "torchscript", "torchscript"),
    ],
)
def test_as_exact_or_more_exact_is_served(requested: str, server: str, served: str) -> None:
    assert requested_precision(requested, server) == served


@pytest.mark.parametrize(
    ("requested", "server"),
    [
        ("int8", "fp32"),
        ("auto", "int8"),
        ("fp32", "torchscript"),
        ("fp64", "auto"),
        ("FP32", "auto"),
    ],
)
def test_less_exact_or_unknown_is_refused_naming_the_field(requested: str, server: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        requested_precision(requested, server)
    assert refused.value.field == "precision"
    assert requested in refused.value.message or "one of" in refused.value.message
