"""The fault suite's simulated hosts (bench/fault_netns.py), on real namespaces and sockets: a
host reaches the root namespace over its veth link, a cut drops packets silently (a connect
times out, nothing is refused or reset), a restore brings the link back, and nothing is left
afterwards. Without `ip` (or root) the scenario is skipped, and the suite's table says SKIP."""

import os
import shutil
import socket
import subprocess
import sys

import pytest

import bench.faults  # first: the scenario modules import their parts from it
from bench.fault_netns import Host, _ip, simulated_hosts

CONNECT = (
    "import socket, sys; "
    "socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))"
)


def _connect(host: Host, port: int, timeout: float) -> subprocess.CompletedProcess[str]:
    """Open a TCP connection from inside `host` to its gateway's `port`."""
    return subprocess.run(
        host.command([sys.executable, "-S", "-c", CONNECT, host.gateway, str(port), str(timeout)]),
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and `ip` (iproute2)"
)
def test_a_cut_link_drops_packets_silently_and_a_restored_one_carries_them() -> None:
    with simulated_hosts("a", "b") as hosts, socket.socket() as server:
        a, b = hosts
        assert a.gateway != b.gateway and a.namespace != b.namespace
        server.bind((a.gateway, 0))
        server.listen()
        port = server.getsockname()[1]
        assert _connect(a, port, 5).returncode == 0

        a.cut()
        cut = _connect(a, port, 1.0)
        assert cut.returncode != 0
        assert "timed out" in cut.stderr  # not refused, not reset: the packets vanished

        a.restore()
        assert _connect(a, port, 5).returncode == 0
    assert not {a.namespace, b.namespace} & set(_ip("netns", "list").split())
    links = _ip("-o", "link", "show")
    assert a.root_link not in links and b.root_link not in links


def test_without_ip_the_scenario_is_skipped_and_marked_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no `ip` on it
    with pytest.raises(bench.faults.Skipped) as skipped, simulated_hosts("a"):
        pass
    assert "iproute2" in str(skipped.value) or "root" in str(skipped.value)

    out = bench.faults.Outcome("cut-off-host", skipped=str(skipped.value))
    assert out.ok and out.verdict == "SKIP"
    assert bench.faults.line(out).endswith("SKIP")
    assert "| SKIP |" in bench.faults.table([out])
