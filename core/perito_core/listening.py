"""Listening sockets: the host and port an operator gives, bound exactly and named as bound.

Every listener of `perito serve`, `perito worker` and `perito web` binds through here (gRPC
binds its own sockets; `grpc_target` writes its address and `listening_sockets` reads back
what it bound). A host is an IPv4 or IPv6 literal (`127.0.0.1`, `::1` or `[::1]`) or a name
(`localhost` binds every address it resolves to, 127.0.0.1 and ::1, on one port); port 0
asks the operating system for a free one. Logs name the sockets bound (`[::1]:41234`), never
the string asked for. Standard library only: `perito web` imports it without the server's
dependencies.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

LOOPBACK_NAMES = ("localhost",)


class ListenError(RuntimeError):
    """A listener could not start: `what` (gRPC, HTTP, metrics, ...) on `address`
    (`host:port`), and why (`reason`, the operating system's words)."""

    def __init__(self, what: str, address: str, reason: str) -> None:
        super().__init__(f"{what}: cannot listen on {address}: {reason}")
        self.what, self.address, self.reason = what, address, reason


def bare_host(host: str) -> str:
    """`host` as `getaddrinfo` takes it: `[::1]` -> `::1`; other forms unchanged."""
    host = host.strip()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def host_port(host: str, port: int) -> str:
    """`127.0.0.1:8500`, `[::1]:8500`, `localhost:8500`: an address as logs, URLs and gRPC
    targets write it (an IPv6 literal in brackets)."""
    host = bare_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback literals (127.0.0.0/8, ::1, either bracketed); False
    for anything else, other names included (they may resolve beyond loopback)."""
    host = bare_host(host)
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(bare_host(host))
    except ValueError:
        return False
    return True


def bind_tcp(host: str, port: int, what: str, backlog: int = 1024) -> list[socket.socket]:
    """Listening TCP sockets on every address `host` resolves to, all on one port: `port`, or
    for 0 the one the operating system picks for the first. An IPv6 socket is IPv6 only (`::`
    does not take IPv4 as well); SO_REUSEADDR lets a restart bind over connections still in
    TIME_WAIT, never over another listener.

    Raises:
        ListenError: `host` does not resolve, or an address cannot be bound (in use, not an
            address of this machine, a port below 1024 without the right); nothing stays bound.
    """
    address = host_port(host, port)
    # `localhost` is both loopbacks whatever /etc/hosts says, as gRPC binds it (RFC 6761).
    names = ["127.0.0.1", "::1"] if bare_host(host).lower() in LOOPBACK_NAMES else [host]
    try:
        found = [
            info
            for name in names
            for info in socket.getaddrinfo(
                bare_host(name), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        ]
    except (OSError, UnicodeError) as error:
        raise ListenError(what, address, f"cannot resolve {bare_host(host)!r}: {error}") from None
    # A name's address this machine lacks (::1 for `localhost` without IPv6) is skipped, as
    # gRPC skips it; a literal's is an error, and so is a name with no address bound.
    literal = _is_literal(host)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, str]] = set()
    missing: ListenError | None = None
    try:
        for family, kind, proto, _, sockaddr in found:
            ip = str(sockaddr[0])
            if (family, ip) in seen:
                continue
            seen.add((family, ip))
            chosen = sockets[0].getsockname()[1] if sockets else port
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as error:
                missing = ListenError(what, host_port(ip, chosen), error.strerror or str(error))
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((ip, chosen, *sockaddr[2:]))
            except OSError as error:
                failure = ListenError(what, host_port(ip, chosen), error.strerror or str(error))
                if literal or error.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    raise failure from None
                sockets.pop().close()
                missing = failure
                continue
            sock.listen(backlog)
        if not sockets:
            raise missing or ListenError(what, address, "no address to bind")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_failure(host: str, port: int) -> str:
    """Why `host:port` cannot be bound now, in the operating system's words ("Address already
    in use"): for listeners that bind for themselves and do not say (gRPC)."""
    try:
        sockets = bind_tcp(host, port, "")
    except ListenError as error:
        return error.reason
    for sock in sockets:
        sock.close()
    return "refused by the listener (free when tried again)"


def socket_names(sockets: Iterable[socket.socket]) -> list[str]:
    """The `host:port` each socket is bound to (`[::1]:41234`)."""
    return [host_port(*sock.getsockname()[:2]) for sock in sockets]


def listening_sockets(pid: int | str = "self") -> dict[int, str]:
    """The TCP sockets process `pid` listens on, by inode: `{inode: "127.0.0.1:8500"}`; an
    IPv4 address held by an IPv6 socket (`::ffff:127.0.0.1`, as gRPC binds) reads as IPv4.
    Linux only (`/proc`); elsewhere `{}`."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
    found = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] != "0A" or int(fields[9]) not in inodes:  # 0A: LISTEN
                    continue
                hex_ip, hex_port = fields[1].split(":")
                found[int(fields[9])] = host_port(_proc_ip(hex_ip), int(hex_port, 16))
    return found


def _proc_ip(text: str) -> str:
    """An address as /proc/net/tcp{,6} prints it (32-bit words in host byte order)."""
    raw = b"".join(
        int(text[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(text), 8)
    )
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per request (a scrape every few seconds)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingWsgi(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, app: Callable[..., Any]) -> None:
        self.address_family = sock.family
        super().__init__(sock.getsockname(), _QuietHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        host, port = sock.getsockname()[:2]
        # What server_bind sets, without binding again (and without a reverse DNS lookup).
        self.server_address = sock.getsockname()
        self.server_name, self.server_port = host, port
        self.setup_environ()
        self.set_app(app)


class WsgiListener:
    """A WSGI app (Prometheus `/metrics`) served on already bound sockets, a daemon thread
    each; `addresses` names them."""

    def __init__(self, app: Callable[..., Any], sockets: list[socket.socket], what: str) -> None:
        self.addresses = socket_names(sockets)
        self.port: int = sockets[0].getsockname()[1]
        self._servers = [_ThreadingWsgi(sock, app) for sock in sockets]
        for server, address in zip(self._servers, self.addresses, strict=True):
            thread = threading.Thread(
                target=server.serve_forever, name=f"{what} {address}", daemon=True
            )
            thread.start()

    def close(self) -> None:
        """Stop answering and close the sockets."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []
