"""One item of a bulk job: as submitted (`ItemInput`) and as classified (`ItemResult`), and
their lines in the job's files in object storage (`perito_core.jobs.parts`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# The API's item states: the contract's, which the SDK returns too.
from perito.v1.vocabulary import ItemState
from perito_core.quality import Quality


@dataclass(frozen=True)
class ItemInput:
    """One item of a job as submitted: an id, and a URI unless it came inline. `error` is set
    for an item found unreadable at submission (a listed object outside what the caller may
    read, such as a symlink out of the folder): it fails with that reason, never read.
    `given` is the caller's words for `uri` where they differ from the checked location the
    worker reads (a path through a symbolic link): the item's results name it as given, never
    where the link leads."""

    id: str
    uri: str = ""
    error: str = ""
    given: str = ""

    @property
    def shown_uri(self) -> str:
        """The item's location as its results name it: the caller's words."""
        return self.given or self.uri

    def as_record(self) -> dict[str, str]:
        """The item as a line of a chunk's inputs file: `{"id", "uri"[, "error"][, "given"]}`."""
        record = {"id": self.id, "uri": self.uri}
        if self.error:
            record["error"] = self.error
        if self.given:
            record["given"] = self.given
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ItemInput:
        """The inverse of `as_record` (a line of a chunk's inputs file, parsed).

        Raises:
            KeyError, TypeError: `record` is not an item's line.
        """
        return cls(
            str(record["id"]),
            str(record["uri"]),
            str(record.get("error", "")),
            str(record.get("given", "")),
        )


@dataclass
class ItemResult:
    """One item's outcome. `predictions` are (label, class_index, probability)."""

    index: int
    state: ItemState
    id: str = ""
    uri: str = ""
    predictions: list[tuple[str, int, float]] = field(default_factory=list)
    margin: float = 0.0
    normalized_entropy: float = 0.0
    uncertain: bool = False
    error: str = ""
    first_frame_only: bool = False
    # Which form of the model answered (`openvino-int8`, `torchscript-fp32`, ...).
    form: str = ""
    # sha256 (hex) of the image's bytes as read, for its provenance (the version's file
    # digests are the job's: `Job.served`).
    input_sha256: str = ""
    # The photo's quality measures and issues (`perito_core.quality`); None when the image
    # was not decoded (or was recorded before the gate).
    quality: Quality | None = None

    def as_record(self) -> dict[str, Any]:
        """The result as a line of a chunk's part: `index`, `id`, `uri`, `state`,
        `predictions` ([label, class_index, probability] each), `margin` and
        `normalized_entropy` (rounded to 6 places), `uncertain`, `error`, and when set
        `first_frame_only`, `form`, `sha256`, `quality` (`Quality.as_dict`)."""
        return {
            "index": self.index,
            "id": self.id,
            "uri": self.uri,
            "state": self.state.value,
            "predictions": self.predictions,
            "margin": round(self.margin, 6),
            "normalized_entropy": round(self.normalized_entropy, 6),
            "uncertain": self.uncertain,
            "error": self.error,
            **({"first_frame_only": True} if self.first_frame_only else {}),
            **({"form": self.form} if self.form else {}),
            **({"sha256": self.input_sha256} if self.input_sha256 else {}),
            **({"quality": self.quality.as_dict()} if self.quality else {}),
        }

    def to_json(self) -> str:
        """`as_record` as one line of strict JSON (RFC 8259).

        Raises:
            ValueError: a NaN or infinity slipped into a probability or a measure.
        """
        return json.dumps(self.as_record(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> ItemResult:
        """The inverse of `as_record` (a line of a part, parsed).

        Raises:
            KeyError, TypeError, ValueError: `data` is not such a line.
        """
        return cls(
            index=int(data["index"]),
            state=ItemState(data["state"]),
            id=str(data["id"]),
            uri=str(data["uri"]),
            predictions=[
                (str(label), int(index), float(p)) for label, index, p in data["predictions"]
            ],
            margin=float(data["margin"]),
            normalized_entropy=float(data["normalized_entropy"]),
            uncertain=bool(data["uncertain"]),
            error=str(data["error"]),
            first_frame_only=bool(data.get("first_frame_only", False)),
            form=str(data.get("form", "")),
            input_sha256=str(data.get("sha256", "")),
            quality=Quality.from_dict(data["quality"]) if data.get("quality") else None,
        )
