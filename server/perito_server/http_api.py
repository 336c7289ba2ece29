"""HTTP: the Open Inference Protocol's REST endpoints and a JSON API, one Starlette app.

Served by uvicorn on `--http-port`, in the same process and event loop as the gRPC server
(`perito_server.app`), so both share the model pool, the dynamic batchers and their limits.
Each route is a door (DESIGN.md, "One inference core, several front doors"): it translates
HTTP into the call the gRPC handler makes (`PeritoServicer.classify`, `submit_job`, ...,
`OipCore.infer`) and the answer back; it never decodes an image or batches.

Routes (the OpenAPI document, `GET /openapi.json`, describes each):

- Open Inference Protocol, REST (KServe v2, `inference_rest.md` of
  https://github.com/kserve/open-inference-protocol): `GET /v2/health/live`,
  `/v2/health/ready`, `/v2`, `/v2/models/{model}[/versions/{version}]`, `.../ready`, and
  `POST .../infer` with JSON tensors or Triton's binary tensor extension (the
  `Inference-Header-Content-Length` header: that many bytes of JSON, then each binary
  tensor's bytes in order, sized by its `binary_data_size` parameter; what `tritonclient.http`
  sends and reads). In JSON, BYTES images are base64 strings (raw image bytes are not text).
- A JSON API for people: `POST /v1/models/{model}:classify` (multipart upload, or JSON with
  base64 images; the answer has `Classify`'s fields), `GET /v1/models`,
  `GET /v1/models/{model}` (with the card), `POST /v1/jobs`, `GET /v1/jobs`,
  `GET /v1/jobs/{job}`, `GET /v1/jobs/{job}/results` (paged JSON, or every page as NDJSON with
  `Accept: application/x-ndjson`), `POST /v1/jobs/{job}:cancel`.

Auth: `Authorization: Bearer <token>`, checked by the gRPC interceptor's own code
(`TenantInterceptor.authorize`, with the gRPC method each route stands for) before the body is
read; the model in the path is checked against the tenant's list. Errors: the HTTP status of
the gRPC code (`errors.HTTP_STATUS`) and Google AIP-193's JSON error; `/v2` answers keep the
protocol's `{"error": "<message>"}` string (what OIP clients print) and add the AIP-193
`code`, `status` and `details` beside it. A body over `max_message_bytes` is refused while it
streams in, 413 RESOURCE_EXHAUSTED.

Speed: uvicorn parses HTTP with `httptools` (C), and JSON images are base64-decoded by
`pybase64` (`parse_classify`); `bench/protocols.py` measures each door against `Classify`.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import numpy as np
import pybase64
import uvicorn
from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from perito.v1 import classify_pb2, image_pb2, jobs_pb2, models_pb2
from perito_core.access.tenancy import Tenant
from perito_core.errors import ErrorCode, InvalidArgument, PeritoError
from perito_core.logs import REQUEST_ID
from perito_server.auth import TenantInterceptor
from perito_server.errors import as_perito_error, echo, request_id, to_http
from perito_server.oip import (
    EXTENSIONS,
    InferResult,
    InputTensor,
    OipCore,
    RequestedOutput,
    classification_count,
    deserialize_bytes,
    image_count,
    model_metadata,
    server_version,
)
from perito_server.openapi import openapi_document
from perito_server.settings import ServerSettings

log = logging.getLogger(__name__)

PERITO = "/perito.v1.Perito/"
OIP = "/inference.GRPCInferenceService/"
NDJSON = "application/x-ndjson"
HEADER_LENGTH = "inference-header-content-length"
# The proto fields query parameters fill are int32.
MAX_INT32 = 2**31 - 1
MAX_TIMEOUT_S = 86400

Handler = Callable[[Request, Tenant], Awaitable[Response]]


class BodyTooLarge(PeritoError, code=ErrorCode.RESOURCE_EXHAUSTED, reason="REQUEST_TOO_LARGE"):
    """A request body over the server's bound (answered 413)."""


def _json(message: Message) -> dict[str, Any]:
    """A protobuf message in its JSON mapping, field names as in the proto, zeros included."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _int_param(request: Request, name: str, default: int = 0) -> int:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise InvalidArgument(f"{name} must be a whole number", field=name) from None
    if not 0 <= value <= MAX_INT32:
        raise InvalidArgument(f"{name} must be in [0, {MAX_INT32}]", field=name)
    return value


def _deadline(request: Request) -> float | None:
    """`time.monotonic()` by which the caller wants its answer: its `X-Server-Timeout` header
    (seconds, as Google's HTTP APIs take it), or None without one.

    Raises:
        InvalidArgument: naming the header, when it is not a number of seconds in (0, 86400].
    """
    text = request.headers.get("x-server-timeout")
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise InvalidArgument(
            f"X-Server-Timeout: {echo(text)!r} is not a number of seconds in (0, {MAX_TIMEOUT_S}]",
            field="X-Server-Timeout",
        )
    return time.monotonic() + seconds


class HttpApi:
    """The routes, over the same servicer, OIP core and tenants as the gRPC server.

    Args:
        core: the OIP door (its `servicer` is the `perito.v1` servicer).
        authorizer: the gRPC server's interceptor, whose `authorize` checks tokens and roles.
        max_body_bytes: the largest body read (the gRPC `max_message_bytes`).
    """

    def __init__(self, core: OipCore, authorizer: TenantInterceptor, max_body_bytes: int) -> None:
        self.core = core
        self.servicer = core.servicer
        self.authorizer = authorizer
        self.max_body_bytes = max_body_bytes

    def app(self) -> Starlette:
        """The Starlette application."""
        oip_model = "/v2/models/{model}"
        oip_version = "/v2/models/{model}/versions/{version}"
        door = self._door
        routes = [
            Route("/openapi.json", self._openapi, methods=["GET"]),
            Route("/v2/health/live", door(None, self._live, oip=True), methods=["GET"]),
            Route("/v2/health/ready", door(None, self._ready, oip=True), methods=["GET"]),
            Route("/v2", door(OIP + "ServerMetadata", self._server_metadata, oip=True)),
            *(
                route
                for path in (oip_model, oip_version)
                for route in (
                    Route(
                        path,
                        door(OIP + "ModelMetadata", self._model_metadata, model=True, oip=True),
                        methods=["GET"],
                    ),
                    Route(
                        path + "/ready",
                        door(OIP + "ModelReady", self._model_ready, model=True, oip=True),
                        methods=["GET"],
                    ),
                    Route(
                        path + "/infer",
                        door(OIP + "ModelInfer", self._infer, model=True, oip=True),
                        methods=["POST"],
                    ),
                )
            ),
            Route(
                "/v1/models/{model}:classify",
                door(PERITO + "Classify", self._classify, model=True),
                methods=["POST"],
            ),
            Route("/v1/models", door(PERITO + "ListModels", self._list_models), methods=["GET"]),
            Route(
                "/v1/models/{model}",
                door(PERITO + "GetModel", self._get_model, model=True),
                methods=["GET"],
            ),
            Route("/v1/jobs", door(PERITO + "SubmitJob", self._submit_job), methods=["POST"]),
            Route("/v1/jobs", door(PERITO + "ListJobs", self._list_jobs), methods=["GET"]),
            Route("/v1/jobs/{job}", door(PERITO + "GetJob", self._get_job), methods=["GET"]),
            Route(
                "/v1/jobs/{job}/results",
                door(PERITO + "ListJobResults", self._job_results),
                methods=["GET"],
            ),
            Route(
                "/v1/jobs/{job}:cancel",
                door(PERITO + "CancelJob", self._cancel_job),
                methods=["POST"],
            ),
        ]
        return Starlette(routes=routes)

    # The edge every route shares: request id, auth, errors, metrics.

    def _door(
        self, method: str | None, handler: Handler, *, model: bool = False, oip: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        """`handler` behind auth (for `method`'s role; None: open), the path's model checked,
        errors answered as JSON, the call counted in the metrics as `HTTP <method>`."""
        name = "HTTP " + (method.rpartition("/")[2] if method else handler.__name__.strip("_"))

        async def endpoint(request: Request) -> Response:
            started, code = time.perf_counter(), "OK"
            call_id = request_id(request.headers.get("x-request-id", ""))
            REQUEST_ID.set(call_id)
            try:
                tenant = Tenant.unrestricted("anonymous")
                if method is not None:
                    metadata = [
                        ("authorization", request.headers.get("authorization", "")),
                        ("x-request-id", call_id),  # for the audit of a refused change
                    ]
                    tenant = self.authorizer.authorize(method, metadata)
                    if model:
                        tenant.require_model(self._model_ref(request)[0])
                response = await handler(request, tenant)
            except Exception as exc:  # noqa: BLE001 - every error becomes an answer
                error = as_perito_error(exc, name)
                code = error.code.name
                response = self._error(error, oip)
            finally:
                metrics = self.servicer.metrics
                if metrics is not None:
                    metrics.observe_call(name, code, time.perf_counter() - started)
            response.headers["x-request-id"] = call_id
            return response

        return endpoint

    @staticmethod
    def _error(error: PeritoError, oip: bool) -> Response:
        status, body, headers = to_http(error)
        if isinstance(error, BodyTooLarge):
            status = 413
            body["error"]["code"] = status
        if oip:  # the protocol's {"error": "<message>"}, the AIP-193 fields beside it
            body = {**body["error"], "error": body["error"]["message"]}
            body.pop("message")
        return JSONResponse(body, status, headers=headers)

    @staticmethod
    def _model_ref(request: Request) -> tuple[str, str]:
        """(model, version) of the path: `/versions/{v}`, `name@version`, or `?version=`."""
        name = request.path_params["model"]
        version = request.path_params.get("version")
        if version is None:
            name, _, version = name.partition("@")
            version = version or request.query_params.get("version", "")
        return name, version

    async def _body(self, request: Request) -> bytes:
        """The body, refused (413) once it grows past `max_body_bytes`, while streaming."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"the body is {declared} bytes; the limit is {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _json_body(self, request: Request) -> Any:
        body = await self._body(request)
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidArgument(f"the body is not JSON: {error}", field="body") from None

    # Open Inference Protocol

    async def _openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(server_version()))

    async def _live(self, request: Request, tenant: Tenant) -> Response:
        return JSONResponse({"live": True})

    async def _ready(self, request: Request, tenant: Tenant) -> Response:
        ready = self.core.ready
        return JSONResponse({"ready": ready}, 200 if ready else 503)

    async def _server_metadata(self, request: Request, tenant: Tenant) -> Response:
        return JSONResponse(
            {"name": "perito", "version": server_version(), "extensions": list(EXTENSIONS)}
        )

    async def _model_metadata(self, request: Request, tenant: Tenant) -> Response:
        return JSONResponse(model_metadata(await self.core.manifest(*self._model_ref(request))))

    async def _model_ready(self, request: Request, tenant: Tenant) -> Response:
        ready = await self.core.model_ready(*self._model_ref(request))
        return JSONResponse({"ready": ready}, 200 if ready else 400)

    async def _infer(self, request: Request, tenant: Tenant) -> Response:
        model, version = self._model_ref(request)
        body = await self._body(request)
        header = request.headers.get(HEADER_LENGTH)
        split = len(body)
        if header is not None:
            if not header.isdigit() or int(header) > len(body):
                raise InvalidArgument(
                    f"{HEADER_LENGTH}: {echo(header)!r} is not a length within the body",
                    field=HEADER_LENGTH,
                )
            split = int(header)
        try:
            document = json.loads(body[:split])
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidArgument(
                f"the inference header is not JSON: {error}", field="body"
            ) from None
        if not isinstance(document, dict):
            raise InvalidArgument("the inference request must be a JSON object", field="body")
        inputs = _rest_inputs(document.get("inputs"), memoryview(body)[split:])
        parameters = document.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidArgument("parameters must be an object", field="parameters")
        binary_default = bool(parameters.get("binary_data_output"))
        outputs = _rest_outputs(document.get("outputs"), binary_default)
        # Triton's `timeout` request parameter (tritonclient.http's `timeout=`), microseconds.
        timeout = parameters.get("timeout")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0
        ):
            raise InvalidArgument(
                "timeout must be a positive count of microseconds", field="timeout"
            )
        deadline = time.monotonic() + timeout / 1e6 if timeout else None
        result = await self.core.infer(
            tenant,
            model,
            version,
            inputs,
            outputs,
            nbytes=len(body),
            deadline=deadline,
            precision=parameters.get("precision"),
        )
        request_id = document.get("id")
        return _rest_response(result, request_id if isinstance(request_id, str) else None)

    # The JSON API

    async def _classify(self, request: Request, tenant: Tenant) -> Response:
        model, version = self._model_ref(request)
        message = classify_pb2.ClassifyRequest(model=model, version=version)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            await self._read_multipart(request, message)
        else:
            document = await self._json_body(request)
            if not isinstance(document, dict):
                raise InvalidArgument("the body must be a JSON object", field="body")
            document = {**document, "model": model}
            if version:
                document["version"] = version
            parse_classify(document, message)
        response = await self.servicer.classify(message, tenant, _deadline(request))
        return JSONResponse(_json(response))

    async def _read_multipart(
        self, request: Request, message: classify_pb2.ClassifyRequest
    ) -> None:
        """Files (any field name; their file names become the image ids) and the fields
        `version`, `top_k`, `confidence_threshold`, the body bounded first."""
        body = await self._body(request)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        limit = self.servicer.settings.max_images_per_request
        try:
            form = await Request(request.scope, replay).form(
                max_files=limit + 1, max_fields=16, max_part_size=self.max_body_bytes
            )
        except Exception as error:  # noqa: BLE001 - Starlette raises HTTPException for bad forms
            raise InvalidArgument(
                f"the multipart body is malformed: {error}", field="body"
            ) from None
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    content = await value.read()
                    message.images.append(image_pb2.Image(content=content, id=value.filename or ""))
                elif key == "version" and not message.version:
                    message.version = value
                elif key == "top_k":
                    message.top_k = _form_number(key, value, int)
                elif key == "confidence_threshold":
                    message.confidence_threshold = _form_number(key, value, float)
                else:
                    raise InvalidArgument(f"unknown form field {echo(key)!r}", field=key)
        finally:
            await form.close()

    async def _list_models(self, request: Request, tenant: Tenant) -> Response:
        message = models_pb2.ListModelsRequest(
            page_size=_int_param(request, "page_size"),
            page_token=request.query_params.get("page_token", ""),
        )
        return JSONResponse(_json(await self.servicer.list_models(message, tenant)))

    async def _get_model(self, request: Request, tenant: Tenant) -> Response:
        model, _ = self._model_ref(request)
        described, cards = await self.servicer.get_model_cards(model)
        answer = _json(described)
        for version, card in zip(answer["versions"], cards, strict=True):
            version["card"] = card.model_dump(mode="json")  # as manifest.json types it
        return JSONResponse(answer)

    async def _submit_job(self, request: Request, tenant: Tenant) -> Response:
        document = await self._json_body(request)
        message = jobs_pb2.SubmitJobRequest()
        _parse(document, message)
        if message.model:
            tenant.require_model(message.model)
        return JSONResponse(_json(await self.servicer.submit_job(message, tenant)))

    async def _list_jobs(self, request: Request, tenant: Tenant) -> Response:
        message = jobs_pb2.ListJobsRequest(
            page_size=_int_param(request, "page_size"),
            page_token=request.query_params.get("page_token", ""),
        )
        for state in request.query_params.getlist("state"):
            name = (
                state.upper()
                if state.upper().startswith("JOB_STATE_")
                else f"JOB_STATE_{state.upper()}"
            )
            if name not in jobs_pb2.JobState.keys():  # noqa: SIM118 - an enum wrapper, not a dict
                raise InvalidArgument(f"unknown job state {echo(state)!r}", field="state")
            message.states.append(cast(jobs_pb2.JobState, jobs_pb2.JobState.Value(name)))
        return JSONResponse(_json(await self.servicer.jobs.list_jobs(message, tenant)))

    async def _get_job(self, request: Request, tenant: Tenant) -> Response:
        job = await self.servicer.jobs.get(request.path_params["job"], tenant)
        return JSONResponse(_json(job))

    async def _cancel_job(self, request: Request, tenant: Tenant) -> Response:
        job = await self.servicer.cancel_job(request.path_params["job"], tenant)
        return JSONResponse(_json(job))

    async def _job_results(self, request: Request, tenant: Tenant) -> Response:
        filters = {
            "": jobs_pb2.RESULT_FILTER_UNSPECIFIED,
            "failed": jobs_pb2.RESULT_FILTER_FAILED,
            "succeeded": jobs_pb2.RESULT_FILTER_SUCCEEDED,
        }
        chosen = request.query_params.get("filter", "")
        if chosen not in filters:
            raise InvalidArgument("filter is failed or succeeded", field="filter")
        message = jobs_pb2.ListJobResultsRequest(
            job_id=request.path_params["job"],
            page_size=_int_param(request, "page_size"),
            page_token=request.query_params.get("page_token", ""),
            filter=filters[chosen],
        )
        jobs = self.servicer.jobs
        first = await jobs.list_results(message, tenant)  # errors before any byte is sent
        if NDJSON not in request.headers.get("accept", ""):
            return JSONResponse(_json(first))

        async def lines() -> AsyncIterator[bytes]:
            page = first
            while True:
                for item in page.results:
                    yield json.dumps(_json(item)).encode() + b"\n"
                if not page.next_page_token:
                    return
                message.page_token = page.next_page_token
                page = await jobs.list_results(message, tenant)

        return StreamingResponse(lines(), media_type=NDJSON)


def _parse(document: Any, message: Message) -> None:
    """`document` (JSON) into `message`, as the protobuf JSON mapping reads it.

    Raises:
        InvalidArgument: not an object, an unknown field, or a value of the wrong type.
    """
    if not isinstance(document, dict):
        raise InvalidArgument("the body must be a JSON object", field="body")
    try:
        json_format.ParseDict(document, message)
    except json_format.ParseError as error:
        raise InvalidArgument(f"the body does not fit: {error}", field="body") from None


def parse_classify(document: dict[str, Any], message: classify_pb2.ClassifyRequest) -> None:
    """A JSON API classify body into `message`, exactly as the proto3 JSON mapping reads it.

    `images[i].content` that is plain padded base64 (and beside no `uri`) is decoded here by
    pybase64's SIMD decoder, ~10 us for a 60 kB photo where `json_format` (binascii) takes
    ~300 us, most of what this door costs beyond the binary ones; the rest (URL-safe, unpadded
    or wrapped base64, a `uri`, a wrong type) is left to `json_format`. `document` is not changed.

    Raises:
        InvalidArgument: an unknown field or a value of the wrong type (`_parse`).
    """
    images = document.get("images")
    contents: dict[int, bytes] = {}
    if isinstance(images, list):
        rest = []
        for index, image in enumerate(images):
            content = image.get("content") if isinstance(image, dict) else None
            if isinstance(content, str) and "uri" not in image:
                try:
                    contents[index] = pybase64.b64decode(content, validate=True)
                except binascii.Error:
                    pass
                else:
                    image = {key: value for key, value in image.items() if key != "content"}
            rest.append(image)
        document = {**document, "images": rest}
    _parse(document, message)
    for index, content in contents.items():
        message.images[index].content = content


def _form_number(key: str, value: str, kind: type[int] | type[float]) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise InvalidArgument(f"{key} must be a number", field=key) from None


def _flatten(data: Any) -> list[Any]:
    """Row-major elements of a JSON tensor's `data` (flat or nested lists)."""
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    for element in data:
        flat.extend(_flatten(element) if isinstance(element, list) else [element])
    return flat


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
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidArgument(
                    f"input {echo(name)!r}: binary_data_size {echo(str(size))} is past the body",
                    field=name,
                )
            raw = bytes(binary[offset : offset + size])
            offset += size
            if datatype == "BYTES":
                data = deserialize_bytes(raw, count, name)
            else:
                data = _pixels(np.frombuffer(raw, dtype=np.uint8), shape, name)
        else:
            elements = _flatten(spec.get("data"))
            if datatype == "BYTES":
                data = [_base64(e, name, i) for i, e in enumerate(elements)]
                if len(data) != count:
                    raise InvalidArgument(
                        f"input {echo(name)!r}: {len(data)} elements for shape {shape}", field=name
                    )
            else:
                if not all(isinstance(e, int) and 0 <= e <= 255 for e in elements):
                    raise InvalidArgument(
                        f"input {echo(name)!r}: UINT8 data must be integers 0..255", field=name
                    )
                data = _pixels(np.asarray(elements, dtype=np.uint8), shape, name)
        tensors.append(InputTensor(name, datatype, shape, data))
    if offset != len(binary):
        raise InvalidArgument(
            f"{len(binary) - offset} bytes after the last binary input", field="body"
        )
    return tensors


def _pixels(flat: np.ndarray, shape: list[int], name: str) -> np.ndarray:
    if flat.size != int(np.prod(shape)):
        raise InvalidArgument(
            f"input {echo(name)!r}: {flat.size} values for shape {shape}", field=name
        )
    return flat.reshape(shape)


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
    wanted = []
    for output in outputs:
        parameters = output.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidArgument("output parameters must be an object", field="outputs")
        wanted.append(
            RequestedOutput(
                str(output.get("name", "")),
                classification_count(parameters.get("classification")),
                bool(parameters.get("binary_data", binary_default)),
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
    if request_id:
        document["id"] = request_id
    header = json.dumps(document).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


class _Uvicorn(uvicorn.Server):
    """uvicorn's server without its signal handling: `perito serve` owns SIGTERM / SIGINT and
    stops HTTP with gRPC (`RunningServer.stop`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """uvicorn serving an ASGI app as a task on the running event loop (the gRPC server's)."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], port: int) -> None:
        self._server = server
        self._task = task
        self.port = port

    @classmethod
    async def start(cls, app: Starlette, settings: ServerSettings, *, grace: float) -> HttpServer:
        """Bind `settings.host:settings.http_port` (TLS with the gRPC port's files) and serve.

        Raises:
            RuntimeError: the port could not be bound.
        """
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.http_port or 0,
            log_level="warning",
            access_log=False,
            http="httptools",
            lifespan="off",
            ssl_certfile=settings.tls_cert_file,
            ssl_keyfile=settings.tls_key_file,
            timeout_graceful_shutdown=max(1, math.ceil(grace)),
            server_header=False,
        )
        # Bound here rather than by uvicorn, which answers a busy port with sys.exit(1).
        host, port = settings.host, settings.http_port or 0
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host.strip("[]"), port, type=socket.SOCK_STREAM
            )[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as error:
            raise RuntimeError(f"could not bind HTTP on {host}:{port}: {error}") from error
        port = sock.getsockname()[1]
        server = _Uvicorn(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="http")
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError(f"HTTP on {host}:{port} stopped before it started")
            await asyncio.sleep(0.01)
        return cls(server, task, port)

    async def stop(self) -> None:
        """Stop accepting, let requests in progress finish (within the grace), then return."""
        self._server.should_exit = True
        await self._task
