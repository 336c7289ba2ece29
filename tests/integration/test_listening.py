"""Listening addresses of real processes: `perito serve` (gRPC, health, HTTP, /metrics), the
worker's /metrics and `perito web` bind exactly the host and port asked for, log the sockets
as bound (the port the system picked for 0), stay on loopback without tenants, and end the
start with a message naming the address when it cannot be bound.

The sockets are read from the process (psutil), not from its logs.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import perito_proc, subprocess_env
from tests.processes import Proc, free_port

pytestmark = pytest.mark.integration

ADDRESS = r"(\d+\.\d+\.\d+\.\d+|\[[0-9a-f:]+\]):(\d+)"


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")


def listening(pid: int) -> set[str]:
    """`host:port` of every TCP socket `pid` listens on, an IPv4-mapped IPv6 address as IPv4."""
    found = set()
    for conn in psutil.Process(pid).net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN:
            continue
        ip = ipaddress.ip_address(conn.laddr.ip)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        found.add(f"[{ip}]:{conn.laddr.port}" if ip.version == 6 else f"{ip}:{conn.laddr.port}")
    return found


def logged(text: str, line: str) -> set[str]:
    """The addresses the log line starting with `line` names."""
    match = re.search(rf"{re.escape(line)}(.*)", text)
    assert match, f"no {line!r} line in:\n{text[-3000:]}"
    return {f"{host}:{port}" for host, port in re.findall(ADDRESS, match.group(1))}


def serve_env(work: Path, **env: str) -> dict[str, str]:
    """No tenants, an empty registry, and a job store nobody listens on (the server starts
    without it)."""
    return subprocess_env(
        PERITO_REGISTRY=str(work / "registry"),
        PERITO_CACHE_DIR=str(work / "cache"),
        PERITO_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        PERITO_TORCH_THREADS="1",
        **env,
    )


@pytest.fixture
def serve() -> Iterator[list[Proc]]:
    """Started `perito serve` processes, each stopped at the end."""
    started: list[Proc] = []
    yield started
    for process in started:
        process.stop()


def start_serve(
    started: list[Proc], work: Path, *args: str, ready: str = "perito: serving on", **env: str
) -> Proc:
    process = perito_proc(
        "perito serve", ["serve", *args], serve_env(work, **env), work / "serve.log", ready
    )
    started.append(process)
    return process.start(120)


def refused(work: Path, *args: str, **env: str) -> str:
    """Run `perito serve` that must not start: its exit code is non-zero and it listened on
    nothing; returns its output."""
    process = perito_proc(
        "perito serve", ["serve", *args], serve_env(work, **env), work / "refused.log", ""
    ).launch()
    try:
        code = process.wait(120)
    finally:
        process.stop()
    text = process.text()
    assert code != 0, text
    assert "Traceback" not in text, text
    return text


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        return int(check(health_pb2.HealthCheckRequest(), timeout=10).status)


def test_anonymous_server_listens_on_loopback_only_at_the_ports_it_logs(
    tmp_path: Path, serve: list[Proc]
) -> None:
    process = start_serve(
        serve,
        tmp_path,
        "--port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        "0",
        ready="perito: HTTP on",
        PERITO_HEALTH_PORT="0",
    )
    text = process.text()
    grpc_at = logged(text, "serving perito.v1.Perito on ")
    http_at = logged(text, "HTTP (OIP REST, JSON API) on ")
    metrics_at = logged(text, "metrics on ")
    health_at = logged(text, "health checks (plaintext) on ")
    assert logged(text, "perito: serving on ") == grpc_at
    assert logged(text, "perito: HTTP on ") == http_at
    bound = listening(process.pid)
    # Exactly what the log names, four different ports, all on 127.0.0.1 (no 0.0.0.0, no ::).
    assert bound == grpc_at | http_at | metrics_at | health_at, text
    assert len(bound) == 4 and all(address.startswith("127.0.0.1:") for address in bound)
    (grpc_address,) = grpc_at
    (health_address,) = health_at
    (http_address,) = http_at
    (metrics_address,) = metrics_at
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health_status(grpc_address) == serving
    assert health_status(health_address) == serving
    assert httpx.get(f"http://{http_address}/v2/health/live", timeout=10).status_code == 200
    assert "perito_requests" in httpx.get(f"http://{metrics_address}/metrics", timeout=10).text


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (("--metrics-port", "0"), {"PERITO_METRICS_HOST": "0.0.0.0"}, "metrics on 0.0.0.0"),
        (("--host", "0.0.0.0", "--http-port", "0"), {}, "gRPC on 0.0.0.0, HTTP on 0.0.0.0"),
    ],
    ids=["metrics-everywhere", "all-everywhere"],
)
def test_anonymous_server_refuses_to_listen_beyond_loopback(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], named: str
) -> None:
    text = refused(tmp_path, "--port", "0", *args, **env)
    assert f"refusing to serve {named} without authentication" in text


@pytest.mark.parametrize("listener", ["gRPC", "HTTP", "metrics", "health checks"])
def test_a_port_in_use_ends_the_start_naming_the_address(tmp_path: Path, listener: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = {"gRPC": "--port", "HTTP": "--http-port", "metrics": "--metrics-port"}
        args = ["--port", "0"]
        env = {}
        if listener == "health checks":
            env["PERITO_HEALTH_PORT"] = port
        elif listener == "gRPC":
            args = ["--port", port]
        else:
            args += [ports[listener], port]
        text = refused(tmp_path, *args, **env)
    assert f"Error: {listener}: cannot listen on 127.0.0.1:{port}: Address already in use" in text


@ipv6
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_ipv6_loopback(tmp_path: Path, serve: list[Proc], host: str) -> None:
    process = start_serve(
        serve,
        tmp_path,
        "--host",
        host,
        "--port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        "0",
        ready="perito: HTTP on",
    )
    text = process.text()
    grpc_at = logged(text, "serving perito.v1.Perito on ")
    http_at = logged(text, "perito: HTTP on ")
    metrics_at = logged(text, "metrics on ")
    bound = listening(process.pid)
    assert bound == grpc_at | http_at | metrics_at, text
    assert len(bound) == 3 and all(address.startswith("[::1]:") for address in bound)
    (grpc_address,) = grpc_at
    (http_address,) = http_at
    assert health_status(grpc_address) == health_pb2.HealthCheckResponse.SERVING
    assert httpx.get(f"http://{http_address}/v2/health/ready", timeout=10).status_code == 200


@ipv6
def test_localhost_is_both_loopbacks_on_one_port(tmp_path: Path, serve: list[Proc]) -> None:
    process = start_serve(
        serve,
        tmp_path,
        "--host",
        "localhost",
        "--port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        "0",
        ready="perito: HTTP on",
    )
    text = process.text()
    bound = listening(process.pid)
    for line in ("serving perito.v1.Perito on ", "HTTP (OIP REST, JSON API) on ", "metrics on "):
        addresses = logged(text, line)
        ports = {address.rpartition(":")[2] for address in addresses}
        assert len(ports) == 1, addresses
        (port,) = ports
        assert addresses == {f"127.0.0.1:{port}", f"[::1]:{port}"} and addresses <= bound
    assert len(bound) == 6, bound


def test_worker_metrics_at_the_port_it_logs_and_a_busy_port(tmp_path: Path) -> None:
    env = subprocess_env(
        PERITO_REGISTRY=str(tmp_path / "registry"),
        PERITO_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        TMPDIR=str(tmp_path),
    )
    args = ["worker", "--metrics-host", "127.0.0.1", "--metrics-port", "0"]
    worker = perito_proc("perito worker", args, env, tmp_path / "worker.log", "metrics on ")
    try:
        worker.start(120)
        (address,) = logged(worker.text(), "metrics on ")
        assert address in listening(worker.pid)
        assert all(bound.startswith("127.0.0.1:") for bound in listening(worker.pid))
        assert httpx.get(f"http://{address}/metrics", timeout=10).status_code == 200
    finally:
        worker.stop()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = perito_proc(
            "perito worker",
            ["worker", "--metrics-host", "127.0.0.1", "--metrics-port", port],
            env,
            tmp_path / "busy.log",
            "",
        ).launch()
        try:
            code = busy.wait(120)
        finally:
            busy.stop()
    assert code != 0
    assert f"metrics: cannot listen on 127.0.0.1:{port}: Address already in use" in busy.text()
    assert "Traceback" not in busy.text()


@pytest.mark.parametrize(
    "host", ["127.0.0.1", pytest.param("[::1]", marks=ipv6), pytest.param("::1", marks=ipv6)]
)
def test_web_page_at_the_address_it_prints(tmp_path: Path, host: str) -> None:
    web = perito_proc(
        "perito web",
        ["web", "--host", host, "--port", "0", "--server", f"127.0.0.1:{free_port()}"],
        subprocess_env(),
        tmp_path / "web.log",
        "Application startup complete",
    )
    try:
        web.start(60)
        printed = re.search(r"perito web: (.*) \(service", web.text())
        assert printed, web.text()
        (address,) = {f"{h}:{p}" for h, p in re.findall(ADDRESS, printed.group(1))}
        assert listening(web.pid) == {address}
        assert address.startswith("[::1]:" if ":" in host else "127.0.0.1:")
        assert httpx.get(f"http://{address}/", timeout=10).status_code == 200
    finally:
        web.stop()


def test_web_page_on_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = perito_proc(
            "perito web",
            ["web", "--port", str(port), "--server", "127.0.0.1:1"],
            subprocess_env(),
            tmp_path / "busy.log",
            "",
        ).launch()
        try:
            code = busy.wait(60)
        finally:
            busy.stop()
    assert code != 0
    assert f"perito web: cannot listen on 127.0.0.1:{port}: Address already in use" in busy.text()


def start_web(work: Path, name: str, host: str, server: str) -> Proc:
    return perito_proc(
        "perito web",
        ["web", "--host", host, "--port", "0", "--server", server],
        subprocess_env(),
        work / f"{name}.log",
        "Application startup complete",
    )


def page_addresses(web: Proc) -> set[str]:
    """The `host:port` the page's start line names."""
    printed = re.search(r"perito web: (http://.*) \(service", web.text())
    assert printed, web.text()
    return {f"{host}:{port}" for host, port in re.findall(ADDRESS, printed.group(1))}


def test_web_page_beyond_loopback_opens_no_session_without_a_token(
    tmp_path: Path, serve: list[Proc]
) -> None:
    """In front of a service without tenants, a page on 0.0.0.0 gives nobody a session: it
    refuses to start when it can ask the service, and answers 401 saying why when the service
    came up after it. On 127.0.0.1 the page starts an anonymous session by itself."""
    grpc_port = free_port()
    server = f"127.0.0.1:{grpc_port}"
    early = start_web(tmp_path, "early", "0.0.0.0", server)  # the service is not up yet
    pages: list[Proc] = [early]
    try:
        early.start(60)
        assert f"could not ask {server} whether it needs a token" in early.text()
        start_serve(serve, tmp_path, "--port", str(grpc_port))
        (address,) = page_addresses(early)
        assert address.startswith("0.0.0.0:")
        page = f"http://127.0.0.1:{address.split(':')[1]}"
        with httpx.Client(base_url=page, timeout=30) as http:
            probe = http.get("/api/session")
            assert probe.status_code == 401
            assert probe.json()["authenticated"] is False
            assert "runs without tenants" in probe.json()["error"]
            assert "listens beyond loopback (0.0.0.0:" in probe.json()["error"]
            assert "perito_session" not in probe.cookies
            # The anonymous service would take any token as the anonymous tenant's.
            login = http.post("/api/login", json={"token": "anything"})
            assert login.status_code == 401 and "runs without tenants" in login.json()["error"]
            assert "perito_session" not in login.cookies
            assert http.get("/api/models").status_code == 401

        late = start_web(tmp_path, "late", "0.0.0.0", server)
        pages.append(late.launch())
        code = late.wait(60)
        text = late.text()
        assert code != 0, text
        assert "Error: refusing to start: the Perito service at" in text
        assert "serve the page on 127.0.0.1 (--host)" in text
        assert "Traceback" not in text and "Application startup complete" not in text

        local = start_web(tmp_path, "local", "127.0.0.1", server)
        pages.append(local)
        local.start(60)
        (address,) = page_addresses(local)
        assert listening(local.pid) == {address}
        session = httpx.get(f"http://{address}/api/session", timeout=30)
        assert session.status_code == 200 and session.json()["anonymous"] is True
    finally:
        for process in pages:
            process.stop()
