"""uvicorn serving the HTTP doors' Starlette app on the gRPC server's event loop.

Served on `--host`:`--http-port`, in the same process and event loop as the gRPC server
(`perito_server.app`), so both share the model pool, the dynamic batchers and their limits.
uvicorn parses HTTP with `httptools` (C), through `_HeadersInTime`: uvicorn bounds an idle
connection's wait (keep-alive) and Perito a body's (`HttpEdge.body`), but nothing bounded a
request whose headers never end, so a caller could hold connections (and their memory) open
forever by sending a byte now and then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from perito_core import listening
from perito_core.errors import DeadlineExceeded, InvalidArgument, PeritoError
from perito_server.errors import to_http
from perito_server.settings import ServerSettings


class HeadersStalled(DeadlineExceeded, reason="HEADERS_STALLED"):
    """A request's headers did not arrive whole in time (answered 408, the connection closed)."""


class _HeadersInTime(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a request's headers due whole within `headers_s`
    seconds of the connection opening or of its previous answer's end (nginx's
    `client_header_timeout`); past it the connection is answered 408 `HEADERS_STALLED` and
    closed. An idle connection is still closed sooner by uvicorn's keep-alive timeout; once
    the headers are whole the body has its own bound (`HttpEdge.body`)."""

    headers_s = 60.0  # set per server by `HttpServer.start`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers_due: asyncio.TimerHandle | None = None

    def _await_headers(self) -> None:
        self._headers_in()
        self._headers_due = self.loop.call_later(self.headers_s, self._headers_stalled)

    def _headers_in(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def _headers_stalled(self) -> None:
        self._headers_due = None
        if self.transport.is_closing():
            return
        error = HeadersStalled(
            f"the request's headers did not arrive whole within {self.headers_s:g} s"
        )
        self._close_with(b"408 Request Timeout", error)

    def send_400_response(self, msg: str) -> None:
        """What httptools cannot parse (a request line or header that is not HTTP/1.1, a URL
        over its bounds): answered 400 as JSON, as every other refusal, not uvicorn's plain
        text."""
        error = InvalidArgument(f"not an HTTP/1.1 request this server reads: {msg}")
        self._close_with(b"400 Bad Request", error)

    def _close_with(self, status: bytes, error: PeritoError) -> None:
        """Answer `error` (AIP-193's JSON, `status`'s code) and close the connection."""
        _, body, _ = to_http(error)
        body["error"]["code"] = int(status.split()[0])
        content = json.dumps(body).encode()
        self.transport.write(
            b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, len(content), content)
        )
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_in()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._headers_in()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's headers are due, unless they came already (pipelined).
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._await_headers()


class _Uvicorn(uvicorn.Server):
    """uvicorn's server without its signal handling: `perito serve` owns SIGTERM / SIGINT and
    stops HTTP with gRPC (`RunningServer.stop`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """uvicorn serving an ASGI app as a task on the running event loop (the gRPC server's)."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], addresses: list[str]):
        self._server = server
        self._task = task
        self.addresses = addresses  # as bound: ["127.0.0.1:8000", "[::1]:8000"]
        self.port = int(addresses[0].rpartition(":")[2])

    @classmethod
    async def start(cls, app: Starlette, settings: ServerSettings, *, grace: float) -> HttpServer:
        """Bind `settings.host:settings.http_port` (every address of a name, one port; 0 picks
        it) and serve, TLS with the gRPC port's files.

        Raises:
            perito_core.listening.ListenError: an address could not be bound (in use, not this
                machine's); nothing stays bound.
        """
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.http_port or 0,
            log_level="warning",
            access_log=False,
            http=type(
                "HeadersInTime", (_HeadersInTime,), {"headers_s": settings.request_arrival_s}
            ),
            lifespan="off",
            ssl_certfile=settings.tls_cert_file,
            ssl_keyfile=settings.tls_key_file,
            timeout_graceful_shutdown=max(1, math.ceil(grace)),
            server_header=False,
        )
        # Bound here rather than by uvicorn, which answers a busy port with sys.exit(1) and
        # binds one address of a name.
        sockets = listening.bind_tcp(settings.host, settings.http_port or 0, "HTTP")
        addresses = listening.socket_names(sockets)
        server = _Uvicorn(config)
        task = asyncio.create_task(server.serve(sockets=sockets), name="http")
        while not server.started:
            if task.done():
                for sock in sockets:
                    sock.close()
                task.result()  # raises what stopped it
                raise RuntimeError(f"HTTP on {', '.join(addresses)} stopped before it started")
            await asyncio.sleep(0.01)
        return cls(server, task, addresses)

    async def stop(self) -> None:
        """Stop accepting, let requests in progress finish (within the grace), then return."""
        self._server.should_exit = True
        await self._task
