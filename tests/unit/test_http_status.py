"""One error, one HTTP status, whichever HTTP door it comes through: the server's OIP REST and
JSON API (`errors.to_http`) and the web page (its handler of the SDK's errors)."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import Request

import perito
from perito_core import errors as core_errors
from perito_server.errors import to_http
from perito_web.app import create_app

# Each core error and the SDK error its gRPC status becomes for the web page.
PAIRS = [
    (core_errors.InvalidArgument, perito.InvalidArgumentError),
    (core_errors.NotFound, perito.NotFoundError),
    (core_errors.FailedPrecondition, perito.FailedPreconditionError),
    (core_errors.PermissionDenied, perito.PermissionDeniedError),
    (core_errors.Unauthenticated, perito.UnauthenticatedError),
    (core_errors.QueueFull, perito.ResourceExhaustedError),
    (core_errors.DeadlineExceeded, perito.DeadlineExceededError),
    (core_errors.StorageUnavailable, perito.UnavailableError),
]


@pytest.mark.parametrize(("core_error", "sdk_error"), PAIRS)
def test_the_web_page_answers_the_status_the_server_answers(
    core_error: type[core_errors.PeritoError], sdk_error: type[perito.PeritoError]
) -> None:
    server_status, _, _ = to_http(core_error("refused"))
    app = create_app("127.0.0.1:1")
    handler = app.exception_handlers[perito.PeritoError]
    request = Request({"type": "http", "method": "GET", "path": "/api/x", "headers": []})
    response = asyncio.run(handler(request, sdk_error("refused")))
    assert response.status_code == server_status
    assert json.loads(bytes(response.body))["code"] == sdk_error.code.name
