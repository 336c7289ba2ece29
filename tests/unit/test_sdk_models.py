"""The SDK's typed results, from the messages the server sends."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import perito
from perito.v1 import classify_pb2, jobs_pb2, models_pb2


def test_a_job_from_its_message() -> None:
    # Fields the result has under the message's names, with the message's values.
    same: dict[str, Any] = {
        "id": "j",
        "model": "m",
        "model_version": "2",
        "output_uri": "s3://out/",
        "result_uris": ["s3://out/r.jsonl"],
        "error": "e",
        "labels": {"site": "7"},
        "tenant": "acme",
    }
    message = jobs_pb2.Job(
        state=jobs_pb2.JOB_STATE_PARTIALLY_SUCCEEDED,
        total_items=5,
        succeeded_items=2,
        failed_items=1,
        cancelled_items=1,
        **same,
    )
    message.start_time.FromSeconds(5)
    job = perito.Job._from_proto(message)
    assert job == perito.Job(
        state=perito.JobState.PARTIALLY_SUCCEEDED,
        total=5,
        succeeded=2,
        failed=1,
        cancelled=1,
        created=None,
        started=datetime(1970, 1, 1, 0, 0, 5, tzinfo=UTC),
        finished=None,
        **same,
    )
    assert job.terminal and job.done == 4


def test_item_results_from_their_messages() -> None:
    scores: dict[str, Any] = {
        "image_id": "a.jpg",
        "margin": 0.5,
        "normalized_entropy": 0.25,
        "uncertain": True,
        "first_frame_only": True,
        "form": "openvino-int8",
    }
    top = classify_pb2.Prediction(label="cat", class_index=1, probability=0.75)
    item = perito.JobItemResult._from_proto(
        jobs_pb2.JobItemResult(
            index=3,
            image_id="a.jpg",
            uri="s3://in/a.jpg",
            state=jobs_pb2.ITEM_STATE_SUCCEEDED,
            classification=classify_pb2.Classification(predictions=[top], **scores),
        )
    )
    assert (item.index, item.image_id, item.uri, item.state, item.error) == (
        3,
        "a.jpg",
        "s3://in/a.jpg",
        perito.ItemState.SUCCEEDED,
        "",
    )
    expected = perito.Classification(predictions=[perito.Prediction("cat", 1, 0.75)], **scores)
    assert item.classification == expected
    failed = perito.JobItemResult._from_proto(
        jobs_pb2.JobItemResult(index=4, state=jobs_pb2.ITEM_STATE_FAILED, error="truncated")
    )
    assert failed.state == perito.ItemState.FAILED and failed.classification is None


def test_a_model_and_its_versions_from_their_messages() -> None:
    same: dict[str, Any] = {
        "model": "m",
        "version": "2",
        "aliases": ["production"],
        "labels": ["cat", "dog"],
        "input_height": 224,
        "input_width": 224,
        "sha256": "abc",
        "description": "d",
        "loaded": True,
    }
    version = models_pb2.ModelVersion(**same)
    version.create_time.FromSeconds(60)
    card = {"accuracy": 0.9, "epochs": 26, "confusion_matrix": [[5, 0], [1, 4]], "ece": 0.0}
    version.card.update(card)
    model = perito.Model._from_proto(
        models_pb2.Model(
            name="m",
            latest_version="2",
            aliases={"production": "2"},
            versions=[version, models_pb2.ModelVersion(model="m", version="1")],
        )
    )
    assert (model.name, model.latest_version, model.aliases) == ("m", "2", {"production": "2"})
    assert model.versions[0] == perito.ModelVersion(
        created=datetime(1970, 1, 1, 0, 1, tzinfo=UTC), card=card, **same
    )
    assert model.versions[0].created is not None
    assert model.versions[0].created.utcoffset() is not None  # aware: never read as local time
    # Struct holds numbers as doubles; the card's whole numbers come back as ints.
    assert type(model.versions[0].card["confusion_matrix"][1][0]) is int
    assert model.versions[1].created is None and model.versions[1].card == {}


def _job(state: perito.JobState, succeeded: int, **times: datetime) -> perito.Job:
    return perito.Job(
        id="j", state=state, model="m", model_version="1", total=100, succeeded=succeeded,
        failed=0, cancelled=0, created=None, started=times.get("started"),
        finished=times.get("finished"), output_uri="", result_uris=[], error="",
    )  # fmt: skip


def test_the_progress_rate_is_the_jobs_own_not_the_bars() -> None:
    import io

    from perito._progress import ProgressBar

    # A job that ended before the bar was made: 100 images in its own 20 s, not "in no time".
    out = io.StringIO()
    started, finished = datetime(2026, 1, 1, 0, 0, 0), datetime(2026, 1, 1, 0, 0, 20)
    ProgressBar(out).update(
        _job(perito.JobState.SUCCEEDED, 100, started=started, finished=finished)
    )
    assert "100/100" in out.getvalue() and "  5.0 img/s" in out.getvalue()
    # A running job half done when the bar starts: what was done before does not count.
    out = io.StringIO()
    ProgressBar(out).update(_job(perito.JobState.RUNNING, 50, started=started))
    assert "50/100" in out.getvalue() and "  0.0 img/s" in out.getvalue()
