"""A failure nobody foresaw (a bug, a full disk) reaches the caller as INTERNAL / HTTP 500 that
names the call's request id and nothing else: the exception's text (a path, a host, another
tenant's name) stays in the operator's log, under that request id, with its traceback.

The fault is injected into a real server (its service's `classify` raises) and the calls go
over real sockets, through the SDK (gRPC) and plain HTTP (the JSON API).
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import perito
from tests.conftest import tiny_registry
from tests.helpers import ServerThread, logged, red_jpeg

pytestmark = pytest.mark.integration

SECRET = "/srv/tenants/other-customer/claims-2026/model.pt"


@pytest.fixture
def server(tmp_path: Path, tiny_model_file: Path) -> Iterator[ServerThread]:
    registry = tiny_registry(tmp_path / "registry", tiny_model_file)
    with ServerThread.serving(
        registry, tmp_path / "cache", preload=["tiny"], http_port=0
    ) as running:

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise OSError(28, "No space left on device", SECRET)

        running.running.service.classify = broken  # type: ignore[attr-defined]
        yield running


def test_an_unforeseen_failure_names_the_request_id_never_the_exception_text(
    server: ServerThread,
) -> None:
    with (
        logged("perito_server.errors", logging.ERROR) as lines,
        perito.Client(server.target, timeout=30) as client,
        pytest.raises(perito.InternalError) as raised,
    ):
        client.classify([red_jpeg()], model="tiny")
    message = str(raised.value)
    assert re.search(
        r"internal error \(request id [\w-]+\): the server's log has its cause", message
    )
    assert SECRET not in message and "No space" not in message and "OSError" not in message
    # The id the caller was given is in the log line itself: the text format has no field.
    call = re.search(r"request id ([\w-]+)\)", message)
    assert call is not None
    assert any(f"Classify failed (request id {call[1]})" in line for line in lines), lines

    http = server.running.http_port  # type: ignore[attr-defined]
    body = {"images": [{"content": base64.b64encode(red_jpeg()).decode()}]}
    answer = httpx.post(f"http://127.0.0.1:{http}/v1/models/tiny:classify", json=body, timeout=30)
    assert answer.status_code == 500
    call = answer.headers["x-request-id"]
    assert f"request id {call}" in answer.text
    assert SECRET not in answer.text and "No space" not in answer.text
