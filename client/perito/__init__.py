"""Perito: the Python SDK for the Perito image-classification service.

>>> from perito import Client
>>> with Client("localhost:8500") as client:
...     [result] = client.classify(["photo.jpg"], model="imagenet-efficientnet-lite0")
"""

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
    Classification,
    ItemState,
    Job,
    JobItemResult,
    JobState,
    Model,
    ModelVersion,
    Prediction,
    RejectedImage,
)
from perito._requests import Limits

__all__ = [
    "AlreadyExistsError",
    "AsyncClient",
    "AsyncJobHandle",
    "CancelledError",
    "Classification",
    "Client",
    "DeadlineExceededError",
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
    "RejectedImage",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
]

__version__ = "0.1.0"
