"""Typed results: what the SDK returns instead of protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from google.protobuf import json_format

from perito.v1 import classify_pb2, models_pb2


@dataclass(frozen=True)
class Prediction:
    """One class and the probability the model gives it."""

    label: str
    class_index: int
    probability: float


@dataclass(frozen=True)
class Classification:
    """The answer for one image.

    Attributes:
        image_id: the id you gave the image, or its position.
        predictions: the top-k classes, most probable first.
        margin: top-1 minus top-2 probability; small means the model hesitates.
        normalized_entropy: 0 (certain) to 1 (uniform guess).
        uncertain: the top-1 probability is under the confidence threshold in effect.
    """

    image_id: str
    predictions: list[Prediction]
    margin: float
    normalized_entropy: float
    uncertain: bool
    model: str = ""
    model_version: str = ""

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
            image_id=message.image_id,
            predictions=[
                Prediction(p.label, p.class_index, p.probability) for p in message.predictions
            ],
            margin=message.margin,
            normalized_entropy=message.normalized_entropy,
            uncertain=message.uncertain,
            model=model,
            model_version=model_version,
        )


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
    card: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _from_proto(cls, message: models_pb2.ModelVersion) -> ModelVersion:
        return cls(
            model=message.model,
            version=message.version,
            aliases=list(message.aliases),
            labels=list(message.labels),
            input_height=message.input_height,
            input_width=message.input_width,
            sha256=message.sha256,
            created=message.create_time.ToDatetime() if message.HasField("create_time") else None,
            description=message.description,
            loaded=message.loaded,
            card=json_format.MessageToDict(message.card) if message.HasField("card") else {},
        )


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
            name=message.name,
            latest_version=message.latest_version,
            aliases=dict(message.aliases),
            versions=[ModelVersion._from_proto(v) for v in message.versions],
        )
