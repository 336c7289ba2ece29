"""The words both sides of the perito.v1 API speak that are not protobuf messages: a bulk
job's and an item's states, and one class's prediction.

The SDK returns these (`perito.JobState`, `perito.ItemState`, `perito.Prediction` are these
very types), and the server, the worker and the job store record and answer with them, so
the two sides can never drift. Standard library only: importing this module loads none of
the SDK's client code (no gRPC channel, no `perito._*`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["ItemState", "JobState", "Prediction"]


class JobState(enum.StrEnum):
    """A bulk job's state, as `jobs.proto`'s `JobState` without its `JOB_STATE_` prefix.

    QUEUED and RUNNING are live; the other four are terminal (`terminal`), and a terminal
    job never changes state again.
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIALLY_SUCCEEDED = "partially_succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


class ItemState(enum.StrEnum):
    """One image's state in a bulk job, as `jobs.proto`'s `ItemState` without its
    `ITEM_STATE_` prefix: PENDING until a worker records its outcome, then one of the other
    three for good."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Prediction:
    """One class and the probability the model gives it.

    Attributes:
        label: the class's name, from the model's labels.
        class_index: its position in the model's output (0-based).
        probability: softmax probability in [0, 1].
    """

    label: str
    class_index: int
    probability: float
