"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService`, a door.

It only translates: `ModelInferRequest` into the protocol's tensors
(`perito_server.oip_protocol`), the inference service's answer back into a
`ModelInferResponse`. The images go through `InferenceService.oip_infer`, the one path
`Classify` takes (the same decode, admission, batcher, quota and served form), so the
probabilities are those `Classify` answers for the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message

from perito_core.errors import InvalidArgument
from perito_server import oip_protocol
from perito_server._oip import grpc_service_pb2 as pb
from perito_server.auth import current_tenant
from perito_server.errors import echo
from perito_server.inference import InferenceService

SERVICE_NAME = "inference.GRPCInferenceService"

Context = grpc.aio.ServicerContext[Any, Any]


def parameter_value(parameter: pb.InferParameter) -> bool | int | float | str | None:
    """The value an `InferParameter` holds, whichever of its fields is set."""
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)


def _grpc_input(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None
) -> oip_protocol.InputTensor:
    """An `InputTensor` from the gRPC message, its data from `raw` or from `contents`.

    Raises:
        InvalidArgument: naming the input, when it has `contents` beside its `raw` entry
            (the protocol allows one or the other, as Triton enforces), or data not of its
            shape.
    """
    if raw is not None and tensor.HasField("contents"):
        raise InvalidArgument(
            f"input {echo(tensor.name)!r}: contents must not be set when the request sends "
            "raw_input_contents; send its data in one or the other",
            field=tensor.name,
        )
    shape = list(tensor.shape)
    count = oip_protocol.image_count(shape, tensor.datatype, tensor.name)
    data: list[bytes] | np.ndarray
    if tensor.datatype == "BYTES":
        if raw is not None:
            data = oip_protocol.deserialize_bytes(raw, count, tensor.name)
        else:
            data = list(tensor.contents.bytes_contents)
            if len(data) != count:
                raise InvalidArgument(
                    f"input {echo(tensor.name)!r}: {len(data)} elements for shape {shape}",
                    field=tensor.name,
                )
    else:
        if raw is not None:
            flat = np.frombuffer(raw, dtype=np.uint8)
        else:
            values = np.asarray(tensor.contents.uint_contents, dtype=np.uint32)
            if values.size and int(values.max()) > 255:
                raise InvalidArgument(
                    f"input {echo(tensor.name)!r}: UINT8 values above 255", field=tensor.name
                )
            flat = values.astype(np.uint8)
        data = oip_protocol.pixels(flat, shape, tensor.name)
    return oip_protocol.InputTensor(tensor.name, tensor.datatype, shape, data)


class OipServicer:
    """`inference.GRPCInferenceService` over the inference service (the six methods Perito
    serves).

    Auth is the server's interceptor (`perito_server.auth`: ServerLive and ServerReady are
    open, the rest need the `classify` role and the model on the tenant's list); errors,
    request ids and call metrics are `errors.CallInterceptor`'s, as for `perito.v1`.
    """

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="perito", version=oip_protocol.server_version(), extensions=oip_protocol.EXTENSIONS
        )

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=await self.service.model_ready(request.name, request.version)
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        metadata = await self.service.oip_model_metadata(request.name, request.version)
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
        oip_protocol.check_request_parameters(request.parameters)
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidArgument(
                f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one "
                "per input, or none",
                field="raw_input_contents",
            )
        inputs = [
            _grpc_input(tensor, raw[i] if raw else None) for i, tensor in enumerate(request.inputs)
        ]
        outputs = [
            oip_protocol.RequestedOutput(
                o.name,
                oip_protocol.classification_count(
                    parameter_value(o.parameters["classification"])
                    if "classification" in o.parameters
                    else None
                ),
            )
            for o in request.outputs
        ]
        # Triton's `timeout` parameter (tritonclient.grpc's `timeout=`) and the call's deadline.
        deadline = oip_protocol.request_deadline(
            parameter_value(request.parameters["timeout"])
            if "timeout" in request.parameters
            else None,
            context.time_remaining(),
        )
        result = await self.service.oip_infer(
            current_tenant(),
            request.model_name,
            request.model_version,
            inputs,
            outputs,
            nbytes=request.ByteSize(),
            deadline=deadline,
            precision=parameter_value(request.parameters["precision"])
            if "precision" in request.parameters
            else None,
            quality={
                name: parameter_value(request.parameters[name])
                for name in oip_protocol.QUALITY_PARAMETERS
                if name in request.parameters
            },
            routing_key=parameter_value(request.parameters[oip_protocol.ROUTING_KEY_PARAMETER])
            if oip_protocol.ROUTING_KEY_PARAMETER in request.parameters
            else None,
        )
        response = pb.ModelInferResponse(
            model_name=result.model, model_version=result.version, id=request.id
        )
        for key, value in result.parameters.items():
            if isinstance(value, str):
                response.parameters[key].string_param = value
            else:
                response.parameters[key].double_param = value
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
