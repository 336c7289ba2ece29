"""The worker's loaded models: one per version and precision, the job's precision never less
exact than the worker's, at most `max_loaded_models` held (least recently used dropped first,
before the next one loads)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from perito_core.models.cache import ModelCache
from perito_core.models.selection import PrecisionUnavailable
from perito_worker import processing
from perito_worker.processing import WorkerRuntime
from perito_worker.settings import WorkerSettings
from tests.helpers import unpublished_manifest


@dataclass
class _Manifest:
    name: str
    version: str


@dataclass
class _Loaded:
    manifest: _Manifest
    form: str = "torchscript-fp32"
    load_seconds: float = 0.1


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> WorkerRuntime:
    loads: list[tuple[str, str, str]] = []

    def load_model(registry: object, name: str, version: str, **options: Any) -> _Loaded:
        loads.append((name, version, options["precision"]))
        form = "openvino-int8" if options["precision"] == "int8" else "torchscript-fp32"
        return _Loaded(_Manifest(name, version), form)

    monkeypatch.setattr(processing, "load_model", load_model)
    worker = object.__new__(WorkerRuntime)  # no Redis, registry or pools: the cache alone
    # A set batch size: nothing timed (these models have no forward pass).
    worker.settings = WorkerSettings(precision="int8", max_loaded_models=2, batch_size=4)
    # The manifest a job's named precision is checked against: model.pt and no compiled form.
    worker.registry = SimpleNamespace(  # type: ignore[assignment]
        manifest=lambda name, version: unpublished_manifest(["a", "b"])
    )
    worker.models = ModelCache(worker.settings.max_loaded_models)
    worker.batch_sizes = {}
    worker.compute = ThreadPoolExecutor(1)  # the model's thread, where loads run
    worker.loads = loads  # type: ignore[attr-defined]
    return worker


def test_a_version_is_loaded_once_per_precision(runtime: WorkerRuntime) -> None:
    runtime.model("tiny", "1")
    runtime.model("tiny", "1", "int8")  # the worker's own setting: the same model
    runtime.model("tiny", "1", "torchscript")
    assert runtime.loads == [("tiny", "1", "int8"), ("tiny", "1", "torchscript")]  # type: ignore[attr-defined]


def test_a_less_exact_or_unknown_precision_gives_way_to_the_workers(
    runtime: WorkerRuntime,
) -> None:
    runtime.model("tiny", "1", "auto")
    runtime.model("tiny", "1", "fp64")
    assert runtime.loads == [("tiny", "1", "int8")]  # type: ignore[attr-defined]


def test_at_most_max_loaded_models_are_held_least_recently_used_dropped(
    runtime: WorkerRuntime,
) -> None:
    runtime.model("a", "1")
    runtime.model("b", "1")
    runtime.model("a", "1")  # a is now the most recently used
    runtime.model("c", "1")  # drops b
    assert runtime.models.versions() == [("a", "1"), ("c", "1")]
    runtime.model("b", "1")  # loaded again
    assert runtime.loads[-1] == ("b", "1", "int8")  # type: ignore[attr-defined]
    assert len(runtime.models) == 2


def test_a_jobs_precision_the_version_lacks_fails_before_loading(runtime: WorkerRuntime) -> None:
    with pytest.raises(PrecisionUnavailable, match="has no bf16 form"):
        runtime.model("tiny", "1", "bf16")
    assert runtime.loads == []  # type: ignore[attr-defined]
