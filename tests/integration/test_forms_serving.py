"""The form that answers, over a real socket and in a worker: `PERITO_PRECISION` and fallback.

A tiny model published with an OpenVINO FP32 form: a server set to `fp32`, `auto` or a
precision the version lacks (`int8`, a preference) answers with it, one set to `torchscript`
with model.pt, and every result says which; a job item does the same in the worker's code.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import perito
from perito import ItemState, JobState
from perito_core.jobs.store import ItemInput, Job
from perito_core.models.registry import ModelRegistry
from perito_core.models.selection import load_model
from tests.helpers import ServerThread, red_jpeg

pytest.importorskip("openvino", reason="OpenVINO (optional engine, perito[serve]) not installed")
pytest.importorskip("nncf", reason="NNCF (INT8 quantization) not installed")

pytestmark = pytest.mark.integration


@pytest.fixture(params=["fp32", "auto", "torchscript", "int8"])
def served(
    request: pytest.FixtureRequest, fp32_form_registry: Path, tmp_path: Path
) -> Iterator[tuple[str, ServerThread]]:
    with ServerThread.serving(fp32_form_registry, tmp_path, precision=request.param) as running:
        yield request.param, running


def test_every_classify_result_names_the_form_that_answered(
    served: tuple[str, ServerThread],
) -> None:
    precision, server = served
    # The server's setting is a preference: `int8` of a version without INT8 falls back to its
    # more exact form, never refused.
    expected = "torchscript-fp32" if precision == "torchscript" else "openvino-fp32"
    with perito.Client(server.target, timeout=60) as client:
        results = client.classify([red_jpeg(), red_jpeg()], model="tiny")
        assert [r.form for r in results] == [expected, expected]
        card = client.get_model("tiny")
    forms = card.versions[-1].card["forms"]
    assert [form["name"] for form in forms] == ["openvino-fp32"]


def test_a_job_item_names_the_form_that_answered(fp32_form_registry: Path, tmp_path: Path) -> None:
    from perito_worker.processing import _classify, _Prepared

    registry = ModelRegistry.open(str(fp32_form_registry), cache_dir=tmp_path)
    model = load_model(registry, "tiny", "1", precision="fp32")
    job = Job(id="j", state=JobState.RUNNING, model="tiny", model_version="1", total=1)
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    item = ItemInput(uri="file:///x.jpg", id="x")
    # The runtime's model thread only: no Redis, no drift window, no server to yield to.
    with ThreadPoolExecutor(1) as compute:
        runtime = SimpleNamespace(compute=compute, activity=None)
        (result,) = _classify(runtime, job, model, [_Prepared(0, item, pixels)], drift=False)  # type: ignore[arg-type]
    assert result.state is ItemState.SUCCEEDED
    assert result.form == "openvino-fp32"
    assert '"form":"openvino-fp32"' in result.to_json()


def test_a_worker_runs_each_form_at_the_batch_size_it_measured(
    fp32_form_registry: Path, tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from perito_worker.processing import WorkerRuntime
    from perito_worker.settings import WorkerSettings

    def runtime(**settings: object) -> WorkerRuntime:
        return WorkerRuntime(
            WorkerSettings(
                redis_url=redis_url,
                registry=str(fp32_form_registry),
                cache_dir=tmp_path / "cache",
                **settings,  # type: ignore[arg-type]
            )
        )

    caplog.set_level("INFO")
    timed = runtime(max_batch_size=4, batch_size="auto")  # the suite sets 4 (tests/conftest.py)
    model = timed.model("tiny", "1")
    assert timed.batch_size(model) in (1, 2, 4)  # the fastest of those it timed
    assert f"form openvino-fp32, batch size {timed.batch_size(model)}" in caplog.text
    assert "batch 1:" in caplog.text and "4:" in caplog.text  # each size's images/s logged
    fixed = runtime(batch_size=3)
    assert fixed.batch_size(fixed.model("tiny", "1")) == 3  # a set size: nothing timed


def test_a_worker_starts_no_forward_pass_while_a_call_is_in_hand(
    fp32_form_registry: Path, tmp_path: Path
) -> None:
    from perito_core.scheduling import InteractiveActivity
    from perito_worker.processing import _classify, _compute, _Prepared

    registry = ModelRegistry.open(str(fp32_form_registry), cache_dir=tmp_path)
    model = load_model(registry, "tiny", "1", precision="fp32")
    job = Job(id="j", state=JobState.RUNNING, model="tiny", model_version="1", total=1)
    batch = [_Prepared(0, ItemInput(uri="file:///x.jpg", id="x"), np.zeros((32, 32, 3), np.uint8))]
    server = InteractiveActivity(tmp_path / "activity")  # what perito serve marks
    settings = SimpleNamespace(yield_quiet_s=0.05, yield_max_wait_s=30.0)
    with ThreadPoolExecutor(1) as compute:
        runtime = SimpleNamespace(
            compute=compute, activity=InteractiveActivity(tmp_path / "activity"), settings=settings
        )
        server.begin()  # a call in hand
        computing = _compute(runtime, model, batch, job.id)  # type: ignore[arg-type]
        assert computing is not None
        time.sleep(0.3)
        assert not computing.done()  # held back on the model's thread
        server.end()
        ended = time.monotonic()
        (result,) = _classify(runtime, job, model, batch, drift=False, computing=computing)  # type: ignore[arg-type]
        assert time.monotonic() - ended < 5.0  # ran once quiet, long before the 30 s bound
    assert result.state is ItemState.SUCCEEDED


def test_a_server_marks_each_call_it_has_in_hand(fp32_form_registry: Path, tmp_path: Path) -> None:
    from perito_core.scheduling import InteractiveActivity

    path = tmp_path / "activity"
    with ServerThread.serving(fp32_form_registry, tmp_path / "cache", activity_file=path) as server:
        workers_view = InteractiveActivity(path)
        assert workers_view.busy_until() == 0.0  # no call yet
        with perito.Client(server.target, timeout=60) as client:
            client.classify([red_jpeg()], model="tiny")
        answered = time.monotonic()
        assert 0.0 < workers_view.busy_until() <= answered  # marked, and ended with the call
