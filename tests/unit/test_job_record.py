"""What a job's owner is told of its locations (`Job.shown_output_uri`, `shown_result_uris`,
`ItemInput.shown_uri`): their own words, never where a link led or the server's folder."""

from __future__ import annotations

from perito_core.jobs.items import ItemInput
from perito_core.jobs.store import Job, JobState


def _job(output_uri: str, shown: str | None, written: bool = True) -> Job:
    base = output_uri.rstrip("/")
    uris = [f"{base}/results.jsonl", f"{base}/results.csv"] if written else []
    return Job(
        "j1",
        JobState.SUCCEEDED,
        "m",
        "1",
        1,
        output_uri=output_uri,
        output_shown=shown,
        result_uris=uris,
    )


def test_results_are_named_under_the_callers_own_output_uri() -> None:
    job = _job("/data/real/out/", "/data/link/out/")
    assert job.shown_output_uri == "/data/link/out/"
    assert job.shown_result_uris == ["/data/link/out/results.jsonl", "/data/link/out/results.csv"]


def test_the_servers_results_location_is_shown_to_nobody_who_may_not_be_told() -> None:
    job = _job("/srv/perito/var/results/j1", "")
    assert (job.shown_output_uri, job.shown_result_uris) == ("", [])


def test_a_job_recorded_before_shows_its_output_uri() -> None:
    job = _job("s3://results/jobs/j1", None)
    assert job.shown_output_uri == "s3://results/jobs/j1"
    assert job.shown_result_uris == job.result_uris
    assert _job("s3://b/x", "s3://b/x", written=False).shown_result_uris == []


def test_an_items_record_keeps_the_callers_words_only_where_they_differ() -> None:
    linked = ItemInput("a.jpg", "/data/real/a.jpg", given="/data/link/a.jpg")
    assert linked.as_record() == {
        "id": "a.jpg",
        "uri": "/data/real/a.jpg",
        "given": "/data/link/a.jpg",
    }
    assert ItemInput.from_record(linked.as_record()) == linked
    assert linked.shown_uri == "/data/link/a.jpg"
    plain = ItemInput("b.jpg", "s3://b/b.jpg")
    assert plain.as_record() == {"id": "b.jpg", "uri": "s3://b/b.jpg"}
    assert ItemInput.from_record(plain.as_record()).shown_uri == "s3://b/b.jpg"


def test_the_cli_says_how_to_read_results_it_is_not_told_the_location_of() -> None:
    from perito import Job as SdkJob
    from perito import JobState as SdkState
    from perito._cli import _job_line

    def job(result_uris: list[str], error: str = "") -> SdkJob:
        return SdkJob(
            "j1", SdkState.SUCCEEDED, "m", "1", 2, 2, 0, 0, None, None, None, "", result_uris, error
        )

    assert _job_line(job([])).endswith("\n  results: perito job results j1")
    assert _job_line(job(["s3://b/out/results.jsonl"])).endswith(
        "results: s3://b/out/results.jsonl"
    )
    assert "perito job results" not in _job_line(job([], error="results could not be written"))
