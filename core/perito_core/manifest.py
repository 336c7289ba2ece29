"""The model artifact's manifest: the contract that travels with the weights.

`{registry}/models/{name}/{version}/manifest.json` says how to feed the module (`input`), what
its outputs mean (`labels`), how to verify it (`artifact.sha256`), and carries the model card
(metrics, calibration, training data fingerprint, training config).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from perito_core.imaging import InputSpec, Interpolation, ResizeMode

MANIFEST_SCHEMA_VERSION = 1


class InputContract(BaseModel):
    """What the module takes: a uint8 RGB batch, NCHW, at `height` x `width`.

    The module normalises (and resizes, if handed another size) inside; the runtime hands it
    images already prepared this way, with the same code training used.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    resize_size: int = Field(gt=0, le=8192)
    resize_mode: ResizeMode = "center_crop"
    interpolation: Interpolation = "bilinear"
    # Informational: the normalisation the module applies inside.
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def spec(self) -> InputSpec:
        return InputSpec(
            height=self.height,
            width=self.width,
            resize_size=self.resize_size,
            resize_mode=self.resize_mode,
            interpolation=self.interpolation,
        )


class Artifact(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str = "model.pt"
    format: Literal["torchscript"] = "torchscript"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)


class ModelManifest(BaseModel):
    """Everything known about one immutable model version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = MANIFEST_SCHEMA_VERSION
    name: str
    version: str
    labels: list[str] = Field(min_length=2)
    input: InputContract
    artifact: Artifact
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    description: str = ""
    # A top-1 probability under this marks a prediction `uncertain` unless the caller says
    # otherwise; chosen from validation data by the trainer.
    confidence_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    metrics: dict[str, Any] = Field(default_factory=dict)
    calibration: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    source: dict[str, Any] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: list[str]) -> list[str]:
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be unique")
        if any(not label.strip() for label in labels):
            raise ValueError("labels must not be blank")
        return labels

    def card(self) -> dict[str, Any]:
        """The parts of the manifest a person reads to judge the model."""
        return self.model_dump(mode="json", exclude={"schema_version", "name", "version"})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
