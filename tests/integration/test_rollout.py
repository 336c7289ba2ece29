"""Moving an alias under load: the new version is loaded and warmed before it takes traffic,
no request fails, and a version that cannot load leaves the old one serving."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import perito
from perito_core.models.registry import ModelRegistry
from perito_server.settings import ServerSettings
from tests.conftest import publish_tiny
from tests.helpers import ServerThread

pytestmark = pytest.mark.integration


class Load:
    """Threads calling Classify on `car-damage@production` as fast as they can."""

    def __init__(self, target: str, threads: int = 4) -> None:
        self.target = target
        self.stop = threading.Event()
        self.seen: list[list[str]] = [[] for _ in range(threads)]
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]
        self.image = np.full((32, 32, 3), 90, dtype=np.uint8)

    def _run(self, index: int) -> None:
        with perito.Client(self.target, timeout=10) as client:
            while not self.stop.is_set():
                try:
                    [result] = client.classify([self.image], model="car-damage@production")
                    self.seen[index].append(result.model_version)
                except perito.PeritoError as error:
                    self.errors.append(f"{type(error).__name__}: {error}")

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def latest(self) -> set[str]:
        return {seen[-1] for seen in self.seen if seen}


def wait_for(condition: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


def test_an_alias_moved_under_load_fails_no_request(tmp_path: Path, tiny_model_file: Path) -> None:
    registry = ModelRegistry.open(str(tmp_path / "registry"), cache_dir=tmp_path / "publish")
    for _ in range(3):
        publish_tiny(registry, tiny_model_file, name="car-damage")
    registry.set_alias("car-damage", "production", "1")
    # Version 3's file is damaged after publishing: it fails its checksum when fetched.
    (tmp_path / "registry" / "models" / "car-damage" / "3" / "model.pt").write_bytes(b"garbage")
    settings = ServerSettings(
        port=0,
        registry=str(tmp_path / "registry"),
        cache_dir=tmp_path / "cache",
        preload=["car-damage@production"],
        alias_ttl_s=0.2,
    )
    with ServerThread(settings) as server, Load(server.target) as load:
        wait_for(lambda: all(len(seen) > 5 for seen in load.seen))
        assert load.latest() == {"1"}

        registry.set_alias("car-damage", "production", "2")
        wait_for(lambda: load.latest() == {"2"})

        registry.set_alias("car-damage", "production", "3")
        pool = server.running.pool  # type: ignore[attr-defined]
        wait_for(lambda: ("car-damage", "production") in pool.rollout_errors)
        served_before = sum(len(seen) for seen in load.seen)
        wait_for(lambda: sum(len(seen) for seen in load.seen) > served_before + 20)
        failure = pool.rollout_errors[("car-damage", "production")]
        with perito.Client(server.target) as client:
            loaded = {v.version for v in client.get_model("car-damage").versions if v.loaded}

    assert load.errors == []
    for seen in load.seen:
        # Each caller saw v1, then v2, never going back and never the broken v3.
        switched = seen.index("2")
        assert set(seen[:switched]) == {"1"} and set(seen[switched:]) == {"2"}
    assert failure.version == "3" and "sha256" in failure.reason
    assert loaded == {"1", "2"}
