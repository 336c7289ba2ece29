"""Helpers shared by the test suites: real servers started and stopped for a test."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from perito.v1.vocabulary import ItemState
from perito_core.jobs.parts import data_location
from perito_core.jobs.store import ItemInput, ItemResult, Job, JobStore
from perito_core.models.manifest import Artifact, InputContract, ModelManifest
from perito_core.models.registry import ModelRegistry
from perito_core.storage import S3Options, make_s3_client
from perito_server.settings import ServerSettings
from tests.processes import Proc, ProcessFailed, free_port, redis_proc, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

TINY_INPUT = InputContract(
    height=32, width=32, resize_size=32, resize_mode="squash", mean=(0.5,) * 3, std=(0.25,) * 3
)


def unpublished_manifest(
    labels: list[str],
    *,
    input: InputContract = TINY_INPUT,
    artifact: Artifact | None = None,
    **fields: Any,
) -> ModelManifest:
    """Version 1 of a model `m` that no registry holds, for tests that open or check a model
    directly; the artifact a TorchScript placeholder unless given."""
    return ModelManifest(
        name="m",
        version="1",
        labels=labels,
        input=input,
        artifact=artifact or Artifact(sha256="0" * 64, size_bytes=0),
        **fields,
    )


def conv_layers(*channels: int) -> list[nn.Module]:
    """3x3 convolutions (padding 1), each followed by a ReLU, from `channels[0]` channels to
    `channels[-1]`, with a 2x2 max pool between two of them: the body of the tests' small
    CNNs."""
    layers: list[nn.Module] = []
    for depth, (given, made) in enumerate(itertools.pairwise(channels)):
        if depth:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.Conv2d(given, made, 3, padding=1), nn.ReLU()]
    return layers


def tiny_network(num_classes: int = 3) -> nn.Module:
    """A small CNN for tests that need a model but not a good one."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    ).eval()


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """A local S3-compatible HTTP server (moto) in its own process; yields its endpoint URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="perito-moto-") as folder:
        server = Proc(
            "moto_server",
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            dict(os.environ),
            Path(folder) / "moto.log",
        ).launch()
        try:
            wait_for_port(port, process=server)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop(10)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class ServerThread:
    """`create_server` on its own event loop in a thread: a real server on a real socket."""

    def __init__(self, settings: object) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.running: object = None

    @classmethod
    def serving(cls, registry: Path | str, cache_dir: Path, **options: Any) -> ServerThread:
        """A server on a free port over `registry` (a folder or a URI), its model cache in
        `cache_dir`; `options`: any other `ServerSettings`."""
        return cls(ServerSettings(port=0, registry=str(registry), cache_dir=cache_dir, **options))

    def __enter__(self) -> ServerThread:
        from perito_server.app import create_server

        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(create_server(self.settings), self.loop)  # type: ignore[arg-type]
        self.running = future.result(120)
        return self

    @property
    def port(self) -> int:
        return self.running.port  # type: ignore[attr-defined,no-any-return]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coroutine: object, timeout: float = 60) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)  # type: ignore[arg-type]

    def __exit__(self, *exc: object) -> None:
        self.call(self.running.stop(0))  # type: ignore[attr-defined]
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def perito_command() -> list[str]:
    return [str(VENV_BIN / "perito")]


def run_perito(
    *args: str, env: dict[str, str], check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the `perito` CLI; with `check`, a non-zero exit fails with its stderr."""
    result = subprocess.run(
        [*perito_command(), *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"perito {' '.join(args)} -> {result.returncode}\n{result.stderr}")
    return result


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A real redis-server on a free port, no persistence; yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="perito-redis-") as folder:
        server = redis_proc(port, Path(folder) / "redis.log", dict(os.environ)).start(30)
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.stop(10)


def perito_proc(name: str, args: list[str], env: dict[str, str], log: Path, ready: str) -> Proc:
    """The `perito` CLI as a process (`perito serve`, `perito worker`): see `Proc`."""
    return Proc(name, [*perito_command(), *args], env, log, ready)


@dataclass
class ServeProcess:
    """`perito serve` in its own process: gRPC at `grpc_url`, HTTP at `http_url` (both
    `127.0.0.1:PORT`, no scheme, as tritonclient takes them)."""

    grpc_url: str
    http_url: str
    process: Proc


@contextlib.contextmanager
def perito_serve_with_http(work: Path, **env: str) -> Iterator[ServeProcess]:
    """`perito serve --http-port --preload tiny` over the registry `work/registry`, its cache
    in `work/cache`, one torch thread, `env` (`PERITO_*`) on top, logging to `work/serve.log`.
    Yields once both ports accept connections; on the way out stops it and fails unless it
    exited 0."""
    port, http_port = free_port(), free_port()
    process = perito_proc(
        "perito serve",
        ["serve", "--port", str(port), "--http-port", str(http_port), "--preload", "tiny"],
        subprocess_env(
            PERITO_REGISTRY=str(work / "registry"),
            PERITO_CACHE_DIR=str(work / "cache"),
            PERITO_TORCH_THREADS="1",
            **env,
        ),
        work / "serve.log",
        "HTTP on",
    ).launch()
    try:
        wait_for_port(port, timeout=120, process=process)
        wait_for_port(http_port, timeout=60, process=process)
        yield ServeProcess(f"127.0.0.1:{port}", f"127.0.0.1:{http_port}", process)
    finally:
        code = process.stop()
    assert code == 0, (work / "serve.log").read_text()[-4000:]


def run_in_threads(call: Callable[[], None], count: int, timeout: float = 120) -> None:
    """`call` in `count` threads at once; returns when they have ended (`timeout` a join)."""
    threads = [threading.Thread(target=call) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)


class WorkerProcess:
    """`perito worker` in its own process group (so kill -9 takes its children too)."""

    def __init__(self, env: dict[str, str], log_path: Path, *extra: str) -> None:
        self.log_path = log_path
        self.proc = perito_proc(
            "perito worker", ["worker", "--log-level", "INFO", *extra], env, log_path, " ready."
        ).launch()

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.proc.popen is not None
        return self.proc.popen

    def wait_ready(self, timeout: float = 60) -> WorkerProcess:
        self.proc.wait_ready(timeout)
        return self

    def kill_hard(self) -> None:
        """SIGKILL the whole process group: the worker and its pool children, no goodbyes."""
        self.proc.kill9()

    def stop(self) -> None:
        self.proc.stop(30)

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Stores:
    """Where a test's server and workers keep things: the registry (`work/registry` unless
    given, e.g. `s3://…` on the S3 server at `s3_endpoint`), Redis for jobs, job results
    (`work/results` unless given), caches under `work`, and `work` readable as local files."""

    work: Path
    redis_url: str
    registry: str = ""
    s3_endpoint: str | None = None
    results_uri: str = ""

    @property
    def registry_uri(self) -> str:
        return self.registry or str(self.work / "registry")

    def s3_client(self) -> Any:
        """A boto3 S3 client on the S3 server these stores use."""
        return make_s3_client(S3Options(endpoint_url=self.s3_endpoint))

    def open_registry(self, cache: str = "publish-cache") -> ModelRegistry:
        """The registry as the test itself reads and publishes it, with its own cache."""
        s3 = S3Options(endpoint_url=self.s3_endpoint) if self.s3_endpoint else None
        return ModelRegistry.open(self.registry_uri, cache_dir=self.work / cache, s3=s3)

    def server_settings(self, **options: Any) -> ServerSettings:
        """`perito serve`'s settings over these stores on a free port; `options` on top."""
        return ServerSettings(
            port=0,
            registry=self.registry_uri,
            s3_endpoint_url=self.s3_endpoint,
            redis_url=self.redis_url,
            cache_dir=self.work / "server-cache",
            results_uri=self.results_uri or str(self.work / "results"),
            local_roots=[self.work],
            **options,
        )

    def worker_env(self, **extra: str) -> dict[str, str]:
        """The environment of a `perito worker` (or any `perito` command) over these stores,
        at normal priority; `extra` `PERITO_*` variables on top."""
        stores = {
            "PERITO_REDIS_URL": self.redis_url,
            "PERITO_REGISTRY": self.registry_uri,
            "PERITO_CACHE_DIR": str(self.work / "worker-cache"),
            "PERITO_LOCAL_ROOTS": json.dumps([str(self.work)]),
            "PERITO_NICE": "0",
        }
        if self.s3_endpoint:
            stores["PERITO_S3_ENDPOINT_URL"] = self.s3_endpoint
        return subprocess_env(**{**stores, **extra})


def create_job(
    store: JobStore,
    items: Iterable[ItemInput],
    *,
    output_uri: str,
    chunk_size: int,
    data_root: str,
    model: str = "m",
    top_k: int = 1,
    **options: Any,
) -> tuple[Job, bool]:
    """`store.create` for a job made in the store directly, not through a server: version 1
    of `model`, no inline images, no confidence threshold, no labels, its data under
    `data_root` as the server places it (`parts.data_location`); `options` are the rest of
    `JobStore.create`'s (`job_id`, `max_items`, `tenant`, ...). Returns the job and whether
    this call made it."""
    options.setdefault("job_id", uuid.uuid4().hex[:20])
    return store.create(
        model=model,
        model_version="1",
        items=items,
        inline={},
        output_uri=output_uri,
        top_k=top_k,
        confidence_threshold=0,
        chunk_size=chunk_size,
        labels={},
        data_root=data_location(data_root, options.get("tenant", ""), options["job_id"]),
        **options,
    )


def succeeded_result(index: int) -> ItemResult:
    """Item `index` succeeded, label `a` at probability 1."""
    return ItemResult(index, ItemState.SUCCEEDED, predictions=[("a", 0, 1.0)])


def record_chunks(
    store: JobStore,
    job_id: str,
    result_of: Callable[[int], ItemResult] = succeeded_result,
    chunks: Iterable[int] | None = None,
) -> bool:
    """Do what workers do for `chunks` of a job (default: all): take each chunk's lease,
    write its part with `result_of(index)` for each of its items (id and URI as submitted),
    and close it. Returns whether the job is complete (every item accounted for)."""
    job = store.get(job_id)
    complete = False
    for chunk in range(job.chunks) if chunks is None else chunks:
        lease = store.acquire_chunk(job_id, chunk, "test-worker", ttl_s=60)
        assert lease.outcome == "acquired", lease
        results = []
        for offset, item in enumerate(store.chunk_inputs(job, chunk)):
            result = result_of(chunk * job.chunk_size + offset)
            result.id, result.uri = item.id, item.uri
            results.append(result)
        record = store.record_chunk(job, chunk, "test-worker", lease.attempts, results)
        assert record.outcome == "recorded", record
        complete = record.complete
    return complete


# `s3_stores(name, registry, **options)` (the conftest fixture): a test module's `Stores` on
# the session's S3 server and Redis, in a fresh folder `name`.
MakeStores = Callable[..., Stores]


def train_fashion_mnist(path: Path, *, samples: int = 12_000, epochs: int = 2) -> list[str]:
    """Train a small CNN on Fashion-MNIST for a few seconds and export it; returns labels."""
    from perito_training.datasets import FASHION_MNIST_LABELS, load_fashion_mnist
    from perito_training.export import export_torchscript

    torch.manual_seed(0)
    images, labels = load_fashion_mnist("train")
    x = torch.from_numpy(images[:samples].copy()).float().unsqueeze(1) / 255.0
    y = torch.from_numpy(labels[:samples].astype("int64"))
    network = nn.Sequential(
        _Grey(), *conv_layers(1, 16, 32), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 7 * 7, 10)
    )
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-3)
    network.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 128):
            batch = order[start : start + 128]
            # The exported module feeds normalised RGB: replicate the channel, mean 0.5 std 0.5.
            inputs = (x[batch].repeat(1, 3, 1, 1) - 0.5) / 0.5
            loss = nn.functional.cross_entropy(network(inputs), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    export_torchscript(network.eval(), FASHION_MNIST_INPUT, path)
    return list(FASHION_MNIST_LABELS)


class _Grey(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True)


FASHION_MNIST_INPUT = InputContract(
    height=28, width=28, resize_size=28, resize_mode="squash", mean=(0.5,) * 3, std=(0.5,) * 3
)


def write_pattern_images(
    root: Path,
    classes: tuple[str, ...] = ("minor", "moderate", "severe"),
    per_class: int = 40,
    size: int = 48,
    seed: int = 0,
    suffixes: dict[str, str] | None = None,
) -> Path:
    """Generated photos a small network can learn: class i is stripes at angle i * 180/n.

    Colours, stripe width, phase and noise vary per image, so only the orientation tells the
    classes apart. Written as JPEG (odd images) and PNG into `root/<class>/`, or with
    `suffixes` ({class: letter}) into `root/` named like `00012P.jpg`.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    for index, name in enumerate(classes):
        folder = root if suffixes else root / name
        folder.mkdir(parents=True, exist_ok=True)
        angle = np.pi * index / len(classes)
        for n in range(per_class):
            period = rng.uniform(6, 12)
            wave = np.sin(
                2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + rng.uniform(0, 6.3)
            )
            colour_a, colour_b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            mix = (wave[..., None] + 1) / 2
            pixels = mix * colour_a + (1 - mix) * colour_b + rng.normal(0, 12, (size, size, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            extension = "jpg" if n % 2 else "png"
            stem = f"{index:02d}{n:04d}{suffixes[name]}" if suffixes else f"{name}-{n:04d}"
            image.save(folder / f"{stem}.{extension}")
    return root


def encoded(pixels: np.ndarray, fmt: str, **params: Any) -> bytes:
    """A uint8 array (grey H x W, or RGB H x W x 3) as the bytes of an image file in `fmt`
    (PNG, JPEG, ...); `params` for PIL's encoder."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def red_jpeg() -> bytes:
    """A 64 x 48 JPEG of one colour, RGB (200, 40, 40): any image a model can take."""
    return encoded(np.full((48, 64, 3), (200, 40, 40), np.uint8), "JPEG")


class SlowS3Proxy:
    """An HTTP proxy in front of an S3 server that delays every object GET by `delay_s` and
    counts the GETs per path: slow storage, for tests of long chunks."""

    def __init__(self, endpoint: str, delay_s: float) -> None:
        import http.client
        import http.server
        from collections import Counter
        from urllib.parse import urlsplit

        target = urlsplit(endpoint)
        self.gets: Counter[str] = Counter()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                path = self.path.split("?", 1)[0]
                if self.command == "GET" and path.count("/") >= 2:  # /bucket/key: an object
                    proxy.gets[path] += 1
                    time.sleep(delay_s)
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> SlowS3Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


__all__ = ["Proc", "ProcessFailed", "free_port", "wait_for_port"]


@contextlib.contextmanager
def logged(name: str, level: int = logging.INFO) -> Iterator[list[str]]:
    """The messages logger `name` emits at `level` or above inside the block, caught by a
    handler on that logger itself: pytest's caplog listens on the root logger, whose handlers
    `configure_logging` (run by other tests in the same process) replaces."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


class FakeClock:
    """Seconds for code that takes a `clock`: they move only when a test moves `now`."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
