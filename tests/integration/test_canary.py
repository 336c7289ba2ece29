"""A split alias over real sockets: its canary answers its share of requests, the same
version for every request with one routing key whichever door it comes through, and a
promote or a rollback reaches every replica within one alias refresh. A canary that cannot
load answers nothing, and a bulk job pins the alias's own version."""

from __future__ import annotations

import base64
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families

import perito
from perito_core.models.registry import ModelRegistry
from perito_server import model_pool
from perito_server.settings import ServerSettings
from tests.conftest import publish_tiny
from tests.helpers import TINY_INPUT, ServerThread, encoded, run_perito, subprocess_env

pytestmark = pytest.mark.integration

MODEL = "car-damage"
IMAGE = np.full((32, 32, 3), 90, dtype=np.uint8)
PHOTO = encoded(IMAGE, "PNG")
TTL_S = 0.3


def registry_of(root: Path, model_file: Path, versions: int) -> ModelRegistry:
    """`versions` versions of the tiny model as `car-damage`, `production` on version 1."""
    registry = ModelRegistry.open(str(root), cache_dir=root.parent / f"{root.name}-publish")
    for _ in range(versions):
        publish_tiny(registry, model_file, name=MODEL)
    registry.set_alias(MODEL, "production", "1")
    return registry


def serving(root: Path, work: Path, **options: object) -> ServerThread:
    return ServerThread(
        ServerSettings(
            port=0,
            registry=str(root),
            cache_dir=work,
            alias_ttl_s=TTL_S,
            preload=[f"{MODEL}@production"],
            **options,  # type: ignore[arg-type]
        )
    )


def versions_by_key(client: perito.Client, keys: list[str]) -> dict[str, str]:
    """The version that answered one call per routing key."""
    answered = {}
    for key in keys:
        [result] = client.classify([PHOTO], model=f"{MODEL}@production", routing_key=key)
        answered[key] = result.model_version
    return answered


def wait_for(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until `condition` held (TimeoutError after `timeout`)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError("condition not met")
        time.sleep(0.02)
    return time.monotonic() - started


def routed(server: ServerThread) -> dict[tuple[str, str], float]:
    """perito_alias_routed_images_total from the server's /metrics: (version, route) -> n."""
    port = server.running.metrics_port  # type: ignore[attr-defined]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    [family] = [
        f for f in text_string_to_metric_families(text) if f.name == "perito_alias_routed_images"
    ]
    return {
        (s.labels["version"], s.labels["route"]): s.value
        for s in family.samples
        if s.name.endswith("_total") and s.labels["alias"] == "production"
    }


def oip_version(module: object, url: str, key: str) -> str:
    """The version that answered one OIP inference with `perito_routing_key` = `key`, sent
    with tritonclient's gRPC or HTTP client (`module`)."""
    client = module.InferenceServerClient(url)  # type: ignore[attr-defined]
    tensor = module.InferInput("images", [1], "BYTES")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(np.array([PHOTO], dtype=np.object_))
    answer = client.infer(
        MODEL, [tensor], model_version="production", parameters={"perito_routing_key": key}
    ).get_response()
    client.close()
    return str(answer["model_version"] if isinstance(answer, dict) else answer.model_version)


def test_a_canary_at_30_percent_answers_30_percent_of_calls_the_same_version_per_key(
    tmp_path: Path, tiny_model_file: Path
) -> None:
    root = tmp_path / "registry"
    registry = registry_of(root, tiny_model_file, versions=2)
    registry.set_canary(MODEL, "production", "2", 30)
    keys = [f"claim-{i}" for i in range(1000)]
    with serving(root, tmp_path / "cache", metrics_port=0, http_port=0) as server:
        with perito.Client(server.target, timeout=30) as client:
            first = versions_by_key(client, keys)
            again = versions_by_key(client, keys[::10])
            unkeyed = Counter(
                result.model_version
                for _ in range(1000)
                for result in client.classify([PHOTO], model=f"{MODEL}@production")
            )
        http = f"http://127.0.0.1:{server.running.http_port}"  # type: ignore[attr-defined]
        over_json = {
            key: httpx.post(
                f"{http}/v1/models/{MODEL}@production:classify",
                json={
                    "images": [{"content": base64.b64encode(PHOTO).decode()}],
                    "routing_key": key,
                },
                timeout=30,
            ).json()["model_version"]
            for key in keys[:100]
        }
        over_oip = {}
        for key in keys[:100]:
            over_oip[("grpc", key)] = oip_version(grpcclient, server.target, key)
            over_oip[("http", key)] = oip_version(httpclient, http.removeprefix("http://"), key)
        counted = routed(server)

    share = sum(v == "2" for v in first.values()) / len(first)
    print(f"canary share: {share:.3f} of 1000 keyed calls, {unkeyed['2'] / 1000:.3f} unkeyed")
    assert 0.25 <= share <= 0.35
    assert set(first.values()) == {"1", "2"}
    assert again == {key: first[key] for key in keys[::10]}  # sticky per key
    assert 250 <= unkeyed["2"] <= 350 and unkeyed["1"] + unkeyed["2"] == 1000
    assert over_json == {key: first[key] for key in keys[:100]}
    assert over_oip == {(door, key): first[key] for door, key in over_oip}
    # Every image sent through the alias is counted by the version and route that took it.
    calls = Counter([*first.values(), *again.values(), *over_json.values(), *over_oip.values()])
    calls += unkeyed
    assert counted == {("1", "primary"): calls["1"], ("2", "canary"): calls["2"]}


def test_promote_and_rollback_reach_every_replica_within_one_refresh(
    tmp_path: Path, tiny_model_file: Path
) -> None:
    root = tmp_path / "registry"
    registry = registry_of(root, tiny_model_file, versions=3)
    registry.set_canary(MODEL, "production", "2", 50)
    keys = [f"claim-{i}" for i in range(40)]
    with (
        serving(root, tmp_path / "cache-a") as a,
        serving(root, tmp_path / "cache-b") as b,
        perito.Client(a.target, timeout=30) as client_a,
        perito.Client(b.target, timeout=30) as client_b,
    ):
        split = versions_by_key(client_a, keys)
        assert versions_by_key(client_b, keys) == split  # the replicas agree, key by key
        assert set(split.values()) == {"1", "2"}

        registry.promote_canary(MODEL, "production")
        took = [
            wait_for(lambda c=c: set(versions_by_key(c, keys).values()) == {"2"}, 10)  # type: ignore[misc]
            for c in (client_a, client_b)
        ]
        registry.set_canary(MODEL, "production", "3", 50)
        for c in (client_a, client_b):
            wait_for(lambda c=c: "3" in versions_by_key(c, keys).values(), 10)  # type: ignore[misc]
        registry.rollback_canary(MODEL, "production")
        started = time.monotonic()
        for c in (client_a, client_b):
            wait_for(lambda c=c: set(versions_by_key(c, keys).values()) == {"2"}, 10)  # type: ignore[misc]
        rolled_back = time.monotonic() - started

    # Within one refresh: the alias's record re-read, nothing to load (the version is loaded);
    # the calls that check it take part of that time too on a busy machine.
    assert max(took) < TTL_S + 1.5 and rolled_back < TTL_S + 1.5


def test_a_canary_that_cannot_load_leaves_every_request_on_the_alias_version(
    tmp_path: Path, tiny_model_file: Path
) -> None:
    root = tmp_path / "registry"
    registry = registry_of(root, tiny_model_file, versions=3)
    # Versions 2 and 3 are damaged after publishing: they fail their checksum when fetched.
    for version in ("2", "3"):
        (root / "models" / MODEL / version / "model.pt").write_bytes(b"garbage")
    registry.set_canary(MODEL, "production", "2", 50)  # set before the server starts
    keys = [f"claim-{i}" for i in range(100)]
    with serving(root, tmp_path / "cache") as server, perito.Client(server.target) as client:
        pool = server.running.pool  # type: ignore[attr-defined]
        at_start = versions_by_key(client, keys)
        first_failure = pool.rollout_errors[(MODEL, "production:canary")]
        registry.set_canary(MODEL, "production", "3", 50)  # set while it serves
        wait_for(lambda: pool.rollout_errors[(MODEL, "production:canary")].version == "3", 10)
        later = versions_by_key(client, keys)
        route = pool.route(MODEL, "production")
        # What `perito models show` reads says so: the canary's version is not serving.
        # A plain move to a version that cannot load says the alias still answers with its
        # previous one.
        shown = {v.version: v.load_error for v in client.get_model(MODEL).versions}
        registry.set_alias(MODEL, "staging", "1")
        client.classify([PHOTO], model=f"{MODEL}@staging")  # the alias in use here
        registry.set_alias(MODEL, "staging", "2")
        wait_for(lambda: (MODEL, "staging") in pool.rollout_errors, 20)
        moved = {v.version: v.load_error for v in client.get_model(MODEL).versions}
        printed = run_perito(
            "models", "show", MODEL, "--server", server.target, env=subprocess_env()
        ).stdout

    assert set(at_start.values()) == {"1"} and set(later.values()) == {"1"}
    assert shown["1"] == "" and shown["2"] == ""
    assert shown["3"].startswith("this server cannot load it as production's canary"), shown
    assert "the server's log has why" in shown["3"] and "sha256" not in shown["3"]
    assert moved["2"].startswith("this server cannot load it for alias staging, which still")
    assert "    NOT SERVING: this server cannot load it for alias staging" in printed, printed
    assert first_failure.version == "2" and "sha256" in first_failure.reason
    assert route.version == "1" and route.canary is None


def test_an_evicted_version_is_loaded_again_when_its_share_comes(
    tmp_path: Path, tiny_model_file: Path
) -> None:
    """One model in memory at a time: the alias's version and its canary evict each other,
    and every request is still answered by the version its key picks."""
    root = tmp_path / "registry"
    registry = registry_of(root, tiny_model_file, versions=2)
    registry.set_canary(MODEL, "production", "2", 50)
    keys = [f"claim-{i}" for i in range(12)]
    with (
        serving(root, tmp_path / "cache", max_loaded_models=1) as server,
        perito.Client(server.target, timeout=60) as client,
    ):
        first = versions_by_key(client, keys)
        again = versions_by_key(client, keys)
        loaded = server.running.pool.loaded  # type: ignore[attr-defined]

    assert set(first.values()) == {"1", "2"} and again == first
    assert len(loaded) == 1


def test_a_job_on_a_split_alias_pins_the_alias_version(
    tmp_path: Path, tiny_model_file: Path, redis_url: str
) -> None:
    root = tmp_path / "registry"
    registry = registry_of(root, tiny_model_file, versions=2)
    registry.set_canary(MODEL, "production", "2", 99)
    with (
        serving(
            root, tmp_path / "cache", redis_url=redis_url, results_uri=str(tmp_path / "results")
        ) as server,
        perito.Client(server.target, timeout=30) as client,
    ):
        calls = [
            result.model_version
            for _ in range(20)
            for result in client.classify([PHOTO], model=f"{MODEL}@production")
        ]
        jobs = [
            client.submit_job([PHOTO], model=f"{MODEL}@production", inline=True).last
            for _ in range(10)
        ]

    assert calls.count("2") >= 15  # the canary takes nearly every call...
    assert {job.model_version for job in jobs} == {"1"}  # ...and never a job


def test_the_alias_command_splits_promotes_and_rolls_back_each_change_audited(
    tmp_path: Path, tiny_model_file: Path, redis_url: str
) -> None:
    root = tmp_path / "registry"
    registry = registry_of(root, tiny_model_file, versions=3)
    url = redis_url.rsplit("/", 1)[0] + "/12"  # a database of its own: its records only
    redis.Redis.from_url(url).flushdb()
    env = subprocess_env(PERITO_REGISTRY=str(root), PERITO_REDIS_URL=url)

    def alias(*args: str, check: bool = True) -> str:
        result = run_perito("models", "alias", MODEL, "production", *args, env=env, check=check)
        return (result.stdout if result.returncode == 0 else result.stderr).strip()

    split = alias("2", "--canary", "5")
    route_while_split = registry.route(MODEL, "production")
    promoted = alias("--promote")
    alias("3", "--canary", "20")
    rolled_back = alias("--rollback")
    nothing_to_promote = alias("--promote", check=False)
    audit = ServerSettings(redis_url=url).open_audit().list(limit=10)

    assert split == f"{MODEL}@production -> 1, canary 2 at 5%"
    assert route_while_split.canary is not None and route_while_split.canary.percent == 5
    assert promoted == f"{MODEL}@production -> 2"
    assert rolled_back == f"{MODEL}@production -> 2"
    assert registry.route(MODEL, "production").canary is None
    assert "has no canary to promote" in nothing_to_promote
    assert [(r.method, r.outcome) for r in reversed(audit)] == [
        ("models.alias.canary", "OK"),
        ("models.alias.promote", "OK"),
        ("models.alias.canary", "OK"),
        ("models.alias.rollback", "OK"),
        ("models.alias.promote", "FAILED_PRECONDITION"),
    ]
    assert audit[1].detail == (
        f"{MODEL}@production -> 2, canary 3 at 20% => {MODEL}@production -> 2"
    )


def test_models_show_names_each_alias_canary_and_shadow(
    tmp_path: Path, tiny_model_file: Path
) -> None:
    root = tmp_path / "registry"
    registry = registry_of(root, tiny_model_file, versions=3)
    registry.set_alias(MODEL, "staging", "3")
    registry.set_canary(MODEL, "production", "2", 30)
    registry.set_shadow(MODEL, "production", "3", 0.2)
    with serving(root, tmp_path / "cache") as server:
        with perito.Client(server.target) as client:
            model = client.get_model(MODEL)
        shown = run_perito("models", "show", MODEL, "--server", server.target, env=subprocess_env())

    assert model.aliases == {"production": "1", "staging": "3"}
    assert model.rollouts == {"production": perito.AliasRollout("2", 30.0, "3", 0.2)}
    assert "  rollout production -> v1, canary v2 at 30%, shadow v3 on 20%\n" in shown.stdout
    assert "rollout staging" not in shown.stdout


def test_a_routing_key_over_256_characters_is_refused_naming_its_field(
    tmp_path: Path, tiny_model_file: Path
) -> None:
    root = tmp_path / "registry"
    registry_of(root, tiny_model_file, versions=1)
    long_key = "k" * 257
    with serving(root, tmp_path / "cache", http_port=0) as server:
        with (
            perito.Client(server.target) as client,
            pytest.raises(perito.InvalidArgumentError) as sdk,
        ):
            client.classify([PHOTO], model=f"{MODEL}@production", routing_key=long_key)
        http = f"http://127.0.0.1:{server.running.http_port}"  # type: ignore[attr-defined]
        body = {
            "inputs": [
                {
                    "name": "images",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(PHOTO).decode()],
                }
            ],
            "parameters": {"perito_routing_key": long_key},
        }
        oip = httpx.post(f"{http}/v2/models/{MODEL}/versions/production/infer", json=body)

    assert [v.field for v in sdk.value.violations] == ["routing_key"]
    assert "257 characters; the limit is 256" in str(sdk.value)
    assert oip.status_code == 400 and "perito_routing_key" in oip.json()["error"]


def oip_pixels_version(url: str, key: str, size: int = 32) -> str:
    """The version that answered one OIP inference of pixels (uint8 [1, size, size, 3]) with
    `perito_routing_key` = `key`, sent with tritonclient's HTTP client."""
    client = httpclient.InferenceServerClient(url)
    tensor = httpclient.InferInput("pixels", [1, size, size, 3], "UINT8")
    tensor.set_data_from_numpy(np.full((1, size, size, 3), 90, dtype=np.uint8))
    answer = client.infer(
        MODEL, [tensor], model_version="production", parameters={"perito_routing_key": key}
    ).get_response()
    client.close()
    return str(answer["model_version"])


def test_pixels_shaped_for_the_alias_version_never_go_to_a_canary_of_another_size(
    tmp_path: Path, tiny_model_file: Path
) -> None:
    """OIP callers shape pixels by the alias's model metadata (32 px); a canary at 48 px
    would refuse them, so they get the alias's version, while encoded images keep the split."""
    root = tmp_path / "registry"
    registry = registry_of(root, tiny_model_file, versions=1)
    bigger = TINY_INPUT.model_copy(update={"height": 48, "width": 48, "resize_size": 48})
    registry.publish(MODEL, tiny_model_file, labels=["minor", "moderate", "severe"], input=bigger)
    registry.set_canary(MODEL, "production", "2", 50)
    keys = [f"claim-{i}" for i in range(40)]
    with serving(root, tmp_path / "cache", metrics_port=0, http_port=0) as server:
        http = f"127.0.0.1:{server.running.http_port}"  # type: ignore[attr-defined]
        metadata = httpx.get(f"http://{http}/v2/models/{MODEL}/versions/production").json()
        with perito.Client(server.target, timeout=30) as client:
            encoded_split = versions_by_key(client, keys)
        as_pixels = {key: oip_pixels_version(http, key) for key in keys}
        counted = routed(server)

    assert [i["shape"] for i in metadata["inputs"] if i["name"] == "pixels"] == [[-1, 32, 32, 3]]
    assert set(encoded_split.values()) == {"1", "2"}  # encoded images: split as before
    assert set(as_pixels.values()) == {"1"}  # pixels: every key answered, by version 1
    canary_calls = sum(v == "2" for v in encoded_split.values())
    assert counted == {
        ("1", "primary"): len(keys) - canary_calls + len(keys),
        ("2", "canary"): canary_calls,
    }


class GatedLoads:
    """`load_model` as the server calls it, held for version `version` until `open()`:
    counts the loads of that version tried (a slow fetch and warm-up, made to wait)."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.gate = threading.Event()
        self.tried = 0
        self._load = model_pool.load_model

    def __call__(self, registry: ModelRegistry, name: str, version: str, **options: Any) -> Any:
        if version == self.version:
            self.tried += 1
            self.gate.wait(60)
        return self._load(registry, name, version, **options)

    def open(self) -> None:
        self.gate.set()


def test_the_first_requests_to_an_alias_never_wait_for_its_canary_to_load(
    tmp_path: Path, tiny_model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "registry"
    registry = registry_of(root, tiny_model_file, versions=2)
    registry.set_canary(MODEL, "production", "2", 50)
    loads = GatedLoads("2")
    monkeypatch.setattr(model_pool, "load_model", loads)
    keys = [f"claim-{i}" for i in range(40)]
    server = ServerThread.serving(root, tmp_path / "cache", alias_ttl_s=TTL_S)  # no preload
    try:
        with server, perito.Client(server.target, timeout=10) as client:
            pool = server.running.pool  # type: ignore[attr-defined]
            while_loading = versions_by_key(client, keys)  # the canary's load is held
            route_while_loading = pool.route(MODEL, "production")
            loads.open()
            wait_for(lambda: pool.route(MODEL, "production").canary is not None, 30)
            once_warmed = versions_by_key(client, keys)
    finally:
        loads.open()

    assert set(while_loading.values()) == {"1"} and route_while_loading.canary is None
    assert set(once_warmed.values()) == {"1", "2"}
    assert loads.tried == 1


def test_concurrent_first_requests_try_a_failing_canary_load_once_until_its_retry(
    tmp_path: Path, tiny_model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "registry"
    registry = registry_of(root, tiny_model_file, versions=2)
    (root / "models" / MODEL / "2" / "model.pt").write_bytes(b"garbage")  # fails its sha256
    registry.set_canary(MODEL, "production", "2", 50)
    loads = GatedLoads("2")
    monkeypatch.setattr(model_pool, "load_model", loads)
    monkeypatch.setattr(model_pool, "ROLLOUT_RETRY_S", 1.0)
    keys = [f"claim-{i}" for i in range(16)]
    try:
        with ServerThread.serving(root, tmp_path / "cache", alias_ttl_s=TTL_S) as server:
            pool = server.running.pool  # type: ignore[attr-defined]

            def first_call(key: str) -> str:
                with perito.Client(server.target, timeout=10) as client:
                    [result] = client.classify(
                        [PHOTO], model=f"{MODEL}@production", routing_key=key
                    )
                return result.model_version

            with ThreadPoolExecutor(len(keys)) as calls:
                answered = list(calls.map(first_call, keys))  # while the canary's load waits
            loads.open()
            wait_for(lambda: (MODEL, "production:canary") in pool.rollout_errors, 30)
            tried_at_first = loads.tried
            failure = pool.rollout_errors[(MODEL, "production:canary")]
            wait_for(lambda: loads.tried == 2, 10)  # the refresh after ROLLOUT_RETRY_S
            # counted as it starts: its failure is recorded once the load has failed
            wait_for(
                lambda: (
                    pool.rollout_errors[(MODEL, "production:canary")].retry_at > failure.retry_at
                ),
                10,
            )
            retried = pool.rollout_errors[(MODEL, "production:canary")]
    finally:
        loads.open()

    assert set(answered) == {"1"}
    assert tried_at_first == 1 and failure.version == "2" and "sha256" in failure.reason
    assert retried.retry_at > failure.retry_at


def test_the_alias_command_warns_when_the_canary_takes_pixels_of_another_size(
    tmp_path: Path, tiny_model_file: Path, redis_url: str
) -> None:
    root = tmp_path / "registry"
    registry = registry_of(root, tiny_model_file, versions=2)
    bigger = TINY_INPUT.model_copy(update={"height": 48, "width": 48, "resize_size": 48})
    registry.publish(MODEL, tiny_model_file, labels=["minor", "moderate", "severe"], input=bigger)
    env = subprocess_env(PERITO_REGISTRY=str(root), PERITO_REDIS_URL=redis_url)

    same = run_perito("models", "alias", MODEL, "production", "2", "--canary", "5", env=env)
    other = run_perito("models", "alias", MODEL, "production", "3", "--canary", "5", env=env)

    assert same.stderr == ""
    assert other.stdout == f"{MODEL}@production -> 1, canary 3 at 5%\n"  # still split
    assert "v3 takes 48x48 px and answers 3 labels, v1 32x32 px and 3 labels" in other.stderr
    assert "pixels" in other.stderr and "stay on v1" in other.stderr
