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


def test_each_page_size_comment_gives_the_servers_numbers() -> None:
    """The proto comments (and so docs/api.md) say the default and largest page that
    perito_server.paging holds: a change of one without the other fails here."""
    from perito_server import paging

    sections = {s.split("\n")[0]: s for s in render(descriptor_set()).split("\n#### ")}
    lists = {
        "ListModelsRequest": paging.LIST_MODELS,
        "ListJobsRequest": paging.LIST_JOBS,
        "ListJobResultsRequest": paging.LIST_JOB_RESULTS,
    }
    paged = {name for name, section in sections.items() if "| `page_size` |" in section}
    assert paged == set(lists)
    for name, sizes in lists.items():
        (row,) = [line for line in sections[name].splitlines() if "| `page_size` |" in line]
        assert f"0 means {sizes.default}, more than {sizes.largest} means {sizes.largest}" in row
        assert "negative is INVALID_ARGUMENT" in row


def test_the_page_table_of_other_clients_gives_the_servers_numbers() -> None:
    from perito_server import paging

    text = (DEFAULT_OUT.parent / "other-clients.md").read_text()
    for name, sizes in {
        "models": paging.LIST_MODELS,
        "jobs": paging.LIST_JOBS,
        "a job's results": paging.LIST_JOB_RESULTS,
    }.items():
        assert f"| {name} | {sizes.default} | {sizes.largest} |" in text, name
