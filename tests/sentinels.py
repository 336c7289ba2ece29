"""A Redis Sentinel group on loopback, for the tests and the fault suite (bench/fault_sentinel):
a primary with its append-only file, one replica of it, and three `redis-sentinel` processes
that monitor it under the service name `perito` with a quorum of 2, each on a free port.

Sentinel's own rules apply (https://redis.io/docs/latest/operate/oss_and_stack/management/
sentinel/): a primary that does not answer for `down_after_ms` is subjectively down to a
sentinel, objectively down once 2 agree, and a majority of the 3 elects one of them to promote
the replica and point the others at it. Each sentinel rewrites its configuration file as it
learns (other sentinels, the replica, a new primary), so each has its own.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import redis

from tests.processes import Proc, free_port, redis_proc

SERVICE = "perito"


class SentinelGroup:
    """A primary, a replica and three sentinels; see the module docstring.

    Args:
        folder: logs, append-only files and the sentinels' configuration files go here.
        down_after_ms: the sentinels' `down-after-milliseconds`.
        failover_timeout_ms: their `failover-timeout`.
    """

    def __init__(
        self, folder: Path, *, down_after_ms: int = 1000, failover_timeout_ms: int = 4000
    ) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        self.primary_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.primary = self._redis("primary", self.primary_port, env)
        self.replica = self._redis("replica", self.replica_port, env)
        self.replica.args += ["--replicaof", "127.0.0.1", str(self.primary_port)]
        self.sentinels = []
        for i, port in enumerate(self.sentinel_ports):
            conf = folder / f"sentinel-{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {folder}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.sentinels.append(
                Proc(
                    f"redis-sentinel {i}",
                    ["redis-sentinel", str(conf)],
                    env,
                    folder / f"sentinel-{i}.log",
                    f"+monitor master {SERVICE}",
                )
            )

    def _redis(self, name: str, port: int, env: dict[str, str]) -> Proc:
        data = self.folder / name
        data.mkdir(parents=True, exist_ok=True)
        proc = redis_proc(port, self.folder / f"{name}.log", env, data_dir=data)
        proc.name = f"redis-server ({name})"
        return proc

    @property
    def url(self) -> str:
        """The group's `redis+sentinel://` URL, database 0."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def sentinel(self, i: int) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[i], socket_timeout=2, decode_responses=True)

    def start(self, timeout: float = 60) -> None:
        """Start the primary, the replica and the sentinels; return once every sentinel knows
        the two others and the replica is in sync with the primary.

        Raises:
            ProcessFailed: a process exited or did not get ready.
            TimeoutError: the group did not settle within `timeout` seconds.
        """
        self.primary.start(30)
        self.replica.start(30)
        for sentinel in self.sentinels:
            sentinel.start(30)
        self.wait_settled(timeout)

    def wait_settled(self, timeout: float) -> None:
        """Wait until every sentinel sees the two others and a replica whose link is up.

        Raises:
            TimeoutError: not so within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                if all(self._settled(i) for i in range(len(self.sentinels))):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sentinel group did not settle in {timeout:.0f}s")
            time.sleep(0.2)

    def _settled(self, i: int) -> bool:
        with self.sentinel(i) as client:
            others = client.execute_command("SENTINEL", "SENTINELS", SERVICE)
            replicas = client.execute_command("SENTINEL", "REPLICAS", SERVICE)
        linked = [r for r in replicas if _fields(r).get("master-link-status") == "ok"]
        return len(others) == len(self.sentinels) - 1 and len(linked) >= 1

    def primary_port_now(self) -> set[int]:
        """The primary's port as each reachable sentinel names it now (one port when they
        agree)."""
        ports = set()
        for i in range(len(self.sentinels)):
            try:
                with self.sentinel(i) as client:
                    _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                ports.add(int(port))
            except redis.RedisError:
                continue
        return ports

    def wait_promoted(self, old_port: int, timeout: float) -> int:
        """Wait until every sentinel names a primary other than `old_port`, and that primary
        says it is one; return its port.

        Raises:
            TimeoutError: not so within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ports = self.primary_port_now()
            if len(ports) == 1 and old_port not in ports:
                [port] = ports
                try:
                    with redis.Redis(port=port, socket_timeout=2) as client:
                        if client.info("replication")["role"] == "master":
                            return port
                except redis.RedisError:
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"no replica promoted within {timeout:.0f}s")

    def wait_replica(self, port: int, timeout: float) -> float:
        """Seconds until the Redis on `port` says it is a replica (one the sentinels
        reconfigured, such as a demoted primary started again).

        Raises:
            TimeoutError: not so within `timeout` seconds.
        """
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                with redis.Redis(port=port, socket_timeout=2) as client:
                    if client.info("replication")["role"] == "slave":
                        return time.monotonic() - started
            except redis.ConnectionError:  # not listening yet, or loading its data
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the Redis on port {port} was not made a replica in {timeout:.0f}s")

    def stop(self) -> None:
        for proc in [*self.sentinels, self.replica, self.primary]:
            proc.stop(10)


def _fields(flat: list[str] | dict[str, str]) -> dict[str, str]:
    """A sentinel's reply about one instance as a dict (RESP2 gives a flat list)."""
    if isinstance(flat, dict):
        return flat
    return dict(zip(flat[::2], flat[1::2], strict=True))
