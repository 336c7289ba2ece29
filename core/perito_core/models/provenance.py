"""What an answer says about what produced it, and what the model card says about it.

Provenance (docs/trust.md#provenance): the sha256 of the input bytes, the model version, its
artifact's sha256 and the serving form's files with theirs. The artifact and form digests are
the manifest's, which the registry verified when the version loaded (`ArtifactIntegrityError`
otherwise), so they name exactly the bytes that answered; they are the same for every answer
of a version, so a bulk job records them once (`ServedVersion`, in the job's record) and each
item only its input's digest.

The card's figures (docs/trust.md#figures): each class's precision and recall on the card's
held-out split (`metrics.per_class`), and the accuracy at an answer's top-1 probability read
off the card's reliability curve (`calibration.reliability`).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from perito_core.digests import sha256_hex as sha256_hex
from perito_core.models.manifest import ModelManifest

# A reliability bin with fewer held-out images than this gives no `expected_accuracy`: with
# 20 images one mistake moves the figure by 5 points, and fewer say less than they seem to.
MIN_BIN_IMAGES = 20


@dataclass(frozen=True)
class ServedVersion:
    """What identifies a model version's answers: its files' digests (the artifact and each
    compiled form's files) and its recommended confidence threshold.

    Attributes:
        artifact_file: the artifact's file name (`model.pt`, `model.onnx`).
        artifact_sha256: its sha256 (hex), from the manifest.
        forms: compiled form name -> {file, its path in the version's folder
            (`forms/openvino-int8/model.xml`) -> sha256}.
        confidence_threshold: the manifest's recommended threshold, 0 if none.
    """

    artifact_file: str
    artifact_sha256: str
    forms: dict[str, dict[str, str]] = field(default_factory=dict)
    confidence_threshold: float = 0.0

    @classmethod
    def of(cls, manifest: ModelManifest) -> ServedVersion:
        return cls(
            manifest.artifact.file,
            manifest.artifact.sha256,
            {
                form.name: {f"forms/{form.name}/{f.file}": f.sha256 for f in form.files}
                for form in manifest.forms
            },
            manifest.threshold(),
        )

    def form_files(self, form: str) -> dict[str, str]:
        """{file -> sha256} of the form named `form`; the artifact for `torchscript-fp32`,
        an imported ONNX model's form, or any name the manifest does not list."""
        return self.forms.get(form) or {self.artifact_file: self.artifact_sha256}

    def to_json(self) -> str:
        """Compact JSON, for a job's record (about 150 bytes, and 100 per compiled form
        file)."""
        return json.dumps(
            {
                "file": self.artifact_file,
                "sha256": self.artifact_sha256,
                "forms": self.forms,
                "threshold": self.confidence_threshold,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str) -> ServedVersion | None:
        """`to_json`'s text back; None for "" (a job recorded before provenance)."""
        if not raw:
            return None
        data = json.loads(raw)
        return cls(
            data["file"], data["sha256"], data.get("forms") or {}, data.get("threshold") or 0.0
        )


def provenance_record(
    served: ServedVersion,
    *,
    input_sha256: str,
    model: str,
    model_version: str,
    form: str,
    confidence_threshold: float,
    request_id: str,
    quality_issues: Sequence[str] = (),
) -> dict[str, Any]:
    """One answer's provenance as `perito.v1.Provenance` has it, field for field (the keys
    its JSON mapping uses with proto field names): what results.jsonl writes, and what the
    server makes the message of (`Provenance(**record)`).

    Args:
        served: the version's file digests (`ServedVersion.of(manifest)`, or a job's record).
        input_sha256: sha256 (hex) of the image's bytes as received.
        model, model_version: the model and the concrete version that answered.
        form: the serving form that answered; its files' digests come from `served`.
        confidence_threshold: the threshold applied, 0 if none.
        request_id: the call's request id, or a bulk item's job id.
        quality_issues: the photo-quality issues found.
    """
    return {
        "input_sha256": input_sha256,
        "model": model,
        "model_version": model_version,
        "artifact_sha256": served.artifact_sha256,
        "form": form,
        "form_files": [
            {"file": file, "sha256": digest} for file, digest in served.form_files(form).items()
        ],
        "confidence_threshold": confidence_threshold,
        "request_id": request_id,
        "quality_issues": list(quality_issues),
    }


@dataclass(frozen=True)
class CardFigures:
    """What a version's model card says that an answer can carry: per-class precision and
    recall, and its reliability curve. Built once per version (`of`).

    Attributes:
        per_class: label -> (precision, recall), each in [0, 1]; empty when the card has none.
        lower_edges, upper_edges: each reliability bin's confidence edges, by ascending
            upper edge (a bin holds lower < p <= upper); empty when the card has no curve.
        accuracies: each bin's top-1 accuracy, None where it held fewer than
            `MIN_BIN_IMAGES` images.
    """

    per_class: dict[str, tuple[float, float]]
    lower_edges: list[float]
    upper_edges: list[float]
    accuracies: list[float | None]

    @classmethod
    def of(cls, manifest: ModelManifest) -> CardFigures:
        scores = manifest.metrics.per_class or {}
        bins = sorted(manifest.calibration.reliability or [], key=lambda b: b.upper)
        return cls(
            {label: (s.precision, s.recall) for label, s in scores.items()},
            [b.lower for b in bins],
            [b.upper for b in bins],
            [
                b.accuracy if b.count >= MIN_BIN_IMAGES and b.accuracy is not None else None
                for b in bins
            ],
        )

    def class_figures(self, label: str) -> tuple[float, float] | None:
        """(precision, recall) of class `label` on the card's held-out split, or None."""
        return self.per_class.get(label)

    def expected_accuracy(self, probability: float) -> float | None:
        """The held-out top-1 accuracy in the reliability bin holding a top-1 `probability`
        in [0, 1]; None when the card has no curve, the bin held fewer than
        `MIN_BIN_IMAGES` images, or `probability` lies outside every bin."""
        if not self.upper_edges:
            return None
        index = bisect.bisect_left(self.upper_edges, probability)
        if index == len(self.upper_edges) or probability < self.lower_edges[index]:
            return None
        return self.accuracies[index]
