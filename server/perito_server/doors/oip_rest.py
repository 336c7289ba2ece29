"""The Open Inference Protocol over HTTP/REST (KServe v2), a door.

The protocol: `inference_rest.md` of https://github.com/kserve/open-inference-protocol:
`GET /v2/health/live`, `/v2/health/ready`, `/v2`, `/v2/models/{model}[/versions/{version}]`,
`.../ready`, and `POST .../infer` with JSON tensors or Triton's binary tensor extension (the
`Inference-Header-Content-Length` header: that many bytes of JSON, then each binary tensor's
bytes in order, sized by its `binary_data_size` parameter; what `tritonclient.http` sends and
reads). In JSON, BYTES images are base64 strings (raw image bytes are not text), decoded by
`pybase64`.

It only translates: the body into the protocol's tensors (`perito_server.oip_protocol`), the
inference service's `InferResult` back into JSON (and binary parts). Auth, errors and bodies
are the HTTP edge's (`doors.http_edge`).
"""

from __future__ import annotations

import binascii
import json
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pybase64
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from perito_core.access.tenancy import Tenant
from perito_core.errors import InvalidArgument, NotFound
from perito_server.doors.http_edge import (
    OIP,
    OIP_ERROR,
    HttpEdge,
    check_json_values,
    model_ref,
    parse_json,
)
from perito_server.errors import echo
from perito_server.inference import InferenceService
from perito_server.oip_protocol import (
    EXTENSIONS,
    ROUTING_KEY_PARAMETER,
    InferResult,
    InputTensor,
    RequestedOutput,
    check_request_parameters,
    classification_count,
    deserialize_bytes,
    image_count,
    pixels,
    request_deadline,
    server_version,
)
from perito_server.openapi import Named, Operation

HEADER_LENGTH = "inference-header-content-length"


# The protocol's bodies, and what the OpenAPI document says of each route
# (`perito_server.openapi`).
TAG = "Open Inference Protocol"
STRING = {"type": "string"}
ANY_OBJECT = {"type": "object", "additionalProperties": True}


def _object(*required: str, **properties: Any) -> dict[str, Any]:
    """A JSON Schema object of `properties`, the `required` ones named."""
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def _array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


TENSOR_METADATA = _object(
    "name", "datatype", "shape", name=STRING, datatype=STRING, shape=_array({"type": "integer"})
)
READY_BODY = Named("Ready", _object(ready={"type": "boolean"}))
LIVE = Operation(
    "oipLive", "OIP: the server is alive", TAG, Named("Live", _object(live={"type": "boolean"}))
)
READY = Operation(
    "oipReady",
    "OIP: the server takes requests (503 while it drains)",
    TAG,
    READY_BODY,
    answers={"503": ("Draining.", READY_BODY)},
)
SERVER_METADATA = Operation(
    "oipServerMetadata",
    "OIP: server name, version and extensions",
    TAG,
    Named("ServerMetadata", _object(name=STRING, version=STRING, extensions=_array(STRING))),
    "401 403 429",
)
MODEL_METADATA = Operation(
    "oipModelMetadata",
    "OIP: a model's inputs and outputs",
    TAG,
    Named(
        "ModelMetadata",
        _object(
            name=STRING,
            versions=_array(STRING),
            platform=STRING,
            inputs=_array(TENSOR_METADATA),
            outputs=_array(TENSOR_METADATA),
        ),
    ),
    "400 401 403 404 429 503",
)
MODEL_STATISTICS = Operation(
    "oipModelStatistics",
    "Triton's statistics extension: not served (404 NOT_FOUND saying so)",
    TAG,
    Named("ModelStatistics", _object(model_stats=_array(ANY_OBJECT))),
    "404",
    description="`GET /v2/models/stats` is where tritonclient's `get_inference_statistics()` "
    "asks; Perito does not serve the extension (ServerMetadata lists those it serves): each "
    "model's figures are on the metrics port (`perito_requests_total`, "
    "`perito_batch_size`, `perito_queue_seconds`, ...).",
)
MODEL_READY = Operation(
    "oipModelReady",
    "OIP: whether a model version can be inferred (400 when it cannot)",
    TAG,
    READY_BODY,
    "401 403 404 429 503",
    answers={
        "400": (
            "Not ready (no such version), or a malformed name.",
            Named("NotReady", {"anyOf": [READY_BODY.schema, OIP_ERROR.schema]}),
        )
    },
)
MODEL_INFER = Operation(
    "oipModelInfer",
    "OIP: classify images",
    TAG,
    Named(
        "InferenceResponse",
        _object(
            model_name=STRING,
            model_version=STRING,
            id=STRING,
            parameters=ANY_OBJECT,
            outputs=_array({"type": "object"}),
        ),
    ),
    "400 401 403 404 413 429 503 504",
    body=Named(
        "InferenceRequest",
        _object(
            "inputs",
            id=STRING,
            parameters=ANY_OBJECT,
            inputs={  # exactly one: `images` or `pixels`
                **_array(
                    _object(
                        "name",
                        "datatype",
                        "shape",
                        name=STRING,
                        datatype={"type": "string", "enum": ["BYTES", "UINT8"]},
                        shape=_array({"type": "integer", "minimum": 0}),
                        parameters=ANY_OBJECT,
                        data=_array({}),
                    )
                ),
                "minItems": 1,
                "maxItems": 1,
            },
            outputs=_array(_object(name=STRING, parameters=ANY_OBJECT)),
        ),
    ),
    description="One input: `images` BYTES [N] or [N,1] (base64 strings in JSON, or binary "
    "with `binary_data_size` and the Inference-Header-Content-Length header), or `pixels` "
    "UINT8 [N,H,W,3]. Output `probabilities` FP32 [N,C]; with the parameter "
    "`classification`: k, BYTES [N,k] of `score:index:label`. The response's `parameters` "
    "carry each answer's provenance and the card's figures (`perito_input_sha256`, "
    "`perito_artifact_sha256`, ...: docs/trust.md#provenance).",
)


class OipRest:
    """The protocol's REST routes over `service`, behind `edge`."""

    def __init__(self, service: InferenceService, edge: HttpEdge) -> None:
        self.service = service
        self.edge = edge

    def routes(self) -> list[BaseRoute]:
        """The routes, each behind the edge with the gRPC method whose role it needs."""
        route = self.edge.route
        model_paths = (
            ("/v2/models/{model}", ""),
            ("/v2/models/{model}/versions/{version}", "Version"),
        )
        return [
            route("GET", "/v2/health/live", LIVE, None, self._live, oip=True),
            route("GET", "/v2/health/ready", READY, None, self._ready, oip=True),
            route(
                "GET",
                "/v2",
                SERVER_METADATA,
                OIP + "ServerMetadata",
                self._server_metadata,
                oip=True,
            ),
            # Before `/v2/models/{model}`, which would read it as a model named "stats".
            route("GET", "/v2/models/stats", MODEL_STATISTICS, None, self._statistics, oip=True),
            *(
                route(
                    verb,
                    path + tail,
                    replace(operation, operation_id=operation.operation_id + suffix),
                    OIP + method,
                    handler,
                    model=True,
                    oip=True,
                )
                for path, suffix in model_paths
                for verb, tail, operation, method, handler in (
                    ("GET", "", MODEL_METADATA, "ModelMetadata", self._model_metadata),
                    ("GET", "/ready", MODEL_READY, "ModelReady", self._model_ready),
                    ("POST", "/infer", MODEL_INFER, "ModelInfer", self._infer),
                )
            ),
        ]

    async def _live(self, request: Request, tenant: Tenant) -> Response:
        return JSONResponse({"live": True})

    async def _ready(self, request: Request, tenant: Tenant) -> Response:
        ready = self.service.ready
        return JSONResponse({"ready": ready}, 200 if ready else 503)

    async def _server_metadata(self, request: Request, tenant: Tenant) -> Response:
        return JSONResponse(
            {"name": "perito", "version": server_version(), "extensions": list(EXTENSIONS)}
        )

    async def _statistics(self, request: Request, tenant: Tenant) -> Response:
        raise NotFound(
            "Perito does not serve Triton's statistics extension (GET /v2 lists the extensions "
            "it serves); each model's figures are on the server's metrics port (/metrics)"
        )

    async def _model_metadata(self, request: Request, tenant: Tenant) -> Response:
        return JSONResponse(await self.service.oip_model_metadata(*model_ref(request)))

    async def _model_ready(self, request: Request, tenant: Tenant) -> Response:
        ready = await self.service.model_ready(*model_ref(request))
        return JSONResponse({"ready": ready}, 200 if ready else 400)

    async def _infer(self, request: Request, tenant: Tenant) -> Response:
        model, version = model_ref(request)
        body = await self.edge.body(request)
        header = request.headers.get(HEADER_LENGTH)
        split = len(body)
        if header is not None:
            if not (header.isascii() and header.isdigit()) or int(header) > len(body):
                raise InvalidArgument(
                    f"{HEADER_LENGTH}: {echo(header)!r} is not a length within the body",
                    field=HEADER_LENGTH,
                )
            split = int(header)
        document = parse_json(
            body[:split], "the body" if header is None else "the body's inference header"
        )
        if not isinstance(document, dict):
            raise InvalidArgument("the inference request must be a JSON object", field="body")
        check_json_values(_without_tensor_data(document))
        request_id = document.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise InvalidArgument("id must be a string", field="id")
        inputs = _rest_inputs(document.get("inputs"), memoryview(body)[split:])
        parameters = document.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidArgument("parameters must be an object", field="parameters")
        check_request_parameters(parameters)
        binary_default = _flag(parameters.get("binary_data_output"), "binary_data_output")
        outputs = _rest_outputs(document.get("outputs"), binary_default)
        deadline = request_deadline(parameters.get("timeout"))
        result = await self.service.oip_infer(
            tenant,
            model,
            version,
            inputs,
            outputs,
            nbytes=len(body),
            deadline=deadline,
            precision=parameters.get("precision"),
            quality=parameters,
            routing_key=parameters.get(ROUTING_KEY_PARAMETER),
        )
        return _rest_response(result, request_id)


def _without_tensor_data(document: dict[str, Any]) -> dict[str, Any]:
    """The inference request without its inputs' `data` (checked by `_rest_inputs` element
    by element), for `check_json_values`."""
    inputs = document.get("inputs")
    if not isinstance(inputs, list):
        return document
    lean = [
        {k: v for k, v in spec.items() if k != "data"} if isinstance(spec, dict) else spec
        for spec in inputs
    ]
    return {**document, "inputs": lean}


def _flag(value: object, name: str) -> bool:
    """A boolean parameter (Triton's `binary_data`, `binary_data_output`): absent is False.

    Raises:
        InvalidArgument: naming `name`, for anything but true or false (the string "false"
            would otherwise read as true).
    """
    if value is None or isinstance(value, bool):
        return bool(value)
    raise InvalidArgument(
        f"parameters.{name} must be true or false, not {echo(json.dumps(value))[:40]}",
        field=name,
    )


def _elements(data: Any, shape: list[int], name: str) -> list[Any]:
    """Row-major elements of a JSON tensor's `data`: a flat list of as many elements as
    `shape` holds, or lists nested as `shape` is (the protocol allows both).

    Raises:
        InvalidArgument: naming input `name`, for data that is not a list, or neither flat
            with the shape's count nor nested as the shape (ragged rows included).
    """
    if not isinstance(data, list):
        raise InvalidArgument(
            f"input {echo(name)!r}: data must be a list, flat or nested as the shape {shape}",
            field=name,
        )
    if not any(isinstance(element, list) for element in data):
        if len(data) != math.prod(shape):
            raise InvalidArgument(
                f"input {echo(name)!r}: {len(data)} elements for shape {shape}", field=name
            )
        return data
    level: list[Any] = [data]
    for size in shape:
        if not all(isinstance(item, list) and len(item) == size for item in level):
            break
        level = [element for item in level for element in item]
    else:
        if not any(isinstance(element, list) for element in level):
            return level
    raise InvalidArgument(
        f"input {echo(name)!r}: data is neither flat nor nested as the shape {shape}",
        field=name,
    )


def _rest_inputs(inputs: Any, binary: memoryview) -> list[InputTensor]:
    """The inputs of a REST inference request, their data from JSON or the binary part.

    Raises:
        InvalidArgument: naming the input, for a malformed one.
    """
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise InvalidArgument("inputs must be a list of tensors", field="inputs")
    tensors, offset = [], 0
    for spec in inputs:
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidArgument("each input needs a name and a datatype", field="inputs")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise InvalidArgument(f"input {echo(name)!r}: shape must be integers", field=name)
        count = image_count(shape, datatype, name)
        parameters = spec.get("parameters") or {}
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        data: list[bytes] | np.ndarray
        if size is not None:
            if "data" in spec:  # which of the two is the input is nowhere written
                raise InvalidArgument(
                    f"input {echo(name)!r}: data beside binary_data_size; send one of them",
                    field=name,
                )
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgument(
                    f"input {echo(name)!r}: binary_data_size must be a whole number of bytes "
                    f"(a JSON integer), not {echo(json.dumps(size))}",
                    field=name,
                )
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"input {echo(name)!r}: binary_data_size {size} is past the body (its "
                    f"binary part holds {len(binary) - offset} more bytes)",
                    field=name,
                )
            raw = bytes(binary[offset : offset + size])
            offset += size
            if datatype == "BYTES":
                data = deserialize_bytes(raw, count, name)
            else:
                data = pixels(np.frombuffer(raw, dtype=np.uint8), shape, name)
        else:
            elements = _elements(spec.get("data"), shape, name)
            if datatype == "BYTES":
                data = [_base64(e, name, i) for i, e in enumerate(elements)]
            else:
                if not all(type(e) is int and 0 <= e <= 255 for e in elements):
                    raise InvalidArgument(
                        f"input {echo(name)!r}: UINT8 data must be integers 0..255", field=name
                    )
                data = pixels(np.asarray(elements, dtype=np.uint8), shape, name)
        tensors.append(InputTensor(name, datatype, shape, data))
    if offset != len(binary):
        raise InvalidArgument(
            f"{len(binary) - offset} bytes after the last binary input", field="body"
        )
    return tensors


def _base64(element: Any, name: str, index: int) -> bytes:
    if not isinstance(element, str):
        raise InvalidArgument(
            f"input {echo(name)!r}[{index}]: BYTES elements in JSON are base64 strings",
            field=f"{name[:64]}[{index}]",
        )
    try:
        return pybase64.b64decode(element, validate=True)
    except binascii.Error:
        raise InvalidArgument(
            f"input {echo(name)!r}[{index}]: not base64 (send images as base64 in JSON, or as "
            "binary data with binary_data_size)",
            field=f"{name[:64]}[{index}]",
        ) from None


def _rest_outputs(outputs: Any, binary_default: bool) -> list[RequestedOutput]:
    if outputs is None:
        return [RequestedOutput("probabilities", binary=binary_default)] if binary_default else []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidArgument("outputs must be a list of {name, parameters}", field="outputs")
    wanted: list[RequestedOutput] = []
    for output in outputs:
        parameters = output.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidArgument("output parameters must be an object", field="outputs")
        name = output.get("name", "")
        if not isinstance(name, str):
            raise InvalidArgument("each output's name must be a string", field="outputs")
        if any(asked.name == name for asked in wanted):
            raise InvalidArgument(f"output {echo(name)!r} is asked for twice", field="outputs")
        binary = parameters.get("binary_data")
        wanted.append(
            RequestedOutput(
                name,
                classification_count(parameters.get("classification")),
                binary_default if binary is None else _flag(binary, "binary_data"),
            )
        )
    return wanted


def _rest_response(result: InferResult, request_id: str | None) -> Response:
    """The REST inference response: JSON, or JSON then binary outputs (binary extension)."""
    outputs, blobs = [], []
    for output in result.outputs:
        tensor: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": output.shape,
        }
        if output.binary:
            raw = output.raw()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif isinstance(output.data, np.ndarray):
            tensor["data"] = output.data.ravel().tolist()
        else:
            tensor["data"] = [s.decode() for s in output.data]
        outputs.append(tensor)
    document: dict[str, Any] = {
        "model_name": result.model,
        "model_version": result.version,
        "outputs": outputs,
    }
    if result.parameters:
        document["parameters"] = result.parameters
    if request_id:
        document["id"] = request_id
    header = json.dumps(document, allow_nan=False).encode()  # RFC 8259: never a bare NaN
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
