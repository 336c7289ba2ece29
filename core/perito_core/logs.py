"""Logging for the server and the worker: text for people, JSON lines for log pipelines.

`PERITO_LOG_FORMAT=json` gives one JSON object per line with the time, level, logger, message
and, when known, the gRPC call's `request_id` (the caller's `x-request-id` metadata, or a new
one) and the bulk job's `job_id`: set per call or per task in these context variables.

`building_forms_quietly` keeps two notices that torch gives on every build of compiled forms
out of a command's output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime

REQUEST_ID: ContextVar[str | None] = ContextVar("perito_request_id", default=None)
JOB_ID: ContextVar[str | None] = ContextVar("perito_job_id", default=None)
# The call's method as the metrics name it (`Classify`, `ModelInfer`, `HTTP Classify`): which
# door a prediction-log record came through.
DOOR: ContextVar[str | None] = ContextVar("perito_door", default=None)


class ContextFilter(logging.Filter):
    """Copies the request and job ids of the current context onto every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.job_id = JOB_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "job_id"):
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Root logging for a process: `fmt` is "text" or "json"."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _DropMessage(logging.Filter):
    """Drops the records whose message matches `pattern` (a regular expression, from the
    start); lets every other record through."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


# torch.utils.cpp_extension logs this when it is imported on a machine with a CUDA toolkit
# (nvcc) but no GPU: NNCF's check of which framework a model is from imports it, while it
# quantizes an OpenVINO model for the CPU, where CUDA plays no part.
_NO_CUDA = _DropMessage(r"No CUDA runtime is found")


@contextlib.contextmanager
def building_forms_quietly() -> Iterator[None]:
    """Around building compiled forms (`perito_core.models.gate`), leave out two notices
    that tell the person running the command nothing they can act on:

    - torch's FutureWarning "`torch.jit.script` is deprecated" (torch 2.14): the artifact is
      TorchScript (`model.pt`), so its ONNX export scripts the network first;
    - torch.utils.cpp_extension's "No CUDA runtime is found, using CUDA_HOME=..." (see
      `_NO_CUDA`).

    Every other warning and log record is shown as before. Not thread-safe (it changes the
    process's warning filters while inside): for a command's main thread.
    """
    cuda_probe = logging.getLogger("torch.utils.cpp_extension")
    cuda_probe.addFilter(_NO_CUDA)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", r"`torch\.jit\.script` is deprecated", category=FutureWarning
            )
            yield
    finally:
        cuda_probe.removeFilter(_NO_CUDA)
