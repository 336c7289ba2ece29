"""The Open Inference Protocol's data model, shared by its two transports and the core.

The protocol: the KServe v2 / Open Inference Protocol specification
(https://github.com/kserve/open-inference-protocol, `inference_grpc.md` and
`inference_rest.md`), with Triton's extensions that its clients use: classification
(`docs/protocol/extension_classification.md` in triton-inference-server/server: an output
requested with the parameter `classification` = k answers BYTES "score:index:label", which is
what tritonclient's `class_count=k` sends) and binary tensor data over HTTP
(`extension_binary_data.md`, handled by the REST door).

The tensors here are protocol-neutral: the gRPC door (`doors.oip_grpc`) and the REST door
(`doors.oip_rest`) decode their wire format into `InputTensor` / `RequestedOutput`, the
inference service (`InferenceService.oip_infer`) answers an `InferResult`, and each door
encodes it back. Neither door decodes an image or checks a tenant itself.

How a model looks through the protocol (`model_metadata`):

- inputs: `images`, BYTES [-1] (encoded images, one per element; [N,1] is accepted, as
  Triton's image examples send), or `pixels`, UINT8 [-1, H, W, 3] (RGB already at the model's
  input size). A request sends exactly one input; it is told apart by its datatype.
- outputs: `probabilities`, FP32 [-1, C] (C = the model's labels). With the `classification`
  parameter k it is BYTES [-1, k] of "score:index:label", best first.
- parameters: a request may carry Perito's `precision`, `perito_routing_key` (a string that
  keeps requests on one version while the alias has a canary: `ROUTING_KEY_PARAMETER`),
  `quality_policy` (`flag` or `refuse`) and the quality thresholds (`min_sharpness`, ...:
  `QUALITY_PARAMETERS`); the response carries `perito_quality`, a JSON string: per image, its
  measures and issues (docs/trust.md#quality).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from perito_core.errors import InvalidArgument
from perito_core.models.manifest import ModelManifest
from perito_core.quality import (
    THRESHOLD_FIELDS,
    Quality,
    QualityGate,
    parse_policy,
    parse_thresholds,
)
from perito_server.errors import echo

# Triton's extension names, as ServerMetadata lists them.
EXTENSIONS = ("classification", "binary_tensor_data")
IMAGES_INPUT = "images"
PIXELS_INPUT = "pixels"
PROBABILITIES_OUTPUT = "probabilities"
# Triton's `platform` names for the served artifact's format.
PLATFORMS = {"torchscript": "pytorch_libtorch", "onnx": "onnxruntime_onnx"}


def server_version() -> str:
    """The installed `perito` package's version."""
    try:
        return importlib.metadata.version("perito")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source tree
        return "0"


@dataclass
class InputTensor:
    """One input of an inference request, its data decoded from the transport.

    Attributes:
        name: the input's name as sent.
        datatype: "BYTES" or "UINT8" (others are refused).
        shape: as sent.
        data: for BYTES, one `bytes` per element; for UINT8, a uint8 array of `shape`.
    """

    name: str
    datatype: str
    shape: list[int]
    data: list[bytes] | np.ndarray


@dataclass
class RequestedOutput:
    """An output asked for: its name, `classification` k (0: the tensor itself), and for
    HTTP whether its data goes as binary (Triton's `binary_data` parameter)."""

    name: str
    classification: int = 0
    binary: bool = False


@dataclass
class OutputTensor:
    """One output of an inference response.

    Attributes:
        name: the requested output's name.
        datatype: "FP32" (probabilities) or "BYTES" (classification strings).
        shape: [N, C] or [N, k].
        data: float32 array of `shape`, or the strings (UTF-8 bytes) in row-major order.
        binary: for HTTP, whether the data goes in the binary part.
    """

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]
    binary: bool = False

    def raw(self) -> bytes:
        """The data as the protocol's raw contents: little-endian FP32, or BYTES elements each
        a 4-byte little-endian length then the bytes."""
        if isinstance(self.data, np.ndarray):
            return self.data.astype("<f4", copy=False).tobytes()
        return serialize_bytes(self.data)


@dataclass
class InferResult:
    """What `InferenceService.oip_infer` answers: the model and version that answered, the
    outputs, and the response's parameters."""

    model: str
    version: str
    outputs: list[OutputTensor] = field(default_factory=list)
    # Response parameters (Perito's `perito_*`: provenance and the card's figures), each a
    # string or a number.
    parameters: dict[str, str | float] = field(default_factory=dict)


QUALITY_PARAMETERS: tuple[str, ...] = ("quality_policy", *THRESHOLD_FIELDS)
"""The request parameters the photo-quality gate reads."""
ROUTING_KEY_PARAMETER = "perito_routing_key"
"""The request parameter holding the routing key (`ClassifyRequest.routing_key`'s): a claim
id, say, keeps one claim on one version while the alias has a canary."""


# Request fields of Perito's own doors (Classify, the JSON API) that an inference request's
# parameters do not take: asked for there, they are refused, never silently ignored.
NOT_OIP_PARAMETERS: dict[str, str] = {
    "top_k": "ask the output for its top k with the output parameter `classification`",
    "confidence_threshold": "the response's `perito_confidence_threshold` is the model card's; "
    "apply your own to the probabilities, or call Classify or the JSON API, which take one",
    "explain": "explanations come from Classify or the JSON API (`explain`)",
}


def check_request_parameters(names: Iterable[str]) -> None:
    """Refuse an inference request's parameters that Perito's other doors take as request
    fields but this protocol does not (`NOT_OIP_PARAMETERS`): a caller who sets one expects
    it honoured. Other names (Triton's `priority`, `sequence_id`, ...) are left alone, as
    Triton leaves them to the backend.

    Raises:
        InvalidArgument: naming the parameter and what to do instead.
    """
    for name in names:
        if name in NOT_OIP_PARAMETERS:
            raise InvalidArgument(
                f"parameters.{name}: not an inference request parameter here; "
                f"{NOT_OIP_PARAMETERS[name]}",
                field=f"parameters.{name}",
            )


def quality_gate(parameters: Mapping[str, object]) -> QualityGate:
    """What an inference request's parameters ask of the photo-quality gate.

    Raises:
        InvalidArgument: naming the parameter: a policy other than `flag` or `refuse`, or a
            threshold that is not a number in its range.
    """
    return QualityGate(
        refuse=parse_policy(parameters.get("quality_policy"), "quality_policy"),
        override=parse_thresholds(parameters),
    )


def quality_parameter(quality: Sequence[Quality | None]) -> dict[str, str]:
    """The `perito_quality` response parameter: a JSON list, per image, of its measures and
    issues (`Quality.as_dict`), null for an image sent as pixels; {} when no image was
    measured."""
    if all(q is None for q in quality):
        return {}
    return {
        "perito_quality": json.dumps([q.as_dict() if q else None for q in quality], allow_nan=False)
    }


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements as raw contents: each a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def deserialize_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    """The `count` BYTES elements of `raw` (see `serialize_bytes`).

    Raises:
        InvalidArgument: naming input `name`, if `raw` does not hold exactly `count` elements.
    """
    view = memoryview(raw)
    elements: list[bytes] = []
    offset = 0
    while offset < len(view):
        if len(elements) == count or offset + 4 > len(view):
            break
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            break
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if len(elements) != count or offset != len(view):
        raise InvalidArgument(
            f"input {echo(name)!r}: its raw BYTES contents do not hold {count} elements, each "
            "a 4-byte little-endian length then that many bytes",
            field=name,
        )
    return elements


def pixels(flat: np.ndarray, shape: Sequence[int], name: str) -> np.ndarray:
    """A UINT8 input's values `flat` (uint8, row-major) as an array of `shape`.

    Raises:
        InvalidArgument: naming input `name`, when `flat` does not hold that many values.
    """
    if flat.size != math.prod(shape):  # Python's integers: numpy's int64 product wraps
        raise InvalidArgument(
            f"input {echo(name)!r}: {flat.size} values for shape {list(shape)}", field=name
        )
    return flat.reshape(shape)


# The largest dimension of an input's shape: more than any image count or side (an empty
# tensor of [0, 2**62, 4, 3] holds no data, and no array can be shaped so).
MAX_DIMENSION = 2**31 - 1


def image_count(shape: Sequence[int], datatype: str, name: str) -> int:
    """N, the images an input of `shape` holds: [N] or [N, 1] for BYTES, [N, H, W, 3] for UINT8.

    Raises:
        InvalidArgument: naming the input, for any other shape or datatype, or a dimension
            over `MAX_DIMENSION`.
    """
    dims = list(shape)
    if datatype == "BYTES" and (len(dims) == 1 or (len(dims) == 2 and dims[1] == 1)):
        ok = dims[0] >= 0
    elif datatype == "UINT8" and len(dims) == 4 and dims[3] == 3:
        ok = all(d >= 0 for d in dims)
    elif datatype in ("BYTES", "UINT8"):
        want = "[N] or [N, 1]" if datatype == "BYTES" else "[N, H, W, 3]"
        raise InvalidArgument(
            f"input {echo(name)!r}: shape {dims} for {datatype}; want {want}", field=name
        )
    else:
        raise InvalidArgument(
            f"input {echo(name)!r}: datatype {echo(datatype)!r}; want BYTES (encoded images) "
            "or UINT8 (pixels [N, H, W, 3])",
            field=name,
        )
    if not ok:
        raise InvalidArgument(f"input {echo(name)!r}: negative dimension in {dims}", field=name)
    if any(d > MAX_DIMENSION for d in dims):
        raise InvalidArgument(
            f"input {echo(name)!r}: a dimension of {dims} is over {MAX_DIMENSION:,}", field=name
        )
    return dims[0]


def model_metadata(manifest: ModelManifest, versions: Sequence[str]) -> dict[str, Any]:
    """The OIP model metadata of `manifest`'s version: name, `versions` (every version of the
    model a request may name, as OIP and Triton list them), platform, inputs and outputs (each
    `{"name", "datatype", "shape"}`, those of `manifest`'s version), as the REST response's
    JSON."""
    size = manifest.input
    return {
        "name": manifest.name,
        "versions": list(versions),
        "platform": PLATFORMS.get(manifest.artifact.format, manifest.artifact.format),
        "inputs": [
            {"name": IMAGES_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS_INPUT, "datatype": "UINT8", "shape": [-1, size.height, size.width, 3]},
        ],
        "outputs": [
            {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, len(manifest.labels)]}
        ],
    }


def pixel_contract(manifest: ModelManifest) -> tuple[int, int, int]:
    """What a caller sending pixels shapes its request and reads its answer by, as
    `model_metadata` states it: (height, width) of the uint8 [N, H, W, 3] input, in pixels,
    and the label count C of the FP32 [N, C] output."""
    return manifest.input.height, manifest.input.width, len(manifest.labels)


# Triton's `timeout` request parameter is a uint64 count of microseconds.
MAX_TIMEOUT_US = 2**64 - 1


def request_deadline(timeout: object, remaining_s: float | None = None) -> float | None:
    """An inference request's deadline (`time.monotonic()` seconds): the sooner of its
    `timeout` parameter and the transport's own deadline (`remaining_s` seconds from now:
    gRPC's); None when it has neither.

    `timeout` is Triton's request parameter (microseconds), which tritonclient's `timeout=`
    sends over HTTP and gRPC alike (`inference_protocols.md` in triton-inference-server/server).

    Raises:
        InvalidArgument: naming `timeout`, when it is not a positive whole number of
            microseconds within 64 bits.
    """
    deadlines = [] if remaining_s is None else [time.monotonic() + remaining_s]
    if timeout is not None:
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int)
            or not 0 < timeout <= MAX_TIMEOUT_US
        ):
            raise InvalidArgument(
                "timeout must be a positive count of microseconds", field="timeout"
            )
        deadlines.append(time.monotonic() + timeout / 1e6)
    return min(deadlines, default=None)


def classification_count(value: object) -> int:
    """The `classification` parameter as a count (0 when absent).

    Raises:
        InvalidArgument: not a whole number (NaN and infinity included).
    """
    if value is None or value is False:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise InvalidArgument(
        f"the classification parameter must be a whole number, not {echo(str(value))!r}",
        field="outputs",
    )
