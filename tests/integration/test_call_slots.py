"""No caller takes every gRPC call the server has. A tenant that opened calls and never sent
their request messages held all of `max_concurrent_rpcs` (1,000): every other tenant's calls,
and the health checks, were refused by gRPC itself, and the calls were never timed out.

Calls are counted per tenant from the moment they arrive (`max_calls_per_tenant`, 4 here),
the calls without a token together (`max_open_calls`, 3 here), and a unary call's message must
arrive within `request_arrival_s` (2 s here), as must an HTTP request's body (it was never
timed out: eight connections that sent 49 MiB of a 50 MiB body held 400 MB). Real server, real
sockets, grpcio's own client.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

import perito
from tests.conftest import two_tenants_serving
from tests.helpers import ServerThread, red_jpeg

pytestmark = pytest.mark.integration

CLASSIFY = "/perito.v1.Perito/Classify"
HEALTH = "/grpc.health.v1.Health/Check"


@pytest.fixture
def server(tmp_path: Path, tiny_model_file: Path) -> Iterator[tuple[ServerThread, dict[str, str]]]:
    with two_tenants_serving(
        tmp_path,
        tiny_model_file,
        max_calls_per_tenant=4,
        max_open_calls=3,
        request_arrival_s=2.0,
        http_port=0,
    ) as served:
        yield served


def _silent_calls(
    channel: grpc.Channel, method: str, count: int, token: str | None, stop: threading.Event
) -> list[Any]:
    """`count` calls to `method` whose request message never comes (until `stop`)."""

    def never() -> Iterator[bytes]:
        stop.wait(30)
        return
        yield b""  # pragma: no cover - a generator that sends nothing

    call = channel.stream_unary(method, request_serializer=None, response_deserializer=None)
    metadata = [("authorization", f"Bearer {token}")] if token else None
    return [call.future(never(), metadata=metadata, timeout=30) for _ in range(count)]


def _health_check(channel: grpc.Channel) -> Any:
    """grpc.health.v1's Check on `channel`, as a callable."""
    return channel.unary_unary(
        HEALTH,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )


def _all_late(held: list[Any]) -> None:
    """Each silent call ended DEADLINE_EXCEEDED, its message 2 s late."""
    for future in held:
        error: Any = future.exception(timeout=20)
        assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not arrive within 2 s" in error.details(), error.details()


def _reason(error: Any) -> str:
    status = rpc_status.from_call(error)
    return str(status) if status is not None else ""


def test_one_tenants_silent_calls_leave_the_others_and_the_probes_room(
    server: tuple[ServerThread, dict[str, str]],
) -> None:
    running, tokens = server
    stop = threading.Event()
    with grpc.insecure_channel(running.target) as channel:
        try:
            held = _silent_calls(channel, CLASSIFY, 4, tokens["globex"], stop)
            time.sleep(0.5)  # the server has them all
            with (
                perito.Client(
                    running.target, token=tokens["globex"], timeout=10, max_retries=0
                ) as globex,
                pytest.raises(perito.ResourceExhaustedError) as refused,
            ):
                globex.classify([red_jpeg()], model="tiny")
            assert "4 calls in progress" in str(refused.value), refused.value
            # Another tenant, and a probe, are answered meanwhile.
            with perito.Client(running.target, token=tokens["acme"], timeout=10) as acme:
                assert acme.classify([red_jpeg()], model="tiny")[0].predictions
            check = _health_check(channel)
            assert check(health_pb2.HealthCheckRequest(), timeout=10).status == 1  # SERVING
            # The silent calls end once their messages are 2 s late; the tenant's room is back.
            _all_late(held)
            with perito.Client(running.target, token=tokens["globex"], timeout=10) as globex:
                assert globex.classify([red_jpeg()], model="tiny")[0].predictions
        finally:
            stop.set()


def test_calls_without_a_token_share_their_own_room(
    server: tuple[ServerThread, dict[str, str]],
) -> None:
    running, tokens = server
    stop = threading.Event()
    with grpc.insecure_channel(running.target) as channel:
        try:
            held = _silent_calls(channel, HEALTH, 3, None, stop)
            time.sleep(0.5)
            check = _health_check(channel)
            with pytest.raises(grpc.RpcError) as refused:
                check(health_pb2.HealthCheckRequest(), timeout=10)
            error: Any = refused.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert "QUOTA_CONCURRENT_CALLS" in _reason(error) or "calls without a token" in (
                error.details()
            )
            with perito.Client(running.target, token=tokens["acme"], timeout=10) as acme:
                assert acme.classify([red_jpeg()], model="tiny")[0].predictions
            _all_late(held)
        finally:
            stop.set()


def test_an_http_body_that_stops_arriving_is_answered_408(
    server: tuple[ServerThread, dict[str, str]],
) -> None:
    import socket

    running, tokens = server
    port = running.running.http_port  # type: ignore[attr-defined]
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        raw.sendall(
            b"POST /v1/models/tiny:classify HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {tokens['acme']}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
            + b'{"images": ['
        )
        started = time.monotonic()
        answer = _answer(raw).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "did not arrive whole within 2 s" in answer, answer
    assert time.monotonic() - started < 10


def test_http_requests_hold_the_tenants_share_of_calls(
    server: tuple[ServerThread, dict[str, str]],
) -> None:
    """A tenant's HTTP requests and gRPC calls count together: with its 4 calls held by HTTP
    bodies that never finish, its next request (either door) is refused, another tenant's is
    answered, and its room is back once the bodies are 2 s late."""
    import socket

    import httpx

    running, tokens = server
    port = running.running.http_port  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}/v1/models/tiny:classify"
    stalled = []
    try:
        for _ in range(4):
            raw = socket.create_connection(("127.0.0.1", port), timeout=20)
            raw.sendall(
                b"POST /v1/models/tiny:classify HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {tokens['globex']}\r\n".encode()
                + b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
            )
            stalled.append(raw)
        time.sleep(0.5)
        body = {"images": [{"content": base64.b64encode(red_jpeg()).decode()}]}
        refused = httpx.post(url, json=body, headers=_bearer(tokens["globex"]), timeout=10)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["details"][0]["reason"] == "QUOTA_CONCURRENT_CALLS"
        assert "4 calls in progress" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"] == "1"
        with (
            perito.Client(running.target, token=tokens["globex"], timeout=10, max_retries=0) as c,
            pytest.raises(perito.ResourceExhaustedError),
        ):
            c.classify([red_jpeg()], model="tiny")
        answered = httpx.post(url, json=body, headers=_bearer(tokens["acme"]), timeout=10)
        assert answered.status_code == 200, answered.text
        for raw in stalled:
            assert _answer(raw).startswith(b"HTTP/1.1 408")
        again = httpx.post(url, json=body, headers=_bearer(tokens["globex"]), timeout=10)
        assert again.status_code == 200, again.text
    finally:
        for raw in stalled:
            raw.close()


def test_a_request_whose_headers_never_end_is_answered_408_and_closed(
    server: tuple[ServerThread, dict[str, str]],
) -> None:
    """A connection that opens and sends nothing, and one that sends its headers a byte at a
    time without ending them, are each answered 408 and closed once 2 s have passed (uvicorn
    kept both open for as long as the caller liked); the same within a kept-alive connection
    after its first answer."""
    import socket

    running, _ = server
    port = running.running.http_port  # type: ignore[attr-defined]
    started = time.monotonic()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=20) as silent,
        socket.create_connection(("127.0.0.1", port), timeout=20) as trickle,
    ):
        deadline = started + 6
        for byte in b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                break  # closed under it
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for raw in (silent, trickle):
            answer = _answer(raw)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert b"HEADERS_STALLED" in answer and b"within 2 s" in answer, answer
            assert raw.recv(4096) == b""  # closed
    assert time.monotonic() - started < 6
    with socket.create_connection(("127.0.0.1", port), timeout=20) as kept:
        kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _answer(kept).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        assert _answer(kept).startswith(b"HTTP/1.1 408")


def _answer(raw: Any) -> bytes:
    """One whole HTTP answer from socket `raw`: its head, and its body by Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = raw.recv(4096)
        assert chunk, data  # closed before its head was whole
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = raw.recv(4096)
        assert chunk, data + body
        body += chunk
    return head + b"\r\n\r\n" + body


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
