"""The worker's finalize task for a job deleted while its last chunks ran (a real Redis): it
finds nothing to finish and says so in one line, never an ERROR with a traceback (which
Celery logs for every exception a task raises, and retries it eight times)."""

from __future__ import annotations

from pathlib import Path

import pytest

from perito_worker import tasks
from perito_worker.processing import WorkerRuntime
from perito_worker.settings import WorkerSettings
from tests.helpers import logged

pytestmark = pytest.mark.integration


def test_finalizing_a_deleted_job_ends_quietly(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = WorkerSettings(redis_url=redis_url, registry=str(tmp_path / "registry"))
    monkeypatch.setattr(tasks, "_runtime", WorkerRuntime(settings))
    with logged("perito_worker.tasks") as lines:
        tasks.finalize_job_task.run("0123456789abcdef0123")  # no such job: deleted
    assert lines == ["job 0123456789abcdef0123 was deleted before its results files were written"]
