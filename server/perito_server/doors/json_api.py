"""The JSON API for people and the web page, a door.

`POST /v1/models/{model}:classify` (multipart upload, or JSON with base64 images; the answer
has `Classify`'s fields), `GET /v1/models`, `GET /v1/models/{model}` (with the card),
`POST /v1/jobs`, `GET /v1/jobs`, `GET /v1/jobs/{job}`, `GET /v1/jobs/{job}/results` (paged
JSON, or every page as NDJSON with `Accept: application/x-ndjson`),
`POST /v1/jobs/{job}:cancel`. Bodies and answers are the perito.v1 messages in the protobuf
JSON mapping (field names as in the proto).

It only translates: JSON, forms and query parameters into perito.v1 requests for the
inference service, its answers back into JSON. Auth, errors and bodies are the HTTP edge's
(`doors.http_edge`).
"""

from __future__ import annotations

import binascii
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pybase64
from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute

from perito.v1 import classify_pb2, image_pb2, jobs_pb2, models_pb2
from perito_core.access.tenancy import Tenant
from perito_core.errors import InvalidArgument
from perito_core.quality import THRESHOLD_FIELDS
from perito_server import paging
from perito_server.doors.http_edge import PERITO, HttpEdge, check_json_values, model_ref
from perito_server.errors import echo
from perito_server.inference import InferenceService
from perito_server.jobs import JOB_ID
from perito_server.model_pool import MAX_ROUTING_KEY_CHARS
from perito_server.openapi import Named, Operation, Parameter

NDJSON = "application/x-ndjson"
# The proto fields query parameters fill are int32.
MAX_INT32 = 2**31 - 1
MAX_TIMEOUT_S = 86400
# `GET /v1/jobs/{job}/results?filter=`
RESULT_FILTERS = {
    "": jobs_pb2.RESULT_FILTER_UNSPECIFIED,
    "failed": jobs_pb2.RESULT_FILTER_FAILED,
    "succeeded": jobs_pb2.RESULT_FILTER_SUCCEEDED,
}


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


# What the OpenAPI document says of each route (`perito_server.openapi`): the bodies are the
# messages themselves, the checks those the inference service makes before any work.
TAG = "JSON API"
ERRORS = "400 401 403 404 429 503"


def _page(sizes: paging.PageSize, items: str) -> tuple[Parameter, Parameter]:
    """A list call's `page_size` and `page_token` query parameters, described from `sizes`.

    The schema's bounds are what the server accepts; a size above the largest page is
    accepted and served as the largest (AIP-158), so the largest page is told in words.
    """
    size = Parameter(
        "page_size",
        "query",
        f"At most this many {items} per page. 0 or absent: {sizes.default}; above "
        f"{sizes.largest}, the largest page, {sizes.largest} (Google AIP-158); negative or "
        f"above {MAX_INT32}: 400 naming page_size.",
        {
            "type": "integer",
            "format": "int32",
            "minimum": 0,
            "maximum": MAX_INT32,
            "default": sizes.default,
        },
    )
    token = Parameter(
        "page_token", "query", "`next_page_token` of the previous page.", {"type": "string"}
    )
    return size, token


JOB = Parameter(
    "job", "path", "The job's id.", {"type": "string", "pattern": f"^{JOB_ID.pattern}$"}
)
ANSWER_CHECKS = {
    "top_k": {"minimum": 0},
    "confidence_threshold": {"minimum": 0, "maximum": 1},
}
ROUTING_KEY_CHECK = {"maxLength": MAX_ROUTING_KEY_CHARS}
CLASSIFY = Operation(
    "classify",
    "Classify images (Classify's answer, as JSON)",
    TAG,
    classify_pb2.ClassifyResponse,
    ERRORS + " 413 504",
    parameters=(
        Parameter(
            "X-Server-Timeout",
            "header",
            "Seconds the caller will wait (as Google's HTTP APIs read it; gRPC's deadline): "
            "images still waiting then are given up and the call answers 504.",
            {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": MAX_TIMEOUT_S},
        ),
    ),
    body=classify_pb2.ClassifyRequest,
    body_also={
        "multipart/form-data": Named(
            "ClassifyUpload",
            {
                "type": "object",
                "required": ["images"],
                "description": "The image files (any field name; the file names become the "
                "image ids) and ClassifyRequest's fields below.",
                "properties": {
                    "images": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string", "format": "binary"},
                    },
                    "version": {"type": "string"},
                    "top_k": {"type": "integer", "maximum": MAX_INT32, **ANSWER_CHECKS["top_k"]},
                    "confidence_threshold": {
                        "type": "number",
                        **ANSWER_CHECKS["confidence_threshold"],
                    },
                    "routing_key": {"type": "string", **ROUTING_KEY_CHECK},
                },
            },
        )
    },
    checks={**ANSWER_CHECKS, "routing_key": ROUTING_KEY_CHECK},
    from_path=("model", "version"),
)
LIST_MODELS = Operation(
    "listModels",
    "The models the caller may use",
    TAG,
    models_pb2.ListModelsResponse,
    ERRORS,
    parameters=_page(paging.LIST_MODELS, "models"),
)
GET_MODEL = Operation(
    "getModel",
    "A model, its versions, aliases and model cards",
    TAG,
    models_pb2.Model,
    ERRORS,
)
SUBMIT_JOB = Operation(
    "submitJob",
    "Submit a bulk job",
    TAG,
    jobs_pb2.Job,
    ERRORS + " 409 413",
    body=jobs_pb2.SubmitJobRequest,
    checks={"chunk_size": {"minimum": 0}, **ANSWER_CHECKS},
)
LIST_JOBS = Operation(
    "listJobs",
    "The caller's jobs, newest first",
    TAG,
    jobs_pb2.ListJobsResponse,
    ERRORS,
    parameters=(
        *_page(paging.LIST_JOBS, "jobs"),
        Parameter(
            "state",
            "query",
            "Only jobs in these states (`queued`, or `JOB_STATE_QUEUED`; any case).",
            {
                "type": "array",
                "items": {
                    "type": "string",
                    "enum": [
                        name.removeprefix("JOB_STATE_").lower()
                        for name in jobs_pb2.JobState.keys()  # noqa: SIM118 - not a dict
                        if name != "JOB_STATE_UNSPECIFIED"  # refused: not a state a job is in
                    ],
                },
            },
        ),
    ),
)
GET_JOB = Operation(
    "getJob", "A job's state and counts", TAG, jobs_pb2.Job, ERRORS, parameters=(JOB,)
)
LIST_JOB_RESULTS = Operation(
    "listJobResults",
    "A job's per-image results, in input order",
    TAG,
    jobs_pb2.ListJobResultsResponse,
    ERRORS,
    parameters=(
        JOB,
        *_page(paging.LIST_JOB_RESULTS, "results"),
        Parameter(
            "filter",
            "query",
            "Only the items that failed, or only those that succeeded.",
            {"type": "string", "enum": [name for name in RESULT_FILTERS if name]},
        ),
    ),
    ok_also={NDJSON: Named("JobItemResultLines", {"type": "string"})},
    description="A page of JSON; with `Accept: application/x-ndjson`, every result (all "
    "pages), one JobItemResult per line.",
)
CANCEL_JOB = Operation(
    "cancelJob",
    "Cancel a job: its unfinished items end `cancelled`",
    TAG,
    jobs_pb2.Job,
    ERRORS,
    parameters=(JOB,),
)


class JsonApi:
    """The JSON API's routes over `service`, behind `edge`."""

    def __init__(self, service: InferenceService, edge: HttpEdge) -> None:
        self.service = service
        self.edge = edge

    def routes(self) -> list[BaseRoute]:
        """The routes, each behind the edge with the gRPC method it stands for; one with
        `{model}` in its path only for a caller who may use that model."""
        table = (
            ("POST", "/v1/models/{model}:classify", CLASSIFY, "Classify", self._classify),
            ("GET", "/v1/models", LIST_MODELS, "ListModels", self._list_models),
            ("GET", "/v1/models/{model}", GET_MODEL, "GetModel", self._get_model),
            ("POST", "/v1/jobs", SUBMIT_JOB, "SubmitJob", self._submit_job),
            ("GET", "/v1/jobs", LIST_JOBS, "ListJobs", self._list_jobs),
            ("GET", "/v1/jobs/{job}", GET_JOB, "GetJob", self._get_job),
            (
                "GET",
                "/v1/jobs/{job}/results",
                LIST_JOB_RESULTS,
                "ListJobResults",
                self._job_results,
            ),
            ("POST", "/v1/jobs/{job}:cancel", CANCEL_JOB, "CancelJob", self._cancel_job),
        )
        return [
            self.edge.route(
                verb, path, operation, PERITO + method, handler, model="{model}" in path
            )
            for verb, path, operation, method, handler in table
        ]

    async def _classify(self, request: Request, tenant: Tenant) -> Response:
        model, version = model_ref(request)
        message = classify_pb2.ClassifyRequest(model=model, version=version)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            await self._read_multipart(request, message)
        else:
            document = await self.edge.json_body(request)
            if not isinstance(document, dict):
                raise InvalidArgument("the body must be a JSON object", field="body")
            # The path names the model (and a version after '@'); a body naming another is
            # refused, never overridden in silence.
            for field, from_path in (("model", model), ("version", version)):
                given = document.get(field)
                if from_path and given not in (None, "", from_path):
                    raise InvalidArgument(
                        f"{field}: the body names {echo(str(given))!r}, the path "
                        f"{echo(from_path)!r}; name it in the path only",
                        field=field,
                    )
            document = {**document, "model": model}
            if version:
                document["version"] = version
            parse_classify(document, message)
        response = await self.service.classify(message, tenant, _deadline(request))
        return JSONResponse(_json(response))

    async def _read_multipart(
        self, request: Request, message: classify_pb2.ClassifyRequest
    ) -> None:
        """Files (any field name; their file names become the image ids) and the fields
        `version`, `top_k`, `confidence_threshold`, `explain`, `routing_key`, `precision`,
        `quality_policy` and `quality_thresholds.<name>` (as the JSON body's), each at most
        once, the body bounded first."""
        body = await self.edge.body(request)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        limit = self.service.settings.max_images_per_request
        try:
            form = await Request(request.scope, replay).form(
                max_files=limit + 1, max_fields=16, max_part_size=self.edge.max_body_bytes
            )
        except Exception as error:  # noqa: BLE001 - Starlette raises HTTPException for bad forms
            raise InvalidArgument(
                f"the multipart body is malformed: {error}", field="body"
            ) from None
        seen: set[str] = set()
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    content = await value.read()
                    message.images.append(image_pb2.Image(content=content, id=value.filename or ""))
                    continue
                if key in seen:  # which one would count is nowhere written
                    raise InvalidArgument(f"{echo(key)}: given twice", field=key)
                seen.add(key)
                threshold = key.removeprefix("quality_thresholds.")
                if key == "version":
                    if message.version and value != message.version:
                        raise InvalidArgument(
                            f"version: the form names {echo(value)!r}, the path "
                            f"{echo(message.version)!r}; name it in one place",
                            field="version",
                        )
                    message.version = value
                elif key == "top_k":
                    message.top_k = _form_number(key, value, int)
                elif key == "confidence_threshold":
                    message.confidence_threshold = _form_number(key, value, float)
                elif key == "explain":
                    message.explain = _form_flag(key, value)
                elif key == "routing_key":
                    message.routing_key = value
                elif key == "precision":
                    message.precision = value
                elif key == "quality_policy":
                    message.quality_policy = _form_policy(key, value)
                elif threshold != key and threshold in THRESHOLD_FIELDS:
                    setattr(message.quality_thresholds, threshold, _form_number(key, value, float))
                else:
                    raise InvalidArgument(f"unknown form field {echo(key)!r}", field=key)
        finally:
            await form.close()

    async def _list_models(self, request: Request, tenant: Tenant) -> Response:
        message = models_pb2.ListModelsRequest(
            page_size=_int_param(request, "page_size"),
            page_token=request.query_params.get("page_token", ""),
        )
        return JSONResponse(_json(await self.service.list_models(message, tenant)))

    async def _get_model(self, request: Request, tenant: Tenant) -> Response:
        model, _ = model_ref(request)
        described, cards = await self.service.get_model_cards(model)
        answer = _json(described)
        for version, card in zip(answer["versions"], cards, strict=True):
            version["card"] = card.model_dump(mode="json")  # as manifest.json types it
        return JSONResponse(answer)

    async def _submit_job(self, request: Request, tenant: Tenant) -> Response:
        document = await self.edge.json_body(request)
        message = jobs_pb2.SubmitJobRequest()
        _parse(document, message)
        if message.model:
            tenant.require_model(message.model)
        return JSONResponse(_json(await self.service.submit_job(message, tenant)))

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
        return JSONResponse(_json(await self.service.list_jobs(message, tenant)))

    async def _get_job(self, request: Request, tenant: Tenant) -> Response:
        job = await self.service.get_job(request.path_params["job"], tenant)
        return JSONResponse(_json(job))

    async def _cancel_job(self, request: Request, tenant: Tenant) -> Response:
        job = await self.service.cancel_job(request.path_params["job"], tenant)
        return JSONResponse(_json(job))

    async def _job_results(self, request: Request, tenant: Tenant) -> Response:
        chosen = request.query_params.get("filter", "")
        if chosen not in RESULT_FILTERS:
            raise InvalidArgument("filter is failed or succeeded", field="filter")
        message = jobs_pb2.ListJobResultsRequest(
            job_id=request.path_params["job"],
            page_size=_int_param(request, "page_size"),
            page_token=request.query_params.get("page_token", ""),
            filter=RESULT_FILTERS[chosen],
        )
        first = await self.service.list_job_results(
            message, tenant
        )  # errors before any byte is sent
        if NDJSON not in request.headers.get("accept", ""):
            return JSONResponse(_json(first))

        async def lines() -> AsyncIterator[bytes]:
            page = first
            while True:
                for item in page.results:
                    yield json.dumps(_json(item), allow_nan=False).encode() + b"\n"
                if not page.next_page_token:
                    return
                message.page_token = page.next_page_token
                page = await self.service.list_job_results(message, tenant)

        return StreamingResponse(lines(), media_type=NDJSON)


def _parse(document: Any, message: Message) -> None:
    """`document` (JSON) into `message`, as the protobuf JSON mapping reads it.

    Raises:
        InvalidArgument: not an object, an unknown field, a value of the wrong type, a string
            with an unpaired surrogate or an integer beyond 64 bits (`check_json_values`,
            naming its field: `prefix`, `images[0].id`).
    """
    if not isinstance(document, dict):
        raise InvalidArgument("the body must be a JSON object", field="body")
    check_json_values(document)
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


def _form_flag(key: str, value: str) -> bool:
    """A form's yes-or-no field: `true`, `1`, `on` or `yes`, or `false`, `0`, `off`, `no`
    (any case).

    Raises:
        InvalidArgument: another value, naming `key`.
    """
    word = value.strip().lower()
    if word in ("true", "1", "on", "yes"):
        return True
    if word in ("false", "0", "off", "no"):
        return False
    raise InvalidArgument(f"{key} must be true or false, not {echo(value)!r}", field=key)


def _form_policy(key: str, value: str) -> classify_pb2.QualityPolicy:
    """A form's `quality_policy`: `flag` or `refuse`, or the enum's own names
    (`QUALITY_POLICY_REFUSE`), as the JSON body takes them."""
    name = value.strip().upper()
    name = name if name.startswith("QUALITY_POLICY_") else f"QUALITY_POLICY_{name}"
    try:
        return cast(classify_pb2.QualityPolicy, classify_pb2.QualityPolicy.Value(name))
    except ValueError:
        raise InvalidArgument(f"{key} must be flag or refuse", field=key) from None


def _form_number(key: str, value: str, kind: type[int] | type[float]) -> Any:
    try:
        number = kind(value)
    except ValueError:
        raise InvalidArgument(f"{key} must be a number", field=key) from None
    if kind is int and not -MAX_INT32 - 1 <= number <= MAX_INT32:  # the proto field's int32
        raise InvalidArgument(f"{key} must be a 32-bit whole number", field=key)
    return number
