"""Session fixtures: the real EfficientNet-Lite0 artifact, a tiny model, real photos."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from perito_core.models.registry import ModelRegistry
from perito_core.storage import S3Options, make_s3_client
from tests.helpers import (
    S3_ENV,
    TINY_INPUT,
    MakeStores,
    ServerThread,
    Stores,
    moto_s3_server,
    redis_server,
    tiny_network,
)

if TYPE_CHECKING:
    from perito_core.models.engines.base import BuiltForms

os.environ.setdefault("OMP_NUM_THREADS", "2")
# Servers and workers run each form at a set batch size in the suite instead of timing it at
# every model load (a second or two each); the measurement has tests of its own, which ask for
# `auto`.
os.environ.setdefault("PERITO_PREFERRED_BATCH_SIZE", "4")
os.environ.setdefault("PERITO_BATCH_SIZE", "4")
# The servers and workers of this test run mark and see each other's calls in a file of
# their own (claims first), not the host's, where another run's servers would slow them.
if "PERITO_ACTIVITY_FILE" not in os.environ:
    _activity = tempfile.mkdtemp(prefix="perito-tests-")
    atexit.register(shutil.rmtree, _activity, ignore_errors=True)
    os.environ["PERITO_ACTIVITY_FILE"] = os.path.join(_activity, "activity")


@pytest.fixture(scope="session")
def lite0_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageNet EfficientNet-Lite0 exported as a Perito artifact: model.pt + labels.txt."""
    from perito_training.pretrained import write_efficientnet_lite0

    out = tmp_path_factory.mktemp("lite0")
    write_efficientnet_lite0(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from perito_training.export import export_torchscript

    path = tmp_path_factory.mktemp("tiny") / "model.pt"
    export_torchscript(tiny_network(3), TINY_INPUT, path)
    return path


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real photos from scikit-image and scikit-learn, as JPEG files, by name."""
    from scripts.sample_photos import PHOTOS, write_sample_photos

    paths = write_sample_photos(tmp_path_factory.mktemp("photos"))
    return dict(zip(PHOTOS, paths, strict=True))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A local S3-compatible server (moto, its own process) with buckets `models`,
    `inspections` and `results`; credentials in the environment as boto3 expects."""
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    with moto_s3_server() as endpoint:
        client = make_s3_client(S3Options(endpoint_url=endpoint))
        for bucket in ("models", "inspections", "results"):
            client.create_bucket(Bucket=bucket)
        yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def s3_stores(
    tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str, redis_url: str
) -> MakeStores:
    """Makes a test module's stores on the session's S3 server and Redis: a fresh folder
    `name`, the registry at `registry` (an `s3://` URI), `options` (`results_uri`) on top."""

    def make(name: str, registry: str, **options: str) -> Stores:
        return Stores(tmp_path_factory.mktemp(name), redis_url, registry, s3_endpoint, **options)

    return make


def publish_lite0(registry: ModelRegistry, lite0_dir: Path, **kwargs: object) -> str:
    from perito_training.pretrained import EFFICIENTNET_LITE0_INPUT

    labels = (lite0_dir / "labels.txt").read_text().splitlines()
    manifest = registry.publish(
        "imagenet-efficientnet-lite0",
        lite0_dir / "model.pt",
        labels=labels,
        input=EFFICIENTNET_LITE0_INPUT,
        **kwargs,  # type: ignore[arg-type]
    )
    return manifest.version


def lite0_and_tiny_registry(
    root: Path, lite0_dir: Path, tiny_model_file: Path, tiny_name: str = "tiny"
) -> Path:
    """A registry folder at `root`: EfficientNet-Lite0 (alias `production`) and the tiny model
    as `tiny_name`."""
    registry = ModelRegistry.open(str(root), cache_dir=root / ".publish-cache")
    publish_lite0(registry, lite0_dir, aliases=("production",))
    publish_tiny(registry, tiny_model_file, name=tiny_name)
    return root


def tiny_registry(
    root: Path, tiny_model_file: Path, name: str = "tiny", **publish_options: object
) -> Path:
    """A registry folder at `root` holding the tiny model as `name`, version 1;
    `publish_options` (aliases, forms, ...) go to `publish_tiny`."""
    registry = ModelRegistry.open(str(root), cache_dir=root / ".publish-cache")
    publish_tiny(registry, tiny_model_file, name=name, **publish_options)
    return root


@contextlib.contextmanager
def two_tenants_serving(
    tmp_path: Path, tiny_model_file: Path, **settings: Any
) -> Iterator[tuple[ServerThread, dict[str, str]]]:
    """A server of the tiny model for tenants acme and globex (role classify, model tiny), no
    job store, `settings` (any other `ServerSettings`) given; yields it and their tokens."""
    from perito_core.access.tenancy import add_tenant

    registry = tiny_registry(tmp_path / "registry", tiny_model_file)
    tenants_file = tmp_path / "tenants.yaml"
    tokens = {
        name: add_tenant(tenants_file, name, roles=["classify"], models=["tiny"])
        for name in ("acme", "globex")
    }
    with ServerThread.serving(
        registry,
        tmp_path / "cache",
        preload=["tiny"],
        tenants_file=tenants_file,
        redis_url="redis://127.0.0.1:1/0",  # no jobs here
        **settings,
    ) as running:
        yield running, tokens


def publish_tiny(
    registry: ModelRegistry, model_file: Path, name: str = "tiny", **kwargs: object
) -> str:
    manifest = registry.publish(
        name,
        model_file,
        labels=["minor", "moderate", "severe"],
        input=TINY_INPUT,
        **kwargs,  # type: ignore[arg-type]
    )
    return manifest.version


def build_tiny_forms(model_file: Path, out_dir: Path, **options: Any) -> BuiltForms:
    """The tiny model's compiled forms, built and gated on 24 seeded random images (16 to
    calibrate, 8 held out); `options` (precisions, engines, ...) go to `build_forms`."""
    from perito_core.models.gate import build_forms

    spec = TINY_INPUT.spec()
    images = np.random.default_rng(0).integers(0, 256, (24, spec.height, spec.width, 3), np.uint8)
    return build_forms(
        model_file, TINY_INPUT, out_dir, calibration=images[:16], holdout=images[16:], **options
    )


def tiny_registry_with_fp32_form(root: Path, tiny_model_file: Path) -> Path:
    """A registry folder at `root` whose tiny model carries an OpenVINO FP32 form (built and
    gated on seeded random images), for tests of which form serves."""
    built = build_tiny_forms(
        tiny_model_file, root / ".forms", precisions=("fp32",), engines=("openvino",)
    )
    assert [form.name for form, _ in built.forms] == ["openvino-fp32"], built.skipped
    return tiny_registry(root, tiny_model_file, forms=built.forms, skipped_forms=built.skipped)


@pytest.fixture(scope="session")
def fp32_form_registry(tmp_path_factory: pytest.TempPathFactory, tiny_model_file: Path) -> Path:
    """`tiny_registry_with_fp32_form`, built once for the session: for tests that only read it
    (the forms are slow to build and gate)."""
    return tiny_registry_with_fp32_form(tmp_path_factory.mktemp("registry"), tiny_model_file)
