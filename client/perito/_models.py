"""Typed results: what the SDK returns instead of protobuf messages. The states and
`Prediction` are the contract's own (`perito.v1.vocabulary`), shared with the server."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
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


def _optional(message: Message, name: str) -> float | None:
    """An `optional` float field, None when unset."""
    return float(getattr(message, name)) if message.HasField(name) else None


def _time(message: Message, name: str) -> datetime | None:
    """A timestamp field as an aware datetime in UTC (a naive one would read as local time),
    None when unset."""
    return getattr(message, name).ToDatetime(tzinfo=UTC) if message.HasField(name) else None


@dataclass(frozen=True)
class Provenance:
    """What produced an answer, so that it can be proven later (docs/trust.md#provenance).

    Attributes:
        input_sha256: sha256 (hex) of the image's bytes as the server received them (for a
            bulk item given by URI: the bytes read from it).
        model: the model's name.
        model_version: the concrete version that answered.
        artifact_sha256: sha256 (hex) of the version's artifact (`model.pt` or the imported
            `.onnx`), verified when the server loaded it.
        form: the serving form that answered (`torchscript-fp32`, `openvino-int8`, ...).
        form_files: each of that form's files (its path in the version's folder) -> sha256
            (hex); for `torchscript-fp32` the artifact.
        confidence_threshold: the threshold applied, 0 if none.
        request_id: the call's request id (`x-request-id`), or for a bulk item its job's id.
        quality_issues: the photo-quality issues found (as `Quality.issues`).
    """

    input_sha256: str
    model: str
    model_version: str
    artifact_sha256: str
    form: str
    form_files: dict[str, str]
    confidence_threshold: float
    request_id: str
    quality_issues: list[str] = field(default_factory=list)

    @classmethod
    def _from_proto(cls, message: classify_pb2.Provenance) -> Provenance:
        return cls(
            **_same(
                message,
                "input_sha256 model model_version artifact_sha256 form confidence_threshold "
                "request_id",
            ),
            form_files={f.file: f.sha256 for f in message.form_files},
            quality_issues=list(message.quality_issues),
        )


@dataclass(frozen=True)
class Quality:
    """The photo's measures before the model ran, and the issues found
    (docs/trust.md#quality).

    Attributes:
        sharpness: variance of the Laplacian of the grey image scaled to 256 pixels on its
            shorter side (grey levels 0-255); low is blurry.
        dark_fraction: share of clipped dark pixels (grey level <= 8), in [0, 1].
        bright_fraction: share of clipped bright pixels (grey level >= 247), in [0, 1].
        brightness: mean grey level, 0-255.
        contrast: standard deviation of the grey levels, 0-255; near 0 is uniform.
        width, height: the decoded photo's size in pixels.
        resolution: its shorter side divided by the model's input side.
        issues: `BLURRY`, `UNDEREXPOSED`, `OVEREXPOSED`, `LOW_RESOLUTION`, `UNIFORM`; empty
            when the photo passed every threshold.
    """

    sharpness: float
    dark_fraction: float
    bright_fraction: float
    brightness: float
    contrast: float
    width: int
    height: int
    resolution: float
    issues: list[str] = field(default_factory=list)

    @classmethod
    def _from_proto(cls, message: classify_pb2.Quality) -> Quality:
        return cls(
            **_same(
                message,
                "sharpness dark_fraction bright_fraction brightness contrast width height "
                "resolution",
            ),
            issues=list(message.issues),
        )


@dataclass(frozen=True)
class Explanation:
    """Where in the photo the model looked for its top-1 class (docs/trust.md#explanations).

    Attributes:
        method: `occlusion`, or `cam` where the artifact exports a class-activation map.
        class_index, label: the class explained (the top-1).
        grid: the heat map, `grid_height` rows of `grid_width` floats in [0, 1] (1: where
            hiding the photo lowers the class's probability most).
        overlay_png: a small PNG of the photo with the heat map over it.
    """

    method: str
    class_index: int
    label: str
    grid: list[list[float]]
    overlay_png: bytes

    @property
    def grid_height(self) -> int:
        return len(self.grid)

    @property
    def grid_width(self) -> int:
        return len(self.grid[0]) if self.grid else 0

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the overlay PNG to `path` (a file; its folder must exist) and return it.

        Raises:
            OSError: the file cannot be written.
        """
        target = Path(path)
        target.write_bytes(self.overlay_png)
        return target

    @classmethod
    def _from_proto(cls, message: classify_pb2.Explanation) -> Explanation:
        width = message.grid_width
        values = list(message.grid)
        rows = [values[i : i + width] for i in range(0, len(values), width)] if width else []
        return cls(
            **_same(message, "method class_index label overlay_png"),
            grid=rows,
        )


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
        provenance: what produced the answer: the input's and the model files' sha256, the
            version, the request id (docs/trust.md#provenance). None from servers that
            predate it.
        quality: the photo's quality measures and issues (docs/trust.md#quality), or None.
        explanation: the top-1 class's heat map, when you asked `explain`, else None.
        expected_accuracy: how often the model's top-1 class was right, on the model card's
            held-out images, at this answer's top-1 probability (the card's reliability
            curve), in [0, 1]; None when the card has no curve or too few images there
            (docs/trust.md#figures).
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
    provenance: Provenance | None = None
    quality: Quality | None = None
    explanation: Explanation | None = None
    expected_accuracy: float | None = None

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
                Prediction(
                    p.label,
                    p.class_index,
                    p.probability,
                    card_precision=_optional(p, "card_precision"),
                    card_recall=_optional(p, "card_recall"),
                )
                for p in message.predictions
            ],
            model=model,
            model_version=model_version,
            provenance=(
                Provenance._from_proto(message.provenance)
                if message.HasField("provenance")
                else None
            ),
            quality=Quality._from_proto(message.quality) if message.HasField("quality") else None,
            explanation=(
                Explanation._from_proto(message.explanation)
                if message.HasField("explanation")
                else None
            ),
            expected_accuracy=_optional(message, "expected_accuracy"),
        )


@dataclass(frozen=True)
class RejectedImage:
    """An image the server refused (or the client could not send: a file it cannot read, an
    array or picture it cannot encode, one larger than a request), in place of its
    `Classification`.

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
    # Set while the server cannot load this version for an alias moved to it (or split to it
    # as a canary): which alias, and that it still answers with its previous version there.
    load_error: str = ""
    # The model card: manifest.json's fields, a whole number as an int (see _json_numbers).
    card: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _from_proto(cls, message: models_pb2.ModelVersion) -> ModelVersion:
        return cls(
            **_same(
                message,
                "model version input_height input_width sha256 description loaded load_error",
            ),
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
class AliasRollout:
    """What an alias sends to versions other than its own during a rollout: a canary that
    answers `canary_percent` (0 to 100) of its requests, a shadow run on `shadow_sample`
    (0 to 1) of them after they are answered; a version is "" where there is none."""

    canary_version: str = ""
    canary_percent: float = 0.0
    shadow_version: str = ""
    shadow_sample: float = 0.0

    @classmethod
    def _from_proto(cls, message: models_pb2.AliasRollout) -> AliasRollout:
        return cls(**_same(message, "canary_version canary_percent shadow_version shadow_sample"))


@dataclass(frozen=True)
class Model:
    """A model, its aliases and its versions (oldest first); `rollouts`: the aliases that
    have a canary or a shadow, by alias (`aliases` names each alias's own version)."""

    name: str
    latest_version: str
    aliases: dict[str, str]
    versions: list[ModelVersion]
    rollouts: dict[str, AliasRollout] = field(default_factory=dict)

    @classmethod
    def _from_proto(cls, message: models_pb2.Model) -> Model:
        return cls(
            **_same(message, "name latest_version"),
            aliases=dict(message.aliases),
            versions=[ModelVersion._from_proto(v) for v in message.versions],
            rollouts={a: AliasRollout._from_proto(r) for a, r in message.rollouts.items()},
        )


@dataclass(frozen=True)
class Job:
    """A snapshot of a bulk job. `succeeded + failed + cancelled == total` once it is done;
    `created`, `started` and `finished` are aware datetimes in UTC (None until they happen)."""

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
