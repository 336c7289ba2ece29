"""perito_core.listening: which hosts count as loopback, how addresses are written, and
sockets bound exactly (real sockets, no mocks)."""

from __future__ import annotations

import socket

import pytest

from perito_core import listening
from perito_core.listening import ListenError, bind_tcp, host_port, is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("[::]", False),
        ("192.0.2.2", False),
        ("::ffff:192.0.2.2", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("host", "written"),
    [("127.0.0.1", "127.0.0.1:8500"), ("::1", "[::1]:8500"), ("[::1]", "[::1]:8500")],
)
def test_addresses_are_written_with_brackets_for_ipv6(host: str, written: str) -> None:
    assert host_port(host, 8500) == written


def test_port_zero_is_one_picked_port_read_back_from_the_process() -> None:
    sockets = bind_tcp("127.0.0.1", 0, "test")
    try:
        (address,) = listening.socket_names(sockets)
        assert not address.endswith(":0")
        assert address in listening.listening_sockets().values()
    finally:
        for sock in sockets:
            sock.close()


def test_ipv6_wildcard_takes_no_ipv4() -> None:
    try:
        sockets = bind_tcp("::", 0, "test")
    except ListenError:
        pytest.skip("no IPv6 here")
    try:
        port = sockets[0].getsockname()[1]
        assert sockets[0].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        with socket.socket() as ipv4:  # the same port on IPv4 is still free
            ipv4.bind(("127.0.0.1", port))
    finally:
        for sock in sockets:
            sock.close()


def test_a_busy_port_names_the_address_and_leaves_nothing_bound() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = listening.listening_sockets()
        with pytest.raises(ListenError) as raised:
            bind_tcp("localhost", port, "HTTP")
        assert str(raised.value) == (
            f"HTTP: cannot listen on 127.0.0.1:{port}: Address already in use"
        )
        assert listening.listening_sockets() == before
        assert listening.bind_failure("127.0.0.1", port) == "Address already in use"


def test_an_address_not_of_this_machine() -> None:
    with pytest.raises(ListenError, match=r"metrics: cannot listen on 192\.0\.2\.123:9500: "):
        bind_tcp("192.0.2.123", 9500, "metrics")
