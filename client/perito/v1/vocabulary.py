"""The words both sides of the perito.v1 API speak that are not protobuf messages: a bulk
job's and an item's states, one class's prediction, and the HTTP status of each status code.

The SDK returns these (`perito.JobState`, `perito.ItemState`, `perito.Prediction` are these
very types), and the server, the worker and the job store record and answer with them, so
the two sides can never drift. Standard library only: importing this module loads none of
the SDK's client code (no gRPC channel, no `perito._*`).
"""

from __future__ import annotations

import enum
import textwrap
from dataclasses import dataclass

__all__ = [
    "ACCURACY_CONTROL_ATTEMPT",
    "EXIT_CODES",
    "HTTP_STATUS",
    "ItemState",
    "JobState",
    "Prediction",
    "refusal_paragraphs",
]

EXIT_CODES: dict[str, int] = {
    "NOT_FOUND": 3,
    "INVALID_ARGUMENT": 4,
    "UNAVAILABLE": 5,
    "RESOURCE_EXHAUSTED": 5,
}
"""The `perito` command's exit code for a refusal of each status code (any other: 1; a usage
error is 2), the same whether the command calls a server or reads the registry itself: 3 not
found, 4 invalid input, 5 unavailable or overloaded (worth retrying)."""

ACCURACY_CONTROL_ATTEMPT = "with accuracy control: "
"""How a model card's reason for a form not built (`skipped_forms`) begins its accuracy-control
attempt, after the post-training attempt's reason and "; " (`perito models show` prints each
attempt as its own paragraph)."""


def refusal_paragraphs(reason: str, indent: str = "    ", width: int = 100) -> list[str]:
    """A form's reason for not being built as people read it: one paragraph per attempt
    (post-training, then `ACCURACY_CONTROL_ATTEMPT`), each wrapped at `width` characters,
    words kept whole (a path such as `calibration/held-out` is not split at its hyphen), its
    first line indented by `indent` and the rest two more spaces."""
    first, *later = reason.split(f"; {ACCURACY_CONTROL_ATTEMPT}")
    return [
        textwrap.fill(
            attempt,
            width,
            initial_indent=indent,
            subsequent_indent=indent + "  ",
            break_on_hyphens=False,
        )
        for attempt in [first, *(ACCURACY_CONTROL_ATTEMPT + text for text in later)]
    ]


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
        card_precision: the class's precision in the model card, in [0, 1]: of the
            held-out images the model gave this class, the share that were of it. Measured
            by the trainer on its held-out split (Perito's trainer: the test split, which the
            card's `metrics.split` names). None when the card has none (an imported model).
        card_recall: the class's recall in the model card, in [0, 1]: of the held-out
            images of this class, the share the model gave it. None as `card_precision`.
    """

    label: str
    class_index: int
    probability: float
    card_precision: float | None = None
    card_recall: float | None = None


# The HTTP status of each gRPC status code, by the code's name: google/rpc/code.proto's table,
# which Google AIP-193 ("Errors") and gRPC-HTTP transcoding use. Every HTTP door answers a
# refusal with it (the server's OIP REST and JSON API, the web page), so one error has one
# status whichever door it comes through.
HTTP_STATUS: dict[str, int] = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}
