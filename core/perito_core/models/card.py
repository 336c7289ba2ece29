"""The model card's parts, typed: metrics, calibration, training record and source.

What a trainer measured about a model travels in its manifest (`ModelManifest.metrics`,
`.calibration`, `.training`, `.source`), in a run folder's `card.json`
(`manifest.RunCard`) and, as JSON, in `GetModel` / `ListModels` answers and on the web page
(`manifest.ModelCard`). These models give every field the name it has always had in those
files, so every published `manifest.json` loads and dumps back to the same JSON.

Two rules make that hold:

- Every field is optional. A model imported with `perito models import` (ONNX / TorchScript
  made elsewhere) has no metrics, calibration or training record at all; a hand-published one
  may carry only an accuracy.
- A card dumps only the fields it holds (`_CardPart`): a field that was never set is left out,
  not written as `null`, while one written as `null` (an undefined ROC AUC) stays `null`.

`extra="allow"` on every part: a card written by a newer trainer (a field this code does not
know yet) or an older one (a field since dropped) must still load, serve and round-trip, not
make its model version unreadable; such fields are kept as they are (`model_extra`).
`unknown_fields` lists them, for writers that should never produce one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer


class _CardPart(BaseModel):
    """A part of a model card: frozen, open to unknown fields, dumping only what it holds."""

    # Open (`extra="allow"`) so that a card from a newer or older trainer still loads; see the
    # module docstring.
    model_config = ConfigDict(frozen=True, extra="allow")

    @model_serializer(mode="wrap")
    def _dump_what_it_holds(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        # Extra fields are among `model_fields_set` too.
        return {key: value for key, value in data.items() if key in self.model_fields_set}


class ClassScores(_CardPart):
    """One class's scores on the evaluated split (one-vs-rest, as scikit-learn's).

    `precision`, `recall` and `f1` are fractions in [0, 1] (0 for a class with no predictions
    or no examples); `support` is the class's number of images in the split.
    """

    precision: float
    recall: float
    f1: float
    support: int = Field(ge=0)


class AverageScores(_CardPart):
    """Precision, recall and F1 averaged over classes, each a fraction in [0, 1]: unweighted
    (`Metrics.macro_avg`) or weighted by support (`Metrics.weighted_avg`)."""

    precision: float
    recall: float
    f1: float


class ConfusionMatrix(_CardPart):
    """Image counts: row i is the true class `labels[i]`, column j the predicted `labels[j]`."""

    labels: list[str]
    matrix: list[list[int]]


class RocAuc(_CardPart):
    """Area under the ROC curve, each in [0, 1], `None` where a class has no positives or no
    negatives in the split.

    Two classes: `binary` (the second label positive). More: one-vs-rest `per_class` (in
    label order), their mean over defined classes (`ovr_macro`) and their support-weighted mean
    (`ovr_weighted`).
    """

    binary: float | None = None
    ovr_macro: float | None = None
    ovr_weighted: float | None = None
    per_class: list[float | None] | None = None


class Metrics(_CardPart):
    """How the published artifact did on held-out images (the trainer's test split in full).

    Empty for an imported model; a hand-published one may hold only some fields.
    """

    # Images evaluated (the split's size).
    images: int | None = Field(default=None, ge=0)
    # Top-1 accuracy, a fraction in [0, 1].
    accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    # By class name, in label order.
    per_class: dict[str, ClassScores] | None = None
    macro_avg: AverageScores | None = None
    weighted_avg: AverageScores | None = None
    confusion_matrix: ConfusionMatrix | None = None
    roc_auc: RocAuc | None = None
    # Expected calibration error of the served (calibrated) probabilities, in [0, 1]: 15
    # equal-width confidence bins, |accuracy - confidence| weighted by each bin's share.
    ece: float | None = Field(default=None, ge=0.0)
    # Which split these figures are of (the trainer's: `test`).
    split: str | None = None
    # Top-1 accuracy on the validation split, in [0, 1].
    val_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)


class ThresholdEvidence(_CardPart):
    """Why the recommended confidence threshold is what it is, measured on validation images.

    Predictions whose top-1 probability is at least `threshold` (a probability in [0, 1]) were
    `accuracy_above` right (a fraction) and were `coverage` of the images (a fraction); the
    trainer chose the lowest threshold reaching `target_accuracy` (the recipe's).
    """

    threshold: float
    coverage: float
    accuracy_above: float
    target_accuracy: float


class ReliabilityBin(_CardPart):
    """One bin of a reliability curve: `count` held-out images had a top-1 probability p in
    `lower < p <= upper`; their top-1 class was right for the share `accuracy`, and their
    mean p was `confidence` (both fractions in [0, 1], None for an empty bin)."""

    lower: float = Field(ge=0.0, le=1.0)
    upper: float = Field(ge=0.0, le=1.0)
    count: int = Field(ge=0)
    accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)


class Calibration(_CardPart):
    """How the served probabilities were calibrated (temperature scaling, Guo et al. 2017)."""

    # `temperature_scaling`, or `none` when the recipe turned it off.
    method: str | None = None
    # The served probabilities are softmax(logits / temperature); 1 is uncalibrated.
    temperature: float | None = Field(default=None, gt=0.0)
    # The split the temperature was fitted on (`val`).
    fitted_on: str | None = None
    # Expected calibration error on the test split before and after scaling, in [0, 1].
    ece_test_before: float | None = Field(default=None, ge=0.0)
    ece_test_after: float | None = Field(default=None, ge=0.0)
    # Mean negative log-likelihood on the validation split (nats per image), before and after.
    nll_val_before: float | None = Field(default=None, ge=0.0)
    nll_val_after: float | None = Field(default=None, ge=0.0)
    # The evidence behind `ModelManifest.confidence_threshold`; `None` (present) when the
    # recipe asked for a target accuracy that no threshold reached on validation.
    confidence_threshold: ThresholdEvidence | None = None
    # The served (calibrated) probabilities' reliability curve on the test split: 15
    # equal-width bins of top-1 probability, as for `ece_test_after`. Each answer's
    # `expected_accuracy` is read off it (`perito_core.models.provenance.CardFigures`).
    reliability: list[ReliabilityBin] | None = None


class QualityThresholds(_CardPart):
    """The photo-quality gate's thresholds (`perito_core.quality`): a photo is BLURRY under
    `min_sharpness`, UNDEREXPOSED over `max_dark_fraction` or under `min_brightness`,
    OVEREXPOSED over `max_bright_fraction` or over `max_brightness`, LOW_RESOLUTION when its
    shorter side is under `min_resolution` times the model's input side, UNIFORM under
    `min_contrast`. Each unset threshold is `perito_core.quality.DEFAULT_THRESHOLDS`'.

    Fitted by the trainer on the training images (`fitted_on` says which), set by
    `perito models import --min-sharpness ...`, or replaced per request.
    """

    # Variance of the Laplacian of the grey image at 256 pixels, grey levels squared.
    min_sharpness: float | None = Field(default=None, ge=0.0)
    # Shares of clipped dark (grey <= 8) and bright (grey >= 247) pixels, in [0, 1].
    max_dark_fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    max_bright_fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    # Mean grey level, 0-255.
    min_brightness: float | None = Field(default=None, ge=0.0, le=255.0)
    max_brightness: float | None = Field(default=None, ge=0.0, le=255.0)
    # The photo's shorter side over the model's input side.
    min_resolution: float | None = Field(default=None, ge=0.0)
    # Standard deviation of the grey levels, 0-255.
    min_contrast: float | None = Field(default=None, ge=0.0, le=255.0)
    # Where the thresholds came from: `train split, 1200 images` (fitted), `perito models
    # import` (set by its flags).
    fitted_on: str | None = None


class DriftReference(_CardPart):
    """The distributions live traffic is compared with to detect dataset shift
    (`perito_core.drift`; Rabanser et al., "Failing Loudly", NeurIPS 2019): the served
    (calibrated) probabilities of held-out images of the training distribution and the
    photo-quality measures of training images. Empty (no field set) for a version published
    without held-out images: its traffic is not monitored.

    Bounded: at most 64 softmax dimensions (`classes`, the most often predicted), at most 500
    values per distribution (sorted; its quantiles when there were more images), each rounded
    to 4 significant digits.
    """

    # Held-out images the probabilities are of, and which (`test split, 1200 images`).
    images: int | None = Field(default=None, ge=1)
    built_on: str | None = None
    # The labels of the softmax dimensions kept, most often predicted first.
    classes: list[str] = Field(default_factory=list)
    # Per class of `classes`: its probability's values (sorted), each in [0, 1].
    softmax: list[list[float]] = Field(default_factory=list)
    # Per class of `classes`: the share of images predicted as it; `predicted_other`: as any
    # class not kept. Fractions in [0, 1].
    predicted_class: list[float] = Field(default_factory=list)
    predicted_other: float | None = Field(default=None, ge=0.0, le=1.0)
    # The top-1 probability's values (sorted), each in [0, 1].
    confidence: list[float] = Field(default_factory=list)
    # By photo-quality measure (`sharpness`, `brightness`, ...: `perito_core.quality`), its
    # values (sorted) over `quality_images` training images; empty when none were measured.
    quality: dict[str, list[float]] = Field(default_factory=dict)
    quality_images: int | None = Field(default=None, ge=0)

    def check(self, labels: Sequence[str]) -> None:
        """Refuse a reference that does not fit a version whose labels are `labels` (an empty
        reference fits any): its `classes` must be distinct labels of the version, with one
        `softmax` distribution and one `predicted_class` share each, and no distribution
        empty.

        Raises:
            ValueError: what does not fit, naming the classes that are not labels.
        """
        if not self.classes:
            return
        missing = [c for c in self.classes if c not in set(labels)]
        if missing:
            raise ValueError(
                f"the drift reference's classes {missing} are not among the version's labels"
            )
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("the drift reference names a class twice")
        counts = {"softmax": len(self.softmax), "predicted_class": len(self.predicted_class)}
        for name, count in counts.items():
            if count != len(self.classes):
                raise ValueError(
                    f"the drift reference has {count} {name} entries for "
                    f"{len(self.classes)} classes"
                )
        if not self.confidence or not all(self.softmax):
            raise ValueError("the drift reference has an empty distribution")

    def summary(self) -> DriftReference:
        """The reference without its distributions, as `GetModel` / `ListModels` answers carry
        it (manifest.json keeps it whole): `images`, `built_on`, `classes`,
        `quality_images`, and `signals`, the drift signals it can test (`softmax`,
        `predicted_class`, `confidence`, then its photo-quality measures). Empty for an empty
        reference."""
        if not self.classes:
            return DriftReference()
        kept = {"images", "built_on", "classes", "quality_images"} & self.model_fields_set
        signals = ["softmax", "predicted_class", "confidence", *self.quality]
        return DriftReference.model_validate(
            {**{name: getattr(self, name) for name in kept}, "signals": signals}
        )


class UnreadableImage(_CardPart):
    """A data set file the trainer left out: its name (relative to the data root) and why."""

    image: str
    reason: str


class DatasetRecord(_CardPart):
    """The data a model was trained on, as the trainer found it."""

    classes: list[str]
    # sha256 over every used image's split, name, class and content hash: the same data (and
    # split) gives the same fingerprint.
    fingerprint_sha256: str
    # By split (`train`, `val`, `test`): `images` (the split's size) and each class's count.
    splits: dict[str, dict[str, int]] = Field(default_factory=dict)
    unreadable: list[UnreadableImage] = Field(default_factory=list)


class TrainingRecord(_CardPart):
    """How the model was trained. Empty for an imported model."""

    # The resolved training configuration (`perito_training.config.TrainConfig`, dumped as
    # JSON: `name`, `data`, `model`, `augment`, `optim`, `schedule`, `train`, `calibration`).
    # Its schema belongs to the trainer, which core does not import; `architecture` reads the
    # one field readers need.
    config: dict[str, Any] | None = None
    dataset: DatasetRecord | None = None
    # Epochs trained (early stopping may end a run before the recipe's `train.epochs`).
    epochs_run: int | None = Field(default=None, ge=0)
    # The epoch whose weights were kept (1-based).
    best_epoch: int | None = Field(default=None, ge=0)
    stopped_early: bool | None = None
    # Wall time of the training epochs, in seconds.
    seconds: float | None = Field(default=None, ge=0.0)

    @property
    def architecture(self) -> str | None:
        """The trained architecture's registered name (`config.model.architecture`)."""
        model = (self.config or {}).get("model")
        architecture = model.get("architecture") if isinstance(model, dict) else None
        return architecture if isinstance(architecture, str) else None


class Source(_CardPart):
    """Where the model came from: the code that trained it, or the file it was imported from."""

    # Package versions of the training environment.
    torch: str | None = None
    perito: str | None = None
    torchvision: str | None = None
    timm: str | None = None
    # The training code's git commit, and whether its checkout had uncommitted changes.
    git_commit: str | None = None
    git_dirty: bool | None = None
    # The file name given to `perito models import`.
    imported_from: str | None = None
    # The run folder's name (`perito publish RUN`).
    run: str | None = None
    # The tenant that published the version.
    published_by: str | None = None


def unknown_fields(model: BaseModel, path: str = "") -> list[str]:
    """The dotted paths of every field in `model` (and the card parts inside it) that its type
    does not declare: what a writer that knows the schema should never produce."""
    found = [f"{path}{name}" for name in model.model_extra or {}]
    for name in type(model).model_fields:
        found += _unknown_in(getattr(model, name), f"{path}{name}")
    return found


def _unknown_in(value: object, path: str) -> list[str]:
    if isinstance(value, BaseModel):
        return unknown_fields(value, f"{path}.")
    if isinstance(value, dict):
        return [hit for key, item in value.items() for hit in _unknown_in(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [hit for i, item in enumerate(value) for hit in _unknown_in(item, f"{path}[{i}]")]
    return []
