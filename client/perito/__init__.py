"""Perito: the Python SDK for the Perito image-classification service.

>>> from perito import Client
>>> with Client("localhost:8500") as client:
...     [result] = client.classify(["photo.jpg"], model="imagenet-efficientnet-lite0")
"""

from perito._client import Client
from perito._errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PeritoError,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
)
from perito._jobs import ItemState, Job, JobHandle, JobItemResult, JobState, JobTimeoutError
from perito._models import Classification, Model, ModelVersion, Prediction

__all__ = [
    "AlreadyExistsError",
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
    "Model",
    "ModelVersion",
    "NotFoundError",
    "PeritoError",
    "Prediction",
    "ResourceExhaustedError",
    "UnavailableError",
    "UnimplementedError",
]

__version__ = "0.1.0"
