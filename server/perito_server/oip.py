"""The Open Inference Protocol ("KServe v2") door: a Perito model behind `inference.*`.

The protocol: the KServe v2 / Open Inference Protocol specification
(https://github.com/kserve/open-inference-protocol, `inference_grpc.md` and
`inference_rest.md`), with Triton's extensions that its clients use: classification
(`docs/protocol/extension_classification.md` in triton-inference-server/server: an output
requested with the parameter `classification` = k answers BYTES "score:index:label", which is
what tritonclient's `class_count=k` sends) and binary tensor data over HTTP
(`extension_binary_data.md`, handled in `perito_server.http_api`).

This module is the protocol-neutral part both transports share (`OipCore`: tensors in,
tensors out, model metadata) and the gRPC servicer (`OipServicer`). It only translates: the
images go through `PeritoServicer.infer`, the one path `Classify` takes (the same decode,
admission, batcher, quota and served form), so the probabilities are those `Classify` answers
for the same bytes.

How a model looks through the protocol (`ModelMetadata`):

- inputs: `images`, BYTES [-1] (encoded images, one per element; [N,1] is accepted, as
  Triton's image examples send), or `pixels`, UINT8 [-1, H, W, 3] (RGB already at the model's
  input size). A request sends exactly one input; it is told apart by its datatype.
- outputs: `probabilities`, FP32 [-1, C] (C = the model's labels). With the `classification`
  parameter k it is BYTES [-1, k] of "score:index:label", best first.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message

from perito_core.access.tenancy import Tenant
from perito_core.errors import InvalidArgument, NotFound
from perito_core.models.manifest import ModelManifest
from perito_core.models.summary import summarize
from perito_server._oip import grpc_service_pb2 as pb
from perito_server.auth import current_tenant
from perito_server.errors import echo
from perito_server.metrics import ServerMetrics
from perito_server.service import Inference, PeritoServicer

SERVICE_NAME = "inference.GRPCInferenceService"
# Triton's extension names, as ServerMetadata lists them.
EXTENSIONS = ("classification", "binary_tensor_data")
IMAGES_INPUT = "images"
PIXELS_INPUT = "pixels"
PROBABILITIES_OUTPUT = "probabilities"
# Triton's `platform` names for the served artifact's format.
PLATFORMS = {"torchscript": "pytorch_libtorch", "onnx": "onnxruntime_onnx"}

Context = grpc.aio.ServicerContext[Any, Any]


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
    """What `OipCore.infer` answers: the model and version that answered and the outputs."""

    model: str
    version: str
    outputs: list[OutputTensor] = field(default_factory=list)


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


def image_count(shape: Sequence[int], datatype: str, name: str) -> int:
    """N, the images an input of `shape` holds: [N] or [N, 1] for BYTES, [N, H, W, 3] for UINT8.

    Raises:
        InvalidArgument: naming the input, for any other shape or datatype.
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
    return dims[0]


def model_metadata(manifest: ModelManifest) -> dict[str, Any]:
    """The OIP model metadata of `manifest`'s version: name, versions, platform, inputs and
    outputs (each `{"name", "datatype", "shape"}`), as the REST response's JSON."""
    size = manifest.input
    return {
        "name": manifest.name,
        "versions": [manifest.version],
        "platform": PLATFORMS.get(manifest.artifact.format, manifest.artifact.format),
        "inputs": [
            {"name": IMAGES_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS_INPUT, "datatype": "UINT8", "shape": [-1, size.height, size.width, 3]},
        ],
        "outputs": [
            {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, len(manifest.labels)]}
        ],
    }


class OipCore:
    """The protocol-neutral door: readiness, metadata and inference over a `PeritoServicer`.

    Both transports (`OipServicer` here, `perito_server.http_api`) decode their requests into
    `InputTensor` / `RequestedOutput` and encode `InferResult`; neither decodes an image or
    checks a tenant itself.
    """

    def __init__(self, servicer: PeritoServicer) -> None:
        self.servicer = servicer
        self.ready = True  # false once the server drains

    @property
    def metrics(self) -> ServerMetrics | None:
        return self.servicer.metrics

    async def manifest(self, model: str, version: str) -> ModelManifest:
        """The manifest of `model` at `version` (a version, an alias or "" for latest).

        Raises:
            InvalidArgument: a malformed name.
            NotFound: no such model, version or alias.
        """
        self.servicer.check_target(model, version, 1, "inputs")
        pool = self.servicer.pool
        resolved = await pool.resolve(model, version)
        return await asyncio.to_thread(pool.registry.manifest, model, resolved)

    async def model_ready(self, model: str, version: str) -> bool:
        """Whether `model@version` exists and the server takes requests (a version that is
        not loaded yet is loaded by the first request).

        Raises:
            InvalidArgument: a malformed name.
        """
        if not self.ready:
            return False
        try:
            await self.manifest(model, version)
        except NotFound:
            return False
        return True

    async def infer(
        self,
        tenant: Tenant,
        model: str,
        version: str,
        inputs: Sequence[InputTensor],
        outputs: Sequence[RequestedOutput],
        *,
        nbytes: int,
        deadline: float | None,
        precision: object = None,
    ) -> InferResult:
        """Classify the images of the one input, and answer the requested outputs.

        Args:
            tenant: the caller's tenant (its role and model list already checked).
            model, version: the model, and a version, alias or "" (latest).
            inputs: exactly one: BYTES [N] / [N, 1] of encoded images, or UINT8 [N, H, W, 3].
            outputs: what to answer; empty means `probabilities`.
            nbytes: the request's size, for admission (`max_queue_bytes`).
            deadline: `time.monotonic()` by which to answer, or None.
            precision: the request's `precision` parameter (Perito's: a form at least as
                exact as the server's, as `ClassifyRequest.precision`), None when absent.

        Returns:
            `probabilities` FP32 [N, C], or with `classification` = k, BYTES [N, k] of
            "score:index:label" (k clipped to C), for each output asked for.

        Raises:
            InvalidArgument: not one input, a bad shape or datatype, an unknown output, a bad
                `classification`, an undecodable image (named `<input>[i]`).
            NotFound, QueueFull, QuotaExceeded, DeadlineExceeded, ShuttingDown: as
                `PeritoServicer.infer`.
        """
        if len(inputs) != 1:
            raise InvalidArgument(
                f"{len(inputs)} inputs; send exactly one: {IMAGES_INPUT!r} (BYTES) or "
                f"{PIXELS_INPUT!r} (UINT8)",
                field="inputs",
            )
        tensor = inputs[0]
        count = image_count(tensor.shape, tensor.datatype, tensor.name)
        for output in outputs:
            if output.name != PROBABILITIES_OUTPUT:
                raise InvalidArgument(
                    f"output {echo(output.name)!r}: unknown; the output is "
                    f"{PROBABILITIES_OUTPUT!r}",
                    field="outputs",
                )
            if output.classification < 0:
                raise InvalidArgument(
                    "the classification parameter must be a positive count", field="outputs"
                )
        if precision is not None and not isinstance(precision, str):
            raise InvalidArgument("the precision parameter must be a string", field="precision")
        self.servicer.check_target(model, version, count, tensor.name)
        name = echo(tensor.name)
        inference = await self.servicer.infer(
            tenant,
            model,
            version,
            tensor.data,
            nbytes=nbytes,
            deadline=deadline,
            describe=lambda i: (f"{tensor.name[:64]}[{i}]", f"input {name!r}, image {i}"),
            precision=precision or "",
        )
        wanted = outputs or [RequestedOutput(PROBABILITIES_OUTPUT)]
        return InferResult(
            inference.model, inference.version, [_output(inference, o) for o in wanted]
        )


def _output(inference: Inference, output: RequestedOutput) -> OutputTensor:
    probabilities = np.stack(inference.probabilities).astype(np.float32, copy=False)
    if not output.classification:
        return OutputTensor(
            output.name, "FP32", list(probabilities.shape), probabilities, output.binary
        )
    labels = inference.manifest.labels
    k = min(output.classification, len(labels))
    strings = [
        f"{p.probability:f}:{p.class_index}:{p.label}".encode()
        for probs in inference.probabilities
        for p in summarize(probs, labels, k, None).predictions
    ]
    return OutputTensor(
        output.name, "BYTES", [len(inference.probabilities), k], strings, output.binary
    )


def parameter_value(parameter: pb.InferParameter) -> bool | int | float | str | None:
    """The value an `InferParameter` holds, whichever of its fields is set."""
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)


def classification_count(value: object) -> int:
    """The `classification` parameter as a count (0 when absent).

    Raises:
        InvalidArgument: not a whole number.
    """
    if value is None or value is False:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise InvalidArgument(
            f"the classification parameter must be a whole number, not {echo(str(value))!r}",
            field="outputs",
        )
    return int(value)


def _grpc_input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> InputTensor:
    """An `InputTensor` from the gRPC message, its data from `raw` or from `contents`."""
    shape = list(tensor.shape)
    count = image_count(shape, tensor.datatype, tensor.name)
    data: list[bytes] | np.ndarray
    if tensor.datatype == "BYTES":
        if raw is not None:
            data = deserialize_bytes(raw, count, tensor.name)
        else:
            data = list(tensor.contents.bytes_contents)
            if len(data) != count:
                raise InvalidArgument(
                    f"input {echo(tensor.name)!r}: {len(data)} elements for shape {shape}",
                    field=tensor.name,
                )
    else:
        size = int(np.prod(shape))
        if raw is not None:
            flat = np.frombuffer(raw, dtype=np.uint8)
        else:
            values = np.asarray(tensor.contents.uint_contents, dtype=np.uint32)
            if values.size and int(values.max()) > 255:
                raise InvalidArgument(
                    f"input {echo(tensor.name)!r}: UINT8 values above 255", field=tensor.name
                )
            flat = values.astype(np.uint8)
        if flat.size != size:
            raise InvalidArgument(
                f"input {echo(tensor.name)!r}: {flat.size} values for shape {shape}",
                field=tensor.name,
            )
        data = flat.reshape(shape)
    return InputTensor(tensor.name, tensor.datatype, shape, data)


class OipServicer:
    """`inference.GRPCInferenceService` over `OipCore` (the six methods Perito serves).

    Auth is the server's interceptor (`perito_server.auth`: ServerLive and ServerReady are
    open, the rest need the `classify` role and the model on the tenant's list); errors,
    request ids and call metrics are `errors.CallInterceptor`'s, as for `perito.v1`.
    """

    def __init__(self, core: OipCore) -> None:
        self.core = core
        self.metrics = core.metrics

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="perito", version=server_version(), extensions=EXTENSIONS
        )

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=await self.core.model_ready(request.name, request.version)
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        metadata = model_metadata(await self.core.manifest(request.name, request.version))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=metadata["name"],
            versions=metadata["versions"],
            platform=metadata["platform"],
            inputs=[tensor(**t) for t in metadata["inputs"]],
            outputs=[tensor(**t) for t in metadata["outputs"]],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidArgument(
                f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs",
                field="raw_input_contents",
            )
        inputs = [
            _grpc_input(tensor, raw[i] if raw else None) for i, tensor in enumerate(request.inputs)
        ]
        outputs = [
            RequestedOutput(
                o.name,
                classification_count(
                    parameter_value(o.parameters["classification"])
                    if "classification" in o.parameters
                    else None
                ),
            )
            for o in request.outputs
        ]
        remaining = context.time_remaining()
        result = await self.core.infer(
            current_tenant(),
            request.model_name,
            request.model_version,
            inputs,
            outputs,
            nbytes=request.ByteSize(),
            deadline=time.monotonic() + remaining if remaining is not None else None,
            precision=parameter_value(request.parameters["precision"])
            if "precision" in request.parameters
            else None,
        )
        response = pb.ModelInferResponse(
            model_name=result.model, model_version=result.version, id=request.id
        )
        for output in result.outputs:
            response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
            response.raw_output_contents.append(output.raw())
        return response


def add_oip_servicer(servicer: OipServicer, server: grpc.aio.Server) -> None:
    """Register `servicer` as `inference.GRPCInferenceService` on `server` (what generated
    `add_*_to_server` code does; the module holds messages only, see scripts/gen_protos.py)."""
    methods: dict[str, tuple[type[Message], Callable[..., Any]]] = {
        "ServerLive": (pb.ServerLiveRequest, servicer.ServerLive),
        "ServerReady": (pb.ServerReadyRequest, servicer.ServerReady),
        "ServerMetadata": (pb.ServerMetadataRequest, servicer.ServerMetadata),
        "ModelReady": (pb.ModelReadyRequest, servicer.ModelReady),
        "ModelMetadata": (pb.ModelMetadataRequest, servicer.ModelMetadata),
        "ModelInfer": (pb.ModelInferRequest, servicer.ModelInfer),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            handler,
            request_deserializer=message.FromString,
            response_serializer=lambda response: response.SerializeToString(),
        )
        for name, (message, handler) in methods.items()
    }
    # Both, as generated code registers them: registered methods skip gRPC's per-call lookup.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]
