"""uvicorn serving the HTTP doors' Starlette app on the gRPC server's event loop.

Served on `--host`:`--http-port`, in the same process and event loop as the gRPC server
(`perito_server.app`), so both share the model pool, the dynamic batchers and their limits.
uvicorn parses HTTP with `httptools` (C).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette

from perito_core import listening
from perito_server.settings import ServerSettings


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
            http="httptools",
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
