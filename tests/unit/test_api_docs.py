"""docs/api.md is generated from the proto comments: regenerate and compare."""

from __future__ import annotations

from scripts.gen_api_docs import DEFAULT_OUT, descriptor_set, render


def test_the_api_reference_matches_the_protos() -> None:
    fresh = render(descriptor_set())
    assert DEFAULT_OUT.exists(), "docs/api.md is missing: run `make docs`"
    assert DEFAULT_OUT.read_text() == fresh, "docs/api.md is stale: run `make docs`"


def test_every_method_message_and_field_is_described() -> None:
    lines = render(descriptor_set()).splitlines()
    rows = [line for line in lines if line.startswith("| `")]
    assert len(rows) > 60
    undocumented = [row for row in rows if row.rstrip().endswith("|  |")]
    assert undocumented == [], "add comments in proto/ for these"
