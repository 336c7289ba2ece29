"""A shadow version runs on an alias's traffic after the caller is answered, and its agreement
with the alias's version is recorded, on a real server with a real Redis.

Two TorchScript models read an image's dominant colour: the incumbent answers it; the
candidate swaps red and green for images darker than mid-grey. 30% of the generated images are
dark red or dark green, so the candidate agrees on exactly 70% of them:

- with the shadow at sample 1.0, the agreement recorded in Redis (`ComparisonStore`, what
  `perito models compare` reads) and on /metrics is 70% within 2 points, and the confusion
  names the swapped labels (on /metrics only disagreements); every caller's answer comes from
  the incumbent and names it;
- the OIP doors (gRPC and REST, pixels sent) are shadowed as Classify is;
- a shadow queue too small for a request, in images or in bytes, sheds its images and counts
  them, and no call fails;
- stopping the shadow stops the comparisons within one alias refresh;
- `perito models shadow` sets and stops a shadow, prints the route and audits each change.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from torch import nn

import perito
from perito_core.models.comparison import ComparisonStore
from perito_core.models.registry import ModelRegistry
from perito_core.models.rollout import Shadow
from tests.helpers import TINY_INPUT, ServerThread, run_perito, subprocess_env

pytestmark = pytest.mark.integration

MODEL = "shade"
LABELS = ["red", "green", "blue"]
SIZE = TINY_INPUT.height
TTL_S = 0.3
DARK_SHARE = 0.3


class DominantColour(nn.Module):
    """Normalised NCHW in; logits: each channel's mean, times 10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10.0 * x.mean(dim=(2, 3))


class SwapWhenDark(nn.Module):
    """As `DominantColour`, but red and green swap places for an image darker than mid-grey
    (a mean below 0 once normalised)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.mean(dim=(2, 3))
        swapped = torch.stack([means[:, 1], means[:, 0], means[:, 2]], dim=1)
        dark = means.mean(dim=1, keepdim=True) < 0.0
        return 10.0 * torch.where(dark, swapped, means)


def images(count: int, seed: int) -> tuple[list[np.ndarray], list[str], int]:
    """`count` photos, DARK_SHARE of them dark red or dark green (the rest bright, any
    colour), shuffled; each one's dominant colour; how many are dark."""
    rng = np.random.default_rng(seed)
    dark = round(count * DARK_SHARE)
    out, colours = [], []
    for index in range(count):
        channel = index % 2 if index < dark else index % 3
        low, high = (15, 90) if index < dark else (140, 245)
        pixels = np.full((SIZE, SIZE, 3), low, dtype=np.int16)
        pixels[..., channel] = high
        pixels += rng.integers(-10, 11, pixels.shape, dtype=np.int16)
        out.append(pixels.clip(0, 255).astype(np.uint8))
        colours.append(LABELS[channel])
    order = rng.permutation(count)
    return [out[i] for i in order], [colours[i] for i in order], dark


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with `shade` v1 (the incumbent, alias `production`) and v2 (the
    candidate)."""
    from perito_training.export import export_torchscript

    root = tmp_path_factory.mktemp("shadow")
    registry = ModelRegistry.open(str(root / "registry"), cache_dir=root / "publish-cache")
    for version, network in (("1", DominantColour()), ("2", SwapWhenDark())):
        path = root / f"v{version}" / "model.pt"
        export_torchscript(network, TINY_INPUT, path)
        published = registry.publish(MODEL, path, labels=LABELS, input=TINY_INPUT)
        assert published.version == version
    registry.set_alias(MODEL, "production", "1")
    return root / "registry"


@pytest.fixture
def registry(registry_root: Path, tmp_path: Path, redis_url: str) -> Iterator[ModelRegistry]:
    """The registry, its comparisons in Redis emptied; the shadow stopped afterwards."""
    redis.Redis.from_url(redis_url).delete(ComparisonStore.key(MODEL, "1", "2"))
    opened = ModelRegistry.open(str(registry_root), cache_dir=tmp_path / "publish-cache")
    yield opened
    opened.stop_shadow(MODEL, "production")


def serving(registry_root: Path, tmp_path: Path, redis_url: str, **options: Any) -> ServerThread:
    """A server over the registry: /metrics on, aliases re-read every TTL_S."""
    return ServerThread.serving(
        registry_root,
        tmp_path / "cache",
        redis_url=redis_url,
        metrics_port=0,
        alias_ttl_s=TTL_S,
        preload=[f"{MODEL}@production"],
        **options,
    )


def scrape(server: ServerThread) -> list[Sample]:
    port = server.running.metrics_port  # type: ignore[attr-defined]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def families(server: ServerThread) -> set[str]:
    port = server.running.metrics_port  # type: ignore[attr-defined]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {family.name for family in text_string_to_metric_families(text)}


def metric(server: ServerThread, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    return sum(
        sample.value
        for sample in scrape(server)
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


def classify(client: perito.Client, batch: list[np.ndarray]) -> list[perito.Classification]:
    return client.classify(batch, model=f"{MODEL}@production")


PAIR = {"model": MODEL, "incumbent": "1", "candidate": "2"}
COMPARED = "perito_shadow_compared_total"
AGREED = "perito_shadow_agreed_total"
CONFUSION = "perito_shadow_confusion_total"
SHED = "perito_shadow_shed_total"
SHADOW_FAMILIES = {
    "perito_shadow_compared",
    "perito_shadow_agreed",
    "perito_shadow_confusion",
    "perito_shadow_confidence_shift",
    "perito_shadow_shed",
}


def start_shadowing(server: ServerThread, client: perito.Client) -> float:
    """Call until the server runs the shadow (its route re-read); returns the images compared
    so far, once Redis holds them too."""
    warm = images(4, seed=99)[0]
    seen = 0.0

    def shadowed() -> bool:
        nonlocal seen
        classify(client, warm)
        time.sleep(0.2)
        seen = metric(server, COMPARED, **PAIR)
        return seen > 0

    wait_for(shadowed)
    wait_for(lambda: metric(server, COMPARED, **PAIR) == seen, 5)
    return seen


def test_a_shadow_s_agreement_is_recorded_and_callers_get_the_incumbent(
    registry: ModelRegistry, registry_root: Path, tmp_path: Path, redis_url: str
) -> None:
    store = ComparisonStore(redis.Redis.from_url(redis_url))
    photos, colours, dark = images(240, seed=1)
    dark_red = sum(c == "red" and p.mean() < 128 for c, p in zip(colours, photos, strict=True))
    swap = {**PAIR, "incumbent_label": "red", "candidate_label": "green"}
    with (
        serving(registry_root, tmp_path, redis_url) as server,
        perito.Client(server.target, timeout=30) as client,
    ):
        # Every family is in a scrape from the start, before any shadow ran.
        assert families(server) >= SHADOW_FAMILIES
        registry.set_shadow(MODEL, "production", "2", 1.0)
        before = start_shadowing(server, client)
        wait_for(lambda: store.read(MODEL, "1", "2").compared == before, 10)
        agreed_before = metric(server, AGREED, **PAIR)
        stored_before = store.read(MODEL, "1", "2")
        swapped_before = metric(server, CONFUSION, **swap)

        answers = []
        for at in range(0, len(photos), 8):
            answers.extend(classify(client, photos[at : at + 8]))
        wait_for(lambda: metric(server, COMPARED, **PAIR) == before + len(photos))
        wait_for(lambda: store.read(MODEL, "1", "2").compared == before + len(photos), 10)
        agreed = metric(server, AGREED, **PAIR) - agreed_before
        swapped = metric(server, CONFUSION, **swap) - swapped_before
        exported = {
            (sample.labels["incumbent_label"], sample.labels["candidate_label"])
            for sample in scrape(server)
            if sample.name == CONFUSION
        }
        shed = metric(server, SHED, model=MODEL)
        stored = store.read(MODEL, "1", "2")

    known = 1 - dark / len(photos)
    assert known == pytest.approx(0.70)
    assert abs(agreed / len(photos) - known) <= 0.02
    assert abs((stored.agreed - stored_before.agreed) / len(photos) - known) <= 0.02
    # The dark red photos are the candidate's green, and only those.
    assert swapped == dark_red > 0
    # Prometheus gets the disagreements only (Redis has the diagonal too).
    assert exported and all(mine != theirs for mine, theirs in exported)
    assert stored.confusion[("blue", "blue")] > 0
    assert (
        stored.confusion[("red", "green")] - stored_before.confusion[("red", "green")] == dark_red
    )
    assert shed == 0
    # Callers were answered by the incumbent, which names itself.
    assert {answer.model_version for answer in answers} == {"1"}
    assert [answer.label for answer in answers] == colours


def test_both_oip_doors_are_shadowed_and_answered_by_the_incumbent(
    registry: ModelRegistry, registry_root: Path, tmp_path: Path, redis_url: str
) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    photos, colours, dark = images(10, seed=4)
    pixels = np.stack(photos)
    registry.set_shadow(MODEL, "production", "2", 1.0)
    with serving(registry_root, tmp_path, redis_url, http_port=0) as server:
        http_url = f"127.0.0.1:{server.running.http_port}"  # type: ignore[attr-defined]
        answered = []
        for module, url in ((grpcclient, server.target), (httpclient, http_url)):
            tensor = module.InferInput("pixels", list(pixels.shape), "UINT8")
            tensor.set_data_from_numpy(pixels)
            client = module.InferenceServerClient(url)
            result = client.infer(MODEL, [tensor], model_version="production")
            response = result.get_response()
            version = response["model_version"] if isinstance(response, dict) else None
            answered.append(version or response.model_version)
            top = result.as_numpy("probabilities").argmax(axis=1)
            assert [LABELS[i] for i in top] == colours
        wait_for(lambda: metric(server, COMPARED, **PAIR) == 2 * len(photos))
        agreed = metric(server, AGREED, **PAIR)

    assert answered == ["1", "1"]
    assert agreed == 2 * (len(photos) - dark)


# Eight images never fit: four images, or the bytes of four images' pixels.
@pytest.mark.parametrize(
    "bound", [{"shadow_queue_images": 4}, {"shadow_queue_bytes": 4 * SIZE * SIZE * 3}]
)
def test_a_full_shadow_queue_sheds_and_counts_and_fails_no_call(
    registry: ModelRegistry,
    registry_root: Path,
    tmp_path: Path,
    redis_url: str,
    bound: dict[str, int],
) -> None:
    photos, colours, _ = images(8, seed=2)
    registry.set_shadow(MODEL, "production", "2", 1.0)
    with (
        serving(registry_root, tmp_path, redis_url, **bound) as server,
        perito.Client(server.target, timeout=30) as client,
    ):
        answers: list[perito.Classification] = []

        def shed() -> bool:
            answers.extend(classify(client, photos))
            return metric(server, SHED, model=MODEL, candidate="2", reason="queue_full") > 0

        wait_for(shed)
        for _ in range(5):
            answers.extend(classify(client, photos))
        time.sleep(0.5)
        counted = metric(server, SHED, model=MODEL, candidate="2", reason="queue_full")
        compared = metric(server, COMPARED, **PAIR)

    # Eight images never fit a queue of four: each call after the route was read shed all.
    assert counted >= 6 * len(photos) and counted % len(photos) == 0
    assert compared == 0
    assert len(answers) % len(photos) == 0
    assert {answer.model_version for answer in answers} == {"1"}
    assert [answer.label for answer in answers] == colours * (len(answers) // len(photos))


def test_stopping_a_shadow_stops_its_work_within_one_refresh(
    registry: ModelRegistry, registry_root: Path, tmp_path: Path, redis_url: str
) -> None:
    store = ComparisonStore(redis.Redis.from_url(redis_url))
    photos, _, _ = images(40, seed=3)
    with (
        serving(registry_root, tmp_path, redis_url) as server,
        perito.Client(server.target, timeout=30) as client,
    ):
        registry.set_shadow(MODEL, "production", "2", 1.0)
        start_shadowing(server, client)
        registry.stop_shadow(MODEL, "production")
        time.sleep(TTL_S + 0.3)  # one refresh, and its read
        compared = metric(server, COMPARED, **PAIR)
        stored = store.read(MODEL, "1", "2").compared
        for at in range(0, len(photos), 8):
            classify(client, photos[at : at + 8])
        time.sleep(2.5)  # past two flushes to Redis
        assert metric(server, COMPARED, **PAIR) == compared
        assert store.read(MODEL, "1", "2").compared == stored
        assert stored == compared > 0


def test_the_shadow_command_sets_and_stops_a_shadow_audited(
    registry: ModelRegistry, registry_root: Path, tmp_path: Path, redis_url: str
) -> None:
    env = subprocess_env(
        PERITO_REGISTRY=str(registry_root),
        PERITO_CACHE_DIR=str(tmp_path / "cache"),
        PERITO_REDIS_URL=redis_url,
    )
    started = run_perito(
        "models", "shadow", MODEL, "2", "--of", "production", "--sample", "0.2", env=env
    )
    # The alias command's wording (`describe_route`).
    assert started.stdout.strip() == f"{MODEL}@production -> 1, shadow 2 on 20% of requests"
    assert registry.route(MODEL, "production").shadow == Shadow("2", 0.2)

    own = run_perito("models", "shadow", MODEL, "1", "--of", "production", env=env, check=False)
    assert own.returncode != 0 and "already serves version 1" in own.stderr
    assert registry.route(MODEL, "production").shadow == Shadow("2", 0.2)

    stopped = run_perito("models", "shadow", MODEL, "--of", "production", "--stop", env=env)
    assert stopped.stdout.strip() == f"{MODEL}@production -> 1"
    assert registry.route(MODEL, "production").shadow is None
    neither = run_perito("models", "shadow", MODEL, "--of", "production", env=env, check=False)
    assert neither.returncode == 2 and "CANDIDATE or --stop" in neither.stderr

    records = [
        json.loads(line)
        for line in run_perito(
            "audit", "--json", "--method", "models.shadow", env=env
        ).stdout.splitlines()
    ]
    mine = [
        (r["outcome"], r["detail"])
        for r in records
        if r["resource"] == f"models/{MODEL}/aliases/production"
    ]
    assert mine[:3] == [
        ("OK", "shadow stopped"),
        ("INVALID_ARGUMENT", ""),
        ("OK", "shadow 2 sample 0.2"),
    ]
