"""Perito: the Python SDK for the Perito image-classification service.

>>> from perito import Client
>>> with Client("localhost:8500") as client:
...     [result] = client.classify(["photo.jpg"], model="imagenet-efficientnet-lite0")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from perito._async import AsyncClient, AsyncJobHandle
    from perito._client import Client, JobHandle
    from perito._errors import (
        AlreadyExistsError,
        CancelledError,
        DeadlineExceededError,
        FailedPreconditionError,
        FieldViolation,
        InternalError,
        InvalidArgumentError,
        NotFoundError,
        PeritoError,
        PermissionDeniedError,
        ResourceExhaustedError,
        UnauthenticatedError,
        UnavailableError,
        UnimplementedError,
    )
    from perito._jobs import JobTimeoutError
    from perito._models import (
        AliasRollout,
        Classification,
        Explanation,
        Job,
        JobItemResult,
        Model,
        ModelVersion,
        Provenance,
        Quality,
        RejectedImage,
    )
    from perito._requests import Limits
    from perito.v1.vocabulary import ItemState, JobState, Prediction

# Each public name and the module that defines it, imported when the name is first used: so
# the API contract, `perito.v1` (which the server imports), loads none of the client.
_HOMES = {
    "AsyncClient": "perito._async",
    "AsyncJobHandle": "perito._async",
    "Client": "perito._client",
    "JobHandle": "perito._client",
    **dict.fromkeys(
        [
            "AlreadyExistsError",
            "CancelledError",
            "DeadlineExceededError",
            "FailedPreconditionError",
            "FieldViolation",
            "InternalError",
            "InvalidArgumentError",
            "NotFoundError",
            "PeritoError",
            "PermissionDeniedError",
            "ResourceExhaustedError",
            "UnauthenticatedError",
            "UnavailableError",
            "UnimplementedError",
        ],
        "perito._errors",
    ),
    "JobTimeoutError": "perito._jobs",
    **dict.fromkeys(
        [
            "AliasRollout",
            "Classification",
            "Explanation",
            "Job",
            "JobItemResult",
            "Model",
            "ModelVersion",
            "Provenance",
            "Quality",
            "RejectedImage",
        ],
        "perito._models",
    ),
    "Limits": "perito._requests",
    **dict.fromkeys(["ItemState", "JobState", "Prediction"], "perito.v1.vocabulary"),
}


def __getattr__(name: str) -> Any:
    """`perito.Client` and the other public names, imported on first use (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'perito' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


__all__ = [
    "AliasRollout",
    "AlreadyExistsError",
    "AsyncClient",
    "AsyncJobHandle",
    "CancelledError",
    "Classification",
    "Client",
    "DeadlineExceededError",
    "Explanation",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "ItemState",
    "Job",
    "JobHandle",
    "JobItemResult",
    "JobState",
    "JobTimeoutError",
    "Limits",
    "Model",
    "ModelVersion",
    "NotFoundError",
    "PeritoError",
    "PermissionDeniedError",
    "Prediction",
    "Provenance",
    "Quality",
    "RejectedImage",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
]

__version__ = "0.1.0"
