"""`perito verify` on a bulk job's results.jsonl: a real server, a real `perito worker` and
redis-server run the job over a folder of photos; the CLI, as a process, checks each result
against the photos given with --images."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import perito
from tests.conftest import publish_tiny
from tests.helpers import ServerThread, Stores, WorkerProcess, encoded, run_perito

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def job_results(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_file: Path, redis_url: str
) -> Iterator[tuple[Path, Path, Stores]]:
    """(results.jsonl, the photos' folder, the stores) of a finished job over four photos."""
    work = tmp_path_factory.mktemp("verify-results")
    stores = Stores(work, redis_url)
    publish_tiny(stores.open_registry(), tiny_model_file)
    photos = work / "claims"
    photos.mkdir()
    for n in range(4):
        pixels = np.random.default_rng(n).integers(0, 255, (48, 48, 3), dtype=np.uint8)
        (photos / f"claim-{n}.jpg").write_bytes(encoded(pixels, "JPEG"))
    with (
        ServerThread(stores.server_settings(watchdog_interval_s=1)) as server,
        WorkerProcess(stores.worker_env(), work / "worker.log") as worker,
    ):
        worker.wait_ready()
        with perito.Client(server.target, timeout=60) as client:
            job = client.submit_job(str(photos), model="tiny").wait(timeout=120)
        assert job.succeeded == 4, job
        results = Path(job.output_uri) / "results.jsonl"
        deadline = time.monotonic() + 30
        while not (results.parent / "results.csv").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        yield results, photos, stores


def verify(stores: Stores, *args: str) -> tuple[int, str]:
    result = run_perito("verify", *args, env=stores.worker_env(), check=False)
    return result.returncode, result.stdout + result.stderr


def test_verify_passes_a_jobs_untouched_results(job_results: tuple[Path, Path, Stores]) -> None:
    results, photos, stores = job_results
    code, report = verify(stores, str(results), "--images", str(photos), "--json")
    assert code == 0, report
    checked = json.loads(report)
    assert checked["ok"] and checked["checked"] == 4
    assert {item["image"].rpartition("/")[2] for item in checked["items"]} == {
        f"claim-{n}.jpg" for n in range(4)
    }
    assert {json.dumps(item["checks"], sort_keys=True) for item in checked["items"]} == {
        json.dumps({"answer": "ok", "artifact": "ok", "input": "ok"}, sort_keys=True)
    }


def test_verify_names_a_photo_swapped_after_the_job(
    job_results: tuple[Path, Path, Stores], tmp_path: Path
) -> None:
    results, photos, stores = job_results
    swapped = tmp_path / "claims"
    swapped.mkdir()
    for photo in photos.iterdir():
        (swapped / photo.name).write_bytes(photo.read_bytes())
    (swapped / "claim-2.jpg").write_bytes((photos / "claim-3.jpg").read_bytes())
    code, report = verify(stores, str(results), "--images", str(swapped))
    assert code == 1, report
    flagged = [
        row for row in report.splitlines() if row.startswith("results.jsonl:") and "mismatch" in row
    ]
    assert len(flagged) == 1 and "claim-2.jpg" in flagged[0], report
    assert "swapped image" in report
    assert "1 with mismatches" in report


def test_a_results_file_without_its_images_is_refused(
    job_results: tuple[Path, Path, Stores],
) -> None:
    results, _, stores = job_results
    code, report = verify(stores, str(results))
    assert code != 0
    assert "--images" in report
