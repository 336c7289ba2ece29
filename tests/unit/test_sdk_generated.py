"""The synchronous client (`client/perito/_client.py`) is generated from the async one
(`_async.py`) by `scripts/gen_sync_client.py`: regenerate and compare, and check that the
two offer the same methods with the same parameters."""

from __future__ import annotations

import inspect

import pytest

import perito
from scripts.gen_sync_client import HEADER, TARGET, generate


def test_the_sync_client_is_generated_from_the_async_one() -> None:
    checked_in = TARGET.read_text()
    assert checked_in.startswith(HEADER)
    assert checked_in == generate(), f"{TARGET} is stale: run `python scripts/gen_sync_client.py`"


@pytest.mark.parametrize(
    ("sync", "asynchronous"),
    [(perito.Client, perito.AsyncClient), (perito.JobHandle, perito.AsyncJobHandle)],
)
def test_sync_and_async_have_the_same_methods(sync: type, asynchronous: type) -> None:
    def methods(cls: type) -> dict[str, list[tuple[str, object, object]]]:
        return {
            name: [
                (p.name, p.kind, p.default)
                for p in inspect.signature(getattr(cls, name)).parameters.values()
            ]
            for name in dir(cls)
            if not name.startswith("_") and callable(getattr(cls, name))
        }

    assert methods(sync) == methods(asynchronous)
    assert methods(sync)  # not vacuous
