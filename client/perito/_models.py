"""Typed results: what the SDK returns instead of protobuf messages. The states and
`Prediction` are the contract's own (`perito.v1.vocabulary`), shared with the server."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from perito._errors import InvalidArgumentError
from perito.v1 import classify_pb2, jobs_pb2, models_pb2

# Re-exported: the SDK's modules name them from here, users as `perito.JobState`.
from perito.v1.vocabulary import ItemState as ItemState
from perito.v1.vocabulary import JobState as JobState
from perito.v1.vocabulary import Prediction as Prediction

S = TypeVar("S", bound=enum.StrEnum)


def _same(message: Message, names: str) -> dict[str, Any]:
    """The fields `names` (space-separated) of `message`, for the arguments of a type that
    takes them as they are and by the same names."""
    return {name: getattr(message, name) for name in names.split()}


def _state(kind: type[S], name: str) -> S:
    """A proto enum value's name as `kind`: `JOB_STATE_RUNNING` -> `JobState.RUNNING`."""
    return kind(name.partition("_STATE_")[2].lower())


def _time(message: Message, name: str) -> datetime | None:
    """A timestamp field, None when unset."""
    return getattr(message, name).ToDatetime() if message.HasField(name) else None


@dataclass(frozen=True)
class Classification:
    """The answer for one image.

    Attributes:
        image_id: the id you gave the image, or its position.
        predictions: the top-k classes, most probable first.
        margin: top-1 minus top-2 probability; small means the model hesitates.
        normalized_entropy: 0 (certain) to 1 (uniform guess).
        uncertain: the top-1 probability is under the confidence threshold in effect.
        first_frame_only: the image is animated (GIF or WebP); only its first frame was
            classified.
        form: which form of the model answered: `torchscript-fp32` (the reference) or a
            compiled form such as `openvino-int8` (empty from servers that predate forms).
        error: always None (a `RejectedImage` has one): `classify(..., on_invalid="skip")`
            returns both kinds, and `if result.error:` tells them apart.
    """

    error: ClassVar[None] = None

    image_id: str
    predictions: list[Prediction]
    margin: float
    normalized_entropy: float
    uncertain: bool
    model: str = ""
    model_version: str = ""
    first_frame_only: bool = False
    form: str = ""

    @property
    def top(self) -> Prediction:
        return self.predictions[0]

    @property
    def label(self) -> str:
        return self.predictions[0].label

    @property
    def probability(self) -> float:
        return self.predictions[0].probability

    @classmethod
    def _from_proto(
        cls, message: classify_pb2.Classification, model: str = "", model_version: str = ""
    ) -> Classification:
        return cls(
            **_same(message, "image_id margin normalized_entropy uncertain first_frame_only form"),
            predictions=[
                Prediction(p.label, p.class_index, p.probability) for p in message.predictions
            ],
            model=model,
            model_version=model_version,
        )


@dataclass(frozen=True)
class RejectedImage:
    """An image the server refused, in place of its `Classification`.

    `classify(..., on_invalid="skip")` returns one entry per image given, in order: a
    `Classification`, or this for an image that could not be classified (as Google Cloud
    Vision's batch annotate returns a status per image). With the default `on_invalid="fail"`
    the whole call raises `InvalidArgumentError` instead.

    Attributes:
        image_id: the id you gave the image, or its file name or position.
        index: the image's position in the list you gave `classify`.
        error: why: an `InvalidArgumentError` whose message and `violations` name this image
            as `images[index]`, e.g. "images[66] (id 'claim-67.jpg'): image is truncated".
    """

    image_id: str
    index: int
    error: InvalidArgumentError


@dataclass(frozen=True)
class ModelVersion:
    """One immutable published version and (from `get_model`) its model card."""

    model: str
    version: str
    aliases: list[str]
    labels: list[str]
    input_height: int
    input_width: int
    sha256: str
    created: datetime | None
    description: str
    loaded: bool
    # The model card: manifest.json's fields, a whole number as an int (see _json_numbers).
    card: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _from_proto(cls, message: models_pb2.ModelVersion) -> ModelVersion:
        return cls(
            **_same(message, "model version input_height input_width sha256 description loaded"),
            aliases=list(message.aliases),
            labels=list(message.labels),
            created=_time(message, "create_time"),
            card=_json_numbers(json_format.MessageToDict(message.card)),
        )


def _json_numbers(value: Any) -> Any:
    """A `google.protobuf.Struct`'s values with every whole number as an int. Struct holds
    each number as a double (`struct.proto`), so without this the card's counts (epochs, image
    counts, a confusion matrix's cells) would read 26.0; the price is that a float field
    holding a whole value (a mean of 0.0) reads 0, which compares equal. Other values are as
    they are."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _json_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_numbers(item) for item in value]
    return value


@dataclass(frozen=True)
class Model:
    """A model, its aliases and its versions (oldest first)."""

    name: str
    latest_version: str
    aliases: dict[str, str]
    versions: list[ModelVersion]

    @classmethod
    def _from_proto(cls, message: models_pb2.Model) -> Model:
        return cls(
            **_same(message, "name latest_version"),
            aliases=dict(message.aliases),
            versions=[ModelVersion._from_proto(v) for v in message.versions],
        )


@dataclass(frozen=True)
class Job:
    """A snapshot of a bulk job. `succeeded + failed + cancelled == total` once it is done."""

    id: str
    state: JobState
    model: str
    model_version: str
    total: int
    succeeded: int
    failed: int
    cancelled: int
    created: datetime | None
    started: datetime | None
    finished: datetime | None
    output_uri: str
    result_uris: list[str]
    error: str
    labels: dict[str, str] = field(default_factory=dict)
    tenant: str = ""  # the tenant that submitted it

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    @classmethod
    def _from_proto(cls, message: jobs_pb2.Job) -> Job:
        return cls(
            **_same(message, "id model model_version output_uri error tenant"),
            state=_state(JobState, jobs_pb2.JobState.Name(message.state)),
            total=message.total_items,
            succeeded=message.succeeded_items,
            failed=message.failed_items,
            cancelled=message.cancelled_items,
            created=_time(message, "create_time"),
            started=_time(message, "start_time"),
            finished=_time(message, "end_time"),
            result_uris=list(message.result_uris),
            labels=dict(message.labels),
        )


@dataclass(frozen=True)
class JobItemResult:
    """One image's outcome in a job; `classification` is set when it succeeded."""

    index: int
    image_id: str
    uri: str
    state: ItemState
    classification: Classification | None
    error: str

    @classmethod
    def _from_proto(
        cls, message: jobs_pb2.JobItemResult, model: str = "", model_version: str = ""
    ) -> JobItemResult:
        """`model` and `model_version`: the job's (ListJobResultsResponse's), which every item
        ran on."""
        return cls(
            **_same(message, "index image_id uri error"),
            state=_state(ItemState, jobs_pb2.ItemState.Name(message.state)),
            classification=(
                Classification._from_proto(message.classification, model, model_version)
                if message.HasField("classification")
                else None
            ),
        )
