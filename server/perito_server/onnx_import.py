"""The ONNX half of `perito models import`: the tensor-contract flags and their checks.

An ONNX file (`.onnx`) is imported with the contract its graph was trained with: layout,
dtype, scale, mean / std, channel order, output kind and the output that serves
(`perito_core.models.manifest.TensorContract`). The file is opened by ONNX Runtime and run
against a draft manifest before anything is written, so a contract that contradicts the graph
(an NCHW declaration for an NHWC input, another input size, another dtype, an output that
cannot be the declared kind, a graph of several outputs with none named by `--output-name`,
a name that is not an output) is refused with the field named.

Also the photo-quality flags of the same command (`--min-sharpness` ...), for any imported
file: the card's `quality` thresholds (`perito_core.quality`), which nothing fits for a model
trained elsewhere.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from perito_core.models.manifest import InputContract, TensorContract

F = TypeVar("F", bound=Callable[..., Any])

ONNX_SUFFIX = ".onnx"


def is_onnx(model_file: Path) -> bool:
    """Whether `perito models import` treats the file as ONNX (by its `.onnx` suffix)."""
    return model_file.suffix.lower() == ONNX_SUFFIX


def _number(text: str, flag: str) -> float:
    """A float, or a fraction like `1/255`."""
    try:
        if "/" in text:
            top, bottom = text.split("/", 1)
            return float(top) / float(bottom)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise click.BadParameter(f"{text!r} is not a number", param_hint=flag) from None


def _triple(text: str, flag: str) -> tuple[float, float, float]:
    values = [_number(part.strip(), flag) for part in text.split(",") if part.strip()]
    if len(values) == 1:
        return (values[0],) * 3
    if len(values) != 3:
        raise click.BadParameter(
            f"{text!r}: give one value or three (one per channel)", param_hint=flag
        )
    return (values[0], values[1], values[2])


@dataclass(frozen=True)
class _Flag:
    """One tensor-contract flag: as a user types it, its help, the values it may take (any
    when empty), and how its text becomes the `TensorContract` field named by its key in
    `CONTRACT_FLAGS`."""

    flag: str
    help: str
    parse: Callable[[str, str], Any]
    choices: tuple[str, ...] = ()


def _upper(text: str, flag: str) -> str:
    return text.upper()


def _lower(text: str, flag: str) -> str:
    return text.lower()


def _as_given(text: str, flag: str) -> str:
    return text


# The flags by parameter name, which is the `TensorContract` field each gives, in the order
# `--help` lists them.
CONTRACT_FLAGS = {
    "layout": _Flag(
        "--layout",
        "ONNX: the input tensor's layout (required for .onnx; Keras: NHWC).",
        _upper,
        ("NCHW", "NHWC"),
    ),
    "dtype": _Flag(
        "--dtype",
        "ONNX: the input tensor's type (default float32).",
        _lower,
        ("float32", "float16", "uint8"),
    ),
    "scale": _Flag(
        "--scale",
        "ONNX: pixels (0-255) are multiplied by this first, e.g. 1/255 or 1 (required for .onnx).",
        _number,
    ),
    "mean": _Flag(
        "--mean",
        "ONNX: subtracted after scaling, per channel in the model's channel order, "
        "e.g. 0.485,0.456,0.406 (default 0).",
        _triple,
    ),
    "std": _Flag(
        "--std",
        "ONNX: divided by after the mean, per channel, e.g. 0.229,0.224,0.225 (default 1).",
        _triple,
    ),
    "channel_order": _Flag(
        "--channel-order",
        "ONNX: the channel order the graph takes (default RGB; Caffe-style: BGR).",
        _upper,
        ("RGB", "BGR"),
    ),
    "output": _Flag(
        "--output",
        "ONNX: what the graph returns: probabilities (default); logits (softmaxed when "
        "served); or sigmoid, one unit for two labels, served as [1-p, p].",
        _lower,
        ("probabilities", "logits", "sigmoid"),
    ),
    "output_name": _Flag(
        "--output-name",
        "ONNX: the graph output that gives the class scores, by name (required for a graph "
        "with several outputs, e.g. probabilities for a converter's [label, probabilities]).",
        _as_given,
    ),
}


def contract_options(command: F) -> F:
    """The ONNX tensor-contract options of `perito models import`."""
    for name, flag in reversed(CONTRACT_FLAGS.items()):
        choice = click.Choice(flag.choices, case_sensitive=False) if flag.choices else None
        command = click.option(flag.flag, name, type=choice, help=flag.help)(command)
    return command


# The photo-quality flags by parameter name, which is the `QualityThresholds` field each sets:
# (flag, upper bound, help).
QUALITY_FLAGS: dict[str, tuple[str, float | None, str]] = {
    "min_sharpness": (
        "--min-sharpness",
        None,
        "Photo quality: BLURRY under this sharpness (variance of the Laplacian of the grey "
        "photo at 256 pixels; default 15).",
    ),
    "max_dark_fraction": (
        "--max-dark-fraction",
        1.0,
        "Photo quality: UNDEREXPOSED over this share of clipped dark pixels (default 0.6).",
    ),
    "max_bright_fraction": (
        "--max-bright-fraction",
        1.0,
        "Photo quality: OVEREXPOSED over this share of clipped bright pixels (default 0.6).",
    ),
    "min_brightness": (
        "--min-brightness",
        255.0,
        "Photo quality: UNDEREXPOSED under this mean grey level, 0-255 (default 25).",
    ),
    "max_brightness": (
        "--max-brightness",
        255.0,
        "Photo quality: OVEREXPOSED over this mean grey level, 0-255 (default 235).",
    ),
    "min_resolution": (
        "--min-resolution",
        None,
        "Photo quality: LOW_RESOLUTION when the shorter side is under this many times the "
        "input size (default 0.5).",
    ),
    "min_contrast": (
        "--min-contrast",
        255.0,
        "Photo quality: UNIFORM under this standard deviation of the grey levels (default 6).",
    ),
}


def quality_options(command: F) -> F:
    """The photo-quality options of `perito models import` (docs/trust.md#quality)."""
    for name, (flag, upper, text) in reversed(QUALITY_FLAGS.items()):
        kind = click.FloatRange(min=0.0, max=upper)
        command = click.option(flag, name, type=kind, help=text)(command)
    return command


def quality_thresholds(flags: dict[str, Any]) -> dict[str, Any]:
    """Take the photo-quality flags out of `flags` (the command's other options): the card's
    `quality` part they set (`fitted_on` naming the command), or {} (the defaults) when none
    was given."""
    given = {name: flags.pop(name) for name in QUALITY_FLAGS if name in flags}
    thresholds = {name: value for name, value in given.items() if value is not None}
    return {**thresholds, "fitted_on": "perito models import"} if thresholds else {}


def tensor_contract(model_file: Path, flags: dict[str, Any]) -> TensorContract | None:
    """The tensor contract the flags declare for an ONNX file; None for a TorchScript file.

    Raises:
        click.UsageError: contract flags for a TorchScript file, or a required one missing.
        click.BadParameter: a value that is not a number or not three of them.
        click.UsageError: values the contract refuses (a non-positive std, a scaled uint8
            input), naming the flag.
    """
    given = {name: value for name, value in flags.items() if value is not None}
    if not is_onnx(model_file):
        if given:
            names = ", ".join(CONTRACT_FLAGS[name].flag for name in given)
            raise click.UsageError(
                f"{names}: these describe an ONNX file's input; a TorchScript file takes "
                "uint8 RGB and normalises inside"
            )
        return None
    missing = [CONTRACT_FLAGS[name].flag for name in ("layout", "scale") if name not in given]
    if missing:
        raise click.UsageError(
            f"an ONNX model needs its input contract: {' and '.join(missing)} "
            "(e.g. --layout NHWC --scale 1/255 for a Keras model with Rescaling(1/255))"
        )
    contract: dict[str, Any] = {}
    for name, text in given.items():
        flag = CONTRACT_FLAGS[name]
        contract[name] = flag.parse(text, flag.flag)
    try:
        return TensorContract(**contract)
    except ValidationError as error:
        problems = []
        for problem in error.errors():
            field = str(problem["loc"][0]) if problem["loc"] else ""
            message = str(problem["msg"]).removeprefix("Value error, ")
            named = CONTRACT_FLAGS.get(field)
            problems.append(f"{named.flag}: {message}" if named else message)
        raise click.UsageError("; ".join(problems)) from None


def check_onnx_loads(
    model_file: Path, name: str, labels: list[str], contract: InputContract, tensor: TensorContract
) -> TensorContract:
    """Open and run the ONNX file against a draft manifest, so a bad one is never published.

    The file is opened alone in an empty folder, as serving will open `model.onnx` from the
    registry's cache: a graph whose weights live in files beside it (external data) is refused
    here rather than when it would serve.

    Returns:
        The contract to publish: `tensor` with `output_name` set to the output that serves
        (the named one, or the graph's only output), so the version records it.

    Raises:
        ModelLoadError: the file is not ONNX, or contradicts the contract (naming the field);
            a graph of several outputs without `tensor.output_name`, or a name that is not
            one of its outputs (listing them with their dtypes and shapes).
        pydantic.ValidationError: a manifest the contract makes invalid (a sigmoid output for
            other than two labels).
    """
    from perito_core.models.engines.onnxruntime import OnnxModel
    from perito_core.models.manifest import Artifact, ModelManifest, sha256_file

    draft = ModelManifest(
        name=name,
        version="0",
        labels=labels,
        input=contract,
        artifact=Artifact(
            file="model.onnx",
            format="onnx",
            sha256=sha256_file(model_file),
            size_bytes=model_file.stat().st_size,
        ),
        tensor=tensor,
        source={"imported_from": model_file.name},  # what errors name
    )
    with tempfile.TemporaryDirectory(prefix="perito-onnx-import-") as folder:
        alone = Path(folder) / "model.onnx"
        shutil.copyfile(model_file, alone)
        model = OnnxModel.open(alone, draft, require_output_name=True)
    return tensor.model_copy(update={"output_name": model.output_name})
