"""The server's prediction-log records (`perito_server.predictions`), written to a local
folder as the tenant reads them: a refusal by something other than a Perito error says only
"internal error", and a queued record holds the call's image bytes once (the queue's byte
bound counts them), never the request they came in nor a refusal's traceback."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from perito.v1 import classify_pb2, image_pb2
from perito_core.access.tenancy import Tenant, Tenants
from perito_core.prediction_log import read_events
from perito_server.predictions import Outcome, PredictionRecorder
from perito_server.settings import ServerSettings


def _recorder(tmp_path: Path) -> PredictionRecorder:
    settings = ServerSettings(
        registry=str(tmp_path / "registry"), prediction_log_uri=str(tmp_path / "log")
    )
    return PredictionRecorder(settings, Tenants())


def _written(recorder: PredictionRecorder, tmp_path: Path) -> list[dict[str, Any]]:
    recorder.start()
    recorder.close(timeout_s=10)
    files = sorted((tmp_path / "log" / "records").rglob("*.jsonl"))
    return [event["data"] for path in files for event in read_events(path.read_text())]


def _request(content: bytes) -> classify_pb2.ClassifyRequest:
    return classify_pb2.ClassifyRequest(
        model="tiny",
        top_k=3,
        quality_policy=classify_pb2.QUALITY_POLICY_REFUSE,
        images=[image_pb2.Image(id="claim-1.jpg", content=content)],
    )


def test_a_python_error_reaches_the_tenants_log_as_internal_error_only(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path)
    request = _request(b"\xff\xd8 not a photo")
    error = ValueError("need 50 finite probabilities in /srv/perito/secret-path")
    recorder.record(
        Tenant.unrestricted("default"),
        request,
        [request.images[0].content],
        Outcome(error=error),
        model="tiny",
        nbytes=14,
    )
    [data] = _written(recorder, tmp_path)
    assert data["outcome"] == "INTERNAL"
    assert data["error"]["message"] == "internal error"
    assert "secret-path" not in str(data) and "ValueError" not in str(data)


def test_a_queued_record_holds_no_reference_to_the_request(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path)
    content = bytes(1 << 20)
    request = _request(content)
    contents = [image.content for image in request.images]

    def refused() -> BaseException:
        held = request  # the refusal's traceback holds this frame, and so the request
        try:
            raise ValueError(held.model)
        except ValueError as error:
            return error

    def answered() -> Outcome:
        return Outcome(response=classify_pb2.ClassifyResponse())

    before = sys.getrefcount(request)
    for outcome in (answered, lambda: Outcome(error=refused())):
        recorder.record(
            Tenant.unrestricted("default"),
            request,
            contents,
            outcome(),
            model="tiny",
            nbytes=len(content),
        )
    assert sys.getrefcount(request) == before
    assert recorder.log.queued == (2, 2 * len(content))
    # The options are kept all the same, the image by its id, its content never in the record.
    for data in _written(recorder, tmp_path):
        assert data["request"]["top_k"] == 3
        assert data["request"]["quality_policy"] == "QUALITY_POLICY_REFUSE"
        assert data["request"]["images"] == [{"id": "claim-1.jpg"}]
        assert data["inputs"][0]["id"] == "claim-1.jpg"
        assert data["inputs"][0]["bytes"] == len(content)
