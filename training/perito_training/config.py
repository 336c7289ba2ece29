"""The training configuration: one YAML file, overridable from the command line.

A recipe (`training/recipes/*.yaml`) is a `TrainConfig`; `--set optim.lr=0.01` overrides any
field by its dotted path. The resolved configuration is saved with the run (`config.yaml`) and
goes into the model card, so every published version says exactly how it was trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from perito_core.imaging import Interpolation, ResizeMode


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    """Where the images are and how they are labelled and split.

    kinds:
      folders        root/<class>/*.jpg (or root/{train,val,test}/<class>/*.jpg: given splits;
                     split folder names in any case, TRAIN/ and TEST/ too)
      csv            a CSV with `path` and `label` columns (optional `split`); paths relative to it
      suffix         the label is the file name's last letter(s): 00001P.jpg -> suffixes["P"]
      fashion_mnist  the idx files of `apt-get install dataset-fashion-mnist`
    """

    kind: Literal["folders", "csv", "suffix", "fashion_mnist"]
    root: Path | None = None
    csv: Path | None = None
    path_column: str = "path"
    label_column: str = "label"
    suffixes: dict[str, str] = Field(default_factory=lambda: {"P": "positive", "N": "negative"})
    # Class names in output order; by default sorted (folders, csv) or the suffix map's order.
    classes: list[str] | None = None
    # Give folder names or CSV labels readable class names: {O: organic, R: recyclable}.
    rename: dict[str, str] = Field(default_factory=dict)
    # Fractions held out when the data has no given splits (stratified, seeded).
    val_fraction: float = Field(default=0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.15, ge=0.0, lt=1.0)
    split_seed: int = 0
    # Use at most this many images per class and split (quick runs, smoke tests).
    limit_per_class: int | None = Field(default=None, gt=0)
    # Keep decoded, resized images in memory: "auto" does when they fit in 4 GiB.
    cache: Literal["auto", "always", "never"] = "auto"

    @model_validator(mode="after")
    def _needs_source(self) -> DataConfig:
        if self.kind == "csv" and self.csv is None:
            raise ValueError("data.kind csv needs data.csv (the manifest's path)")
        if self.kind in ("folders", "suffix") and self.root is None:
            raise ValueError(f"data.kind {self.kind} needs data.root (the image folder)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave images to train on")
        return self


class ModelConfig(_Section):
    architecture: str
    input_size: int = Field(default=224, gt=0, le=1024)
    # Shorter side before the centre crop (center_crop); default input_size / 0.875.
    resize_size: int | None = None
    resize_mode: ResizeMode = "center_crop"
    interpolation: Interpolation = "bilinear"
    # A torchvision-format state dict to start from (ResNet-18 fine-tuning).
    weights: Path | None = None
    # resnet8: the channels of its residual stages (each next one at half the resolution);
    # null: 32, 64, 128. vgg7: the channels of its four stages (1, 2, 2 and 1 conv layers);
    # null: 32, 64, 128, 256.
    widths: tuple[int, ...] | None = Field(default=None, min_length=1)
    # Test-time flip (cnn4, cnn5, resnet8, vgg7): the network averages its logits for each image and
    # its mirror image in eval mode (twice the inference cost); evaluation and serving see it.
    test_time_flip: bool = False
    # EfficientNet-Lite0: start from the ImageNet weights that ship with the package.
    pretrained: bool = True
    dropout: float = Field(default=0.5, ge=0.0, lt=1.0)
    # Transfer learning: train only the new head at first, then everything.
    freeze: Literal["none", "backbone"] = "none"
    unfreeze_at_epoch: int | None = Field(default=None, ge=1)
    # Learning-rate factor for the pretrained layers once they train.
    backbone_lr_scale: float = Field(default=1.0, gt=0.0)

    @model_validator(mode="after")
    def _widths_fit(self) -> ModelConfig:
        if self.widths is None:
            return self
        if any(width < 1 for width in self.widths):
            raise ValueError(f"model.widths must be positive channel counts, not {self.widths}")
        if self.architecture == "vgg7" and len(self.widths) != 4:
            raise ValueError(f"vgg7 takes 4 model.widths (one per stage), not {self.widths}")
        return self

    def resolved_resize_size(self) -> int:
        if self.resize_mode == "squash":
            return self.input_size
        return self.resize_size or round(self.input_size / 0.875)


class AugmentConfig(_Section):
    """Applied to training images only; validation and test see what serving sees."""

    hflip: bool = True
    vflip: bool = False
    rotation_degrees: float = Field(default=0.0, ge=0.0, le=180.0)
    # Brightness, contrast and saturation jitter (0: off).
    color_jitter: float = Field(default=0.0, ge=0.0, le=1.0)
    hue_jitter: float = Field(default=0.0, ge=0.0, le=0.5)
    # Random resized crop: the scale range of the crop's area (null: off).
    crop_scale: tuple[float, float] | None = None
    # Random translation by up to this many pixels (zero padding, as for small images).
    translate_pixels: int = Field(default=0, ge=0)
    # Random erasing (Zhong et al.): the probability that a random rectangle of 2-33% of the
    # image is blacked out (0: off).
    random_erasing: float = Field(default=0.0, ge=0.0, le=1.0)


class OptimConfig(_Section):
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(default=1e-3, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)


class ScheduleConfig(_Section):
    name: Literal["none", "step", "cosine", "onecycle"] = "cosine"
    step_size: int = Field(default=10, ge=1)
    gamma: float = Field(default=0.1, gt=0.0)
    # Linear warm-up (cosine and step), in epochs.
    warmup_epochs: int = Field(default=0, ge=0)


class TrainSection(_Section):
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)
    eval_batch_size: int = Field(default=256, ge=1)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    # The validation measure that picks the best epoch and drives early stopping.
    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    # Stop when `monitor` has not improved for this many epochs (null: never).
    early_stopping_patience: int | None = Field(default=None, ge=1)
    # Wall-clock limit on training, in minutes (null: none), like PyTorch Lightning's
    # `max_time`. Training stops at whichever comes first, `epochs` or this time, and the
    # schedules run on the further of the two (the steps taken, or the share of this time used
    # as if it lasted `epochs` epochs), so one-cycle and cosine reach their last learning rate
    # where training stops, on a fast machine or a slow one (mid-epoch if need be). Data
    # preparation, the final evaluation, calibration and export come on top (about a minute
    # for Fashion-MNIST).
    max_minutes: float | None = Field(default=None, gt=0.0)
    # Mixed precision (float16 autocast + gradient scaling); used on CUDA only.
    amp: bool = True
    # NHWC memory layout for convolutions: faster with oneDNN on CPUs and tensor cores on GPUs.
    channels_last: bool = True
    seed: int = 0
    device: str = "auto"
    num_workers: int = Field(default=0, ge=0)
    # CPU threads for torch (null: torch's default).
    threads: int | None = Field(default=None, ge=1)


class CalibrationConfig(_Section):
    # Fit a temperature on validation logits; it goes into the exported module.
    temperature_scaling: bool = True
    # The confidence threshold published with the model is the lowest top-1 probability at
    # which validation predictions were at least this accurate (`uncertain` below it).
    target_accuracy: float | None = Field(default=0.95, gt=0.0, le=1.0)


class TrainConfig(_Section):
    """Everything one training run needs; see `training/recipes/` for complete examples."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    description: str = ""
    data: DataConfig
    model: ModelConfig
    augment: AugmentConfig = AugmentConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainSection = TrainSection()
    calibration: CalibrationConfig = CalibrationConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ConfigError(ValueError):
    """The configuration file or an override is wrong; the message says where."""


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=value` to a nested dict; the value is parsed as YAML (1e-3, true, [1, 2])."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {assignment!r} is not KEY=VALUE (e.g. optim.lr=0.01)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML: {exc}") from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(
    path: Path | None, overrides: tuple[str, ...] | list[str] = (), base_dir: Path | None = None
) -> TrainConfig:
    """Read a YAML config, apply `KEY=VALUE` overrides and validate.

    Relative data and weights paths are taken relative to the config file's folder (or
    `base_dir`), so a recipe works from any working directory.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (data, model, ...)")
        raw = loaded
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        config = TrainConfig.model_validate(raw)
    except ValidationError as exc:
        # A field an override set is the override's fault, not the file's.
        overridden = {assignment.partition("=")[0].strip() for assignment in overrides}
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "config"
            where = f"--set {field}" if field in overridden else field
            problems.append(f"{where}: {error['msg']}{_did_you_mean(error['loc'])}")
        source = f" {path}" if path else ""
        if all(problem.startswith("--set ") for problem in problems):
            source = ""
        raise ConfigError(f"invalid training config{source}: {'; '.join(problems)}") from None
    return _resolve_paths(config, base_dir or (path.parent if path else Path.cwd()))


def _did_you_mean(loc: tuple[str | int, ...]) -> str:
    """`" (did you mean train.epochs?)"` for a misspelt field at `loc`, else ""."""
    import difflib

    model: type[BaseModel] = TrainConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    if str(loc[-1]) in model.model_fields:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?)" if close else ""


def _resolve_paths(config: TrainConfig, base: Path) -> TrainConfig:
    def resolve(value: Path | None) -> Path | None:
        if value is None:
            return None
        expanded = value.expanduser()
        return expanded if expanded.is_absolute() else (base / expanded).resolve()

    data = config.data.model_copy(
        update={"root": resolve(config.data.root), "csv": resolve(config.data.csv)}
    )
    model = config.model.model_copy(update={"weights": resolve(config.model.weights)})
    return config.model_copy(update={"data": data, "model": model})
