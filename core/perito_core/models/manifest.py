"""The model artifact's manifest: the contract that travels with the weights.

`{registry}/models/{name}/{version}/manifest.json` says how to feed the module (`input`), what
its outputs mean (`labels`), how to verify it (`artifact.sha256`), and carries the model card
(metrics, calibration, training data fingerprint, training config). An imported ONNX model
(`artifact.format == "onnx"`) also carries its tensor contract (`tensor`): the layout, dtype,
scaling, mean / std and channel order its graph expects, and what its output means.

The card's parts are typed in `perito_core.models.card`; `ModelCard` is what a person reads
of a version (`ModelManifest.card()`, the card of `GetModel` answers and of the web page),
`RunCard` what a training run writes to its `card.json` and `perito publish` turns into a
manifest.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from perito_core.digests import sha256_file
from perito_core.imaging import InputSpec, Interpolation, ResizeMode

# The card's parts, re-exported: the manifest's fields are of these types.
from perito_core.models.card import (
    Calibration,
    DriftReference,
    Metrics,
    QualityThresholds,
    Source,
    TrainingRecord,
)

__all__ = [
    "ARTIFACT_FILES",
    "MANIFEST_SCHEMA_VERSION",
    "Artifact",
    "Calibration",
    "CompiledForm",
    "DriftReference",
    "FormFile",
    "InputContract",
    "Metrics",
    "ModelCard",
    "ModelIdentity",
    "ModelManifest",
    "RunCard",
    "Source",
    "TensorContract",
    "TrainingRecord",
    "sha256_file",
]

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


ArtifactFormat = Literal["torchscript", "onnx"]
# The reference file's name in a version's folder, by format.
ARTIFACT_FILES: dict[str, str] = {"torchscript": "model.pt", "onnx": "model.onnx"}


class Artifact(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # A plain file name, checked when a manifest is written and when one is read: no path
    # separators, no leading dot (so no `..`), nothing a stored manifest could use to make a
    # reader fetch or write outside the version's folder.
    file: str = Field("model.pt", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    # `torchscript`: model.pt, uint8 NCHW RGB in, probabilities out, normalising inside.
    # `onnx`: model.onnx, fed and read as the manifest's `tensor` contract says (ONNX Runtime).
    format: ArtifactFormat = "torchscript"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)


Layout = Literal["NCHW", "NHWC"]
TensorDtype = Literal["float32", "float16", "uint8"]
ChannelOrder = Literal["RGB", "BGR"]
OutputKind = Literal["probabilities", "logits", "sigmoid"]


class TensorContract(BaseModel):
    """How the runtime feeds a graph that does not normalise inside, and reads its output.

    The shared decode and resize (`perito_core.imaging.load_model_input`) give every model the
    same uint8 RGB image at the input size; for an ONNX model the runtime then computes, per
    pixel and channel, `(value * scale - mean[c]) / std[c]` in float32 after reordering the
    channels to `channel_order` (so `mean` and `std` are in that order too), lays the batch out
    as `layout` and casts it to `dtype`. Keras' `rescale=1/255` is `scale=1/255` with the
    default mean 0 and std 1; torchvision's is `scale=1/255` with the ImageNet mean and std;
    Keras' Caffe-style `preprocess_input` is `channel_order=BGR`, `scale=1`, `mean=(103.939,
    116.779, 123.68)`.

    `output`: `probabilities` (N, classes) summing to 1; `logits` (N, classes), softmaxed by
    the runtime; `sigmoid`, one unit (N, 1) giving the second label's probability p, served as
    `[1 - p, p]` for exactly two labels.

    `output_name`: the graph output that gives those scores, by its name in the graph; it is
    the only output ONNX Runtime is asked for. A graph with several outputs (an auxiliary head,
    or a converter's `[label, probabilities]`) is imported only with it named
    (`perito models import --output-name`); an import records it for a one-output graph too.
    None, in a manifest written before it was recorded: the graph's only output (the first,
    with a warning, for a graph that has several).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    layout: Layout
    dtype: TensorDtype = "float32"
    scale: float = Field(gt=0.0, le=1e6)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: ChannelOrder = "RGB"
    output: OutputKind = "probabilities"
    output_name: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("std")
    @classmethod
    def _std_positive(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(value <= 0 for value in std):
            raise ValueError(f"std must be positive in every channel, not {std}")
        return std

    @model_validator(mode="after")
    def _uint8_is_unscaled(self) -> TensorContract:
        """A uint8 input carries the pixels as they are: scaling it would have to round."""
        unscaled = self.scale == 1.0 and self.mean == (0.0,) * 3 and self.std == (1.0,) * 3
        if self.dtype == "uint8" and not unscaled:
            raise ValueError(
                "dtype uint8 takes the pixels as they are: scale must be 1, mean 0 and std 1 "
                f"(got scale {self.scale}, mean {self.mean}, std {self.std})"
            )
        return self

    @model_serializer(mode="wrap")
    def _no_output_name_as_before(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Without `output_name`, the JSON a manifest had before the field: it dumps back the
        same."""
        data: dict[str, Any] = handler(self)
        if data.get("output_name", "") is None:
            del data["output_name"]
        return data

    @property
    def precision(self) -> str:
        """The form's precision, as in form names: `fp16` for a float16 graph, else `fp32`."""
        return "fp16" if self.dtype == "float16" else "fp32"


Precision = Literal["fp32", "bf16", "int8"]
# The precisions a compiled form can have (`--forms`, `gate.build_forms`).
FORM_PRECISIONS: tuple[str, ...] = get_args(Precision)
# What serves (`PERITO_PRECISION`, a request's `precision`): `auto` is the fastest verified
# form, `torchscript` is model.pt itself.
PrecisionChoice = Literal["auto", "fp32", "bf16", "int8", "torchscript"]
PRECISIONS: tuple[str, ...] = get_args(PrecisionChoice)
# The publish gate's defaults: top-1 agreement with model.pt on held-out images,
# and the largest test-accuracy drop, as a fraction (0.003: 0.3 points).
MIN_AGREEMENT = 0.99
MAX_ACCURACY_DROP = 0.003
# A gate on fewer held-out images than this is reported as weak: 100% agreement on 200
# images only shows the true agreement is above about 98.1% (Wilson 95% lower bound).
MIN_GATE_IMAGES = 200


class FormFile(BaseModel):
    """One file of a compiled form, verified like `model.pt` before it loads."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)

    @field_validator("file")
    @classmethod
    def _inside_the_form(cls, value: str) -> str:
        """A relative path that stays inside the form's folder: no `.` / `..` / empty parts."""
        if any(part in ("", ".", "..") for part in value.split("/")):
            raise ValueError(f"{value!r}: '.', '..' and empty path parts are not allowed")
        return value


class CompiledForm(BaseModel):
    """A compiled form of the same network beside `model.pt`, with the evidence it is the same.

    `model.pt` stays the reference: every form was run against it on held-out images at
    publish, and only forms that passed the accuracy gate (`perito_core.models.gate`) are
    listed. Engines: `openvino` (an IR) and `onnxruntime` (an ONNX graph, uint8 NCHW in,
    probabilities out). Neither file holds ISA-specific code: oneDNN or ONNX Runtime's MLAS
    picks kernels when the form is loaded, so a form built on one CPU loads on any x86-64 CPU;
    `requires` names the CPU flags without which the form would not run at its precision
    (BF16), and a CPU that lacks them skips the form with a logged reason.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9]+-(fp32|bf16|int8)$")
    engine: Literal["openvino", "onnxruntime"]
    engine_version: str
    precision: Precision
    files: list[FormFile] = Field(min_length=1)
    # Any one of these CPU flags is enough (empty: runs everywhere).
    requires: list[str] = Field(default_factory=list)
    # Evidence measured at publish against model.pt, on `evaluated_on` held-out images.
    agreement: float = Field(ge=0.0, le=1.0)
    max_abs_diff: float = Field(ge=0.0)
    evaluated_on: str = ""
    images: int = Field(ge=0)
    accuracy: float | None = None
    reference_accuracy: float | None = None
    ece: float | None = None
    calibration_images: int = Field(0, ge=0)
    built_on: str = ""
    # How INT8 was made: `post-training` (NNCF) or `accuracy-control` (NNCF reverted the most
    # sensitive operations to FP32 until it agreed with FP32 on validation images).
    quantization: str = ""
    # Calibration re-fitted on this form's own outputs when labelled data was given (Guo et al.
    # 2017): it serves `softmax(log(p) / temperature)` of its probabilities p, and
    # `confidence_threshold` (when set) replaces the manifest's for `uncertain`. `ece` is then
    # the re-fitted form's; `ece_before_fit` the form's as compiled.
    temperature: float = Field(1.0, gt=0.0)
    confidence_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    calibration_fitted_on: str = ""
    ece_before_fit: float | None = None
    # 95% intervals of the evidence (`perito_core.stats`); None in manifests written before
    # they were recorded. `agreement_lower`: the Wilson lower bound of `agreement` on `images`.
    # `accuracy_change_lower`/`_upper`: with labels, the Newcombe (1998, paired) interval of
    # `accuracy - reference_accuracy`, both measured on the same images.
    agreement_lower: float | None = Field(default=None, ge=0.0, le=1.0)
    accuracy_change_lower: float | None = Field(default=None, ge=-1.0, le=1.0)
    accuracy_change_upper: float | None = Field(default=None, ge=-1.0, le=1.0)
    # Why the gate's evidence is weak (fewer than MIN_GATE_IMAGES held-out images); empty: not.
    gate_warning: str = ""
    # Mixed precision: the convolutions and matrix products (the IR's or graph's names) an INT8
    # form keeps in FP32, the quantizer's ignored scope or accuracy control's reverted layers;
    # empty for FP32 and BF16 forms or when every layer is quantized.
    fp32_layers: list[str] = Field(default_factory=list)
    # The held-out images' forward time of the same engine's FP32 form over this form's,
    # measured once at the gate (batches of 32, the build machine); None: not measured.
    speedup: float | None = Field(default=None, gt=0.0)

    def evidence(self) -> str:
        """The gate's figures in one line, as `perito publish` and `perito models import`
        print them: agreement on how many images with its 95% lower bound, accuracy and its
        change with the interval when labels were known, and the weak-gate warning."""
        line = f"top-1 agreement {self.agreement:.2%} on {self.images} images"
        if self.agreement_lower is not None:
            line += f" (95% lower bound {self.agreement_lower:.2%})"
        if self.accuracy is not None:
            line += f", accuracy {self.accuracy:.4f}"
            if self.reference_accuracy is not None:
                line += f" (reference {self.reference_accuracy:.4f}"
                if (
                    self.accuracy_change_lower is not None
                    and self.accuracy_change_upper is not None
                ):
                    change = 100 * (self.accuracy - self.reference_accuracy)
                    line += (
                        f", change {change:+.2f} points, 95% interval "
                        f"{100 * self.accuracy_change_lower:+.2f} to "
                        f"{100 * self.accuracy_change_upper:+.2f}"
                    )
                line += ")"
        if self.gate_warning:
            line += f"; {self.gate_warning}"
        return line


class ModelCard(BaseModel):
    """What a person reads to judge one model version: the manifest but its identity
    (`ModelIdentity`), field for field (`ModelManifest.card()`), the drift reference
    summarized (`DriftReference.summary`).

    Its JSON (`model_dump(mode="json")`) is the card of `GetModel` / `ListModels` answers, so
    the SDK's `ModelVersion.card` and the web page read the same keys as `manifest.json`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    labels: list[str] = Field(min_length=2)
    input: InputContract
    artifact: Artifact
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    description: str = ""
    # A top-1 probability under this marks a prediction `uncertain` unless the caller says
    # otherwise; chosen from validation data by the trainer.
    confidence_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    # The model card's parts (`perito_core.models.card`); empty for an imported model.
    metrics: Metrics = Field(default_factory=Metrics)
    calibration: Calibration = Field(default_factory=Calibration)
    training: TrainingRecord = Field(default_factory=TrainingRecord)
    source: Source = Field(default_factory=Source)
    # The photo-quality gate's thresholds (`perito_core.quality`); empty: the defaults.
    quality: QualityThresholds = Field(default_factory=QualityThresholds)
    # The reference distributions of drift detection (`perito_core.drift`); empty: none.
    drift: DriftReference = Field(default_factory=DriftReference)
    # Compiled forms that passed the accuracy gate, and why the others were not published.
    forms: list[CompiledForm] = Field(default_factory=list)
    skipped_forms: dict[str, str] = Field(default_factory=dict)
    # How an ONNX artifact is fed and read (required for `artifact.format == "onnx"`, absent
    # otherwise: TorchScript takes uint8 NCHW RGB and returns probabilities).
    tensor: TensorContract | None = None

    @model_serializer(mode="wrap")
    def _no_quality_as_before(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_empty_parts(self.quality, self.drift, handler(self))


class ModelIdentity(BaseModel):
    """Which model version a manifest describes, and in which schema."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = MANIFEST_SCHEMA_VERSION
    name: str
    version: str


# Its identity, then its card: pydantic orders fields from the last base to the first, so
# manifest.json starts with `schema_version`, `name` and `version`.
class ModelManifest(ModelCard, ModelIdentity):
    """Everything known about one immutable model version."""

    @model_validator(mode="after")
    def _tensor_contract_matches_format(self) -> ModelManifest:
        onnx = self.artifact.format == "onnx"
        if onnx and self.tensor is None:
            raise ValueError("tensor: an ONNX artifact needs its tensor contract")
        if not onnx and self.tensor is not None:
            raise ValueError(f"tensor: only ONNX artifacts take one, not {self.artifact.format}")
        if self.tensor is not None and self.tensor.output == "sigmoid" and len(self.labels) != 2:
            raise ValueError(
                f"tensor.output: a sigmoid unit serves exactly two labels, not {len(self.labels)}"
            )
        return self

    def form(self, name: str) -> CompiledForm | None:
        return next((form for form in self.forms if form.name == name), None)

    def served_by(self, form: CompiledForm) -> ModelManifest:
        """This manifest as `form` serves it: with the form's own `uncertain` threshold (re-fitted
        at publish) in place of the version's, where it has one."""
        if form.confidence_threshold is None:
            return self
        return self.model_copy(update={"confidence_threshold": form.confidence_threshold})

    def threshold(self, requested: float = 0.0) -> float:
        """The top-1 probability under which an answer is `uncertain`: the caller's
        `requested` one, else this model's recommended one, else 0 (never uncertain)."""
        return requested or self.confidence_threshold or 0.0

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: list[str]) -> list[str]:
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be unique")
        if any(not label.strip() for label in labels):
            raise ValueError("labels must not be blank")
        return labels

    def card(self) -> ModelCard:
        """The parts of the manifest a person reads to judge the model, as `GetModel` /
        `ListModels` answers carry them: the drift reference summarized
        (`DriftReference.summary`: its size, classes and signals, not its distributions, which
        only manifest.json keeps, some 360 KB a version)."""
        parts = {name: getattr(self, name) for name in ModelCard.model_fields}
        parts["drift"] = self.drift.summary()
        return ModelCard.model_validate(parts)


class RunCard(BaseModel):
    """A training run's model card (`card.json` in the run folder): what the trainer measured,
    and what `perito publish` puts into the version's manifest.

    Open to unknown fields (`extra="allow"`), like the card's parts, so that a run folder
    written by a newer or older trainer can still be read, compared and published.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str
    description: str = ""
    labels: list[str] = Field(min_length=2)
    input: InputContract
    # The recommended threshold (`ModelManifest.confidence_threshold`), a probability in
    # [0, 1]; the evidence behind it is `calibration.confidence_threshold`.
    confidence_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    metrics: Metrics = Field(default_factory=Metrics)
    calibration: Calibration = Field(default_factory=Calibration)
    training: TrainingRecord = Field(default_factory=TrainingRecord)
    source: Source = Field(default_factory=Source)
    # The photo-quality thresholds fitted on the training images (`quality.fit_thresholds`).
    quality: QualityThresholds = Field(default_factory=QualityThresholds)
    # The drift reference from the test split (`perito_core.drift.build_reference`).
    drift: DriftReference = Field(default_factory=DriftReference)

    @model_serializer(mode="wrap")
    def _no_quality_as_before(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_empty_parts(self.quality, self.drift, handler(self))


def _without_empty_parts(
    quality: QualityThresholds, drift: DriftReference, data: dict[str, Any]
) -> dict[str, Any]:
    """A card's JSON without its `quality` part when that holds no threshold, nor its `drift`
    part when that holds no reference: a card written before the quality gate or drift
    detection dumps back the same."""
    if not quality.model_fields_set:
        data.pop("quality", None)
    if not drift.model_fields_set:
        data.pop("drift", None)
    return data
