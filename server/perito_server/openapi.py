"""The OpenAPI 3.0 document of the HTTP doors (`GET /openapi.json`, `perito_server.doors`).

Written by hand, next to the routes it describes; `tests/integration/test_http_api.py` runs
schemathesis against it over a real socket (no 5xx, every answer's status, content type and
body as documented). Error bodies: Google AIP-193 (`/v1`), and the Open Inference Protocol's
`{"error": "<message>"}` with the same fields beside it (`/v2`).
"""

from __future__ import annotations

from typing import Any

JSON = "application/json"
ERROR_STATUSES = {
    "400": "INVALID_ARGUMENT or FAILED_PRECONDITION: the request is malformed; the details name "
    "the field (`images[3]`, an input's name).",
    "401": "UNAUTHENTICATED: no bearer token, or an unknown one.",
    "403": "PERMISSION_DENIED: the token's tenant lacks the role, the model or the location.",
    "404": "NOT_FOUND: no such model, version, alias or job (or another tenant's job).",
    "413": "RESOURCE_EXHAUSTED (REQUEST_TOO_LARGE): the body is over the server's limit.",
    "429": "RESOURCE_EXHAUSTED: a full queue or the tenant's quota; see Retry-After.",
    "503": "UNAVAILABLE: the server drains, or storage or the broker is down.",
    "504": "DEADLINE_EXCEEDED.",
}


def _parameter(
    name: str, where: str, description: str, schema: dict[str, Any], **more: Any
) -> dict[str, Any]:
    """An OpenAPI parameter object `in` path (required), query or header."""
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "description": description,
        "schema": schema,
        **more,
    }


STRING = {"type": "string"}
NUMBER = {"type": "number"}
BOOLEAN = {"type": "boolean"}
MODEL_PARAMETER = _parameter(
    "model",
    "path",
    "The model's name; `name@version` (or `?version=`) picks a version or alias.",
    STRING,
)
VERSION_PARAMETER = _parameter(
    "version", "path", "A version number or an alias (`production`).", STRING
)
TIMEOUT_PARAMETER = _parameter(
    "X-Server-Timeout",
    "header",
    "Seconds the caller will wait (as Google's HTTP APIs read it; gRPC's deadline): images "
    "still waiting then are given up and the call answers 504.",
    {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 86400},
)
JOB_PARAMETER = _parameter("job", "path", "The job's id.", STRING)
PAGE_PARAMETERS = [
    _parameter(
        "page_size",
        "query",
        "At most this many per page (0: the default).",
        {"type": "integer", "minimum": 0, "maximum": 1000},
    ),
    _parameter("page_token", "query", "`next_page_token` of the previous page.", STRING),
]
TENSOR_METADATA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": STRING,
        "datatype": STRING,
        "shape": {"type": "array", "items": {"type": "integer"}},
    },
}
ANY_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}


def _errors(codes: str, *, oip: bool) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/OipError" if oip else "#/components/schemas/Error"}
    return {
        code: {"description": ERROR_STATUSES[code], "content": {JSON: {"schema": schema}}}
        for code in codes.split()
    }


def _ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"200": {"description": description, "content": {JSON: {"schema": schema}}}}


def _page(key: str, item: dict[str, Any]) -> dict[str, Any]:
    """A page of a list: `{key: [item, ...], "next_page_token": "..."}` (AIP-158)."""
    return {
        "type": "object",
        "properties": {
            key: {"type": "array", "items": item},
            "next_page_token": STRING,
        },
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def openapi_document(version: str) -> dict[str, Any]:
    """The OpenAPI 3.0.3 document of every HTTP route, for server version `version`."""
    authed = "400 401 403 404 429 503"
    open_op: dict[str, Any] = {"security": []}
    oip_model = {
        "get": {
            "operationId": "oipModelMetadata",
            "summary": "OIP: a model's inputs and outputs",
            "tags": ["Open Inference Protocol"],
            "responses": {**_ok(_ref("ModelMetadata")), **_errors(authed, oip=True)},
        }
    }
    oip_ready = {
        "get": {
            "operationId": "oipModelReady",
            "summary": "OIP: whether a model version can be inferred (400 when it cannot)",
            "tags": ["Open Inference Protocol"],
            "responses": {
                **_ok(_ref("Ready")),
                "400": {
                    "description": "Not ready (no such version), or a malformed name.",
                    "content": {JSON: {"schema": {"anyOf": [_ref("Ready"), _ref("OipError")]}}},
                },
                **_errors("401 403 404 429 503", oip=True),
            },
        }
    }
    oip_infer = {
        "post": {
            "operationId": "oipModelInfer",
            "summary": "OIP: classify images",
            "description": "One input: `images` BYTES [N] or [N,1] (base64 strings in JSON, or "
            "binary with `binary_data_size` and the Inference-Header-Content-Length header), "
            "or `pixels` UINT8 [N,H,W,3]. Output `probabilities` FP32 [N,C]; with the "
            "parameter `classification`: k, BYTES [N,k] of `score:index:label`.",
            "tags": ["Open Inference Protocol"],
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": _ref("InferenceRequest")}},
            },
            "responses": {
                **_ok(_ref("InferenceResponse")),
                **_errors(authed + " 413 504", oip=True),
            },
        }
    }
    paths: dict[str, Any] = {
        "/v2/health/live": {
            "get": {
                **open_op,
                "operationId": "oipLive",
                "summary": "OIP: the server is alive",
                "tags": ["Open Inference Protocol"],
                "responses": _ok(_ref("Live")),
            }
        },
        "/v2/health/ready": {
            "get": {
                **open_op,
                "operationId": "oipReady",
                "summary": "OIP: the server takes requests (503 while it drains)",
                "tags": ["Open Inference Protocol"],
                "responses": {
                    **_ok(_ref("Ready")),
                    "503": {
                        "description": "Draining.",
                        "content": {JSON: {"schema": _ref("Ready")}},
                    },
                },
            }
        },
        "/v2": {
            "get": {
                "operationId": "oipServerMetadata",
                "summary": "OIP: server name, version and extensions",
                "tags": ["Open Inference Protocol"],
                "responses": {
                    **_ok(_ref("ServerMetadata")),
                    **_errors("401 403 429", oip=True),
                },
            }
        },
        "/v2/models/{model}": {"parameters": [MODEL_PARAMETER], **oip_model},
        "/v2/models/{model}/versions/{version}": {
            "parameters": [MODEL_PARAMETER, VERSION_PARAMETER],
            **oip_model,
        },
        "/v2/models/{model}/ready": {"parameters": [MODEL_PARAMETER], **oip_ready},
        "/v2/models/{model}/versions/{version}/ready": {
            "parameters": [MODEL_PARAMETER, VERSION_PARAMETER],
            **oip_ready,
        },
        "/v2/models/{model}/infer": {"parameters": [MODEL_PARAMETER], **oip_infer},
        "/v2/models/{model}/versions/{version}/infer": {
            "parameters": [MODEL_PARAMETER, VERSION_PARAMETER],
            **oip_infer,
        },
        "/v1/models/{model}:classify": {
            "parameters": [MODEL_PARAMETER, TIMEOUT_PARAMETER],
            "post": {
                "operationId": "classify",
                "summary": "Classify images (Classify's answer, as JSON)",
                "tags": ["JSON API"],
                "requestBody": {
                    "required": True,
                    "content": {
                        JSON: {"schema": _ref("ClassifyRequest")},
                        "multipart/form-data": {"schema": _ref("ClassifyUpload")},
                    },
                },
                "responses": {
                    **_ok(_ref("ClassifyResponse")),
                    **_errors(authed + " 413 504", oip=False),
                },
            },
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "summary": "The models the caller may use",
                "tags": ["JSON API"],
                "parameters": PAGE_PARAMETERS,
                "responses": {**_ok(_ref("ModelList")), **_errors(authed, oip=False)},
            }
        },
        "/v1/models/{model}": {
            "parameters": [MODEL_PARAMETER],
            "get": {
                "operationId": "getModel",
                "summary": "A model, its versions, aliases and model cards",
                "tags": ["JSON API"],
                "responses": {**_ok(_ref("Model")), **_errors(authed, oip=False)},
            },
        },
        "/v1/jobs": {
            "post": {
                "operationId": "submitJob",
                "summary": "Submit a bulk job (SubmitJobRequest in the protobuf JSON mapping)",
                "tags": ["JSON API"],
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _ref("JobRequest")}},
                },
                "responses": {
                    **_ok(_ref("Job")),
                    **_errors(authed + " 413", oip=False),
                    "409": {
                        "description": "ALREADY_EXISTS.",
                        "content": {JSON: {"schema": _ref("Error")}},
                    },
                },
            },
            "get": {
                "operationId": "listJobs",
                "summary": "The caller's jobs, newest first",
                "tags": ["JSON API"],
                "parameters": [
                    *PAGE_PARAMETERS,
                    _parameter(
                        "state",
                        "query",
                        "Only jobs in these states (queued, running, ...).",
                        {"type": "array", "items": STRING},
                        style="form",
                        explode=True,
                    ),
                ],
                "responses": {**_ok(_ref("JobList")), **_errors(authed, oip=False)},
            },
        },
        "/v1/jobs/{job}": {
            "parameters": [JOB_PARAMETER],
            "get": {
                "operationId": "getJob",
                "summary": "A job's state and counts",
                "tags": ["JSON API"],
                "responses": {**_ok(_ref("Job")), **_errors(authed, oip=False)},
            },
        },
        "/v1/jobs/{job}/results": {
            "parameters": [JOB_PARAMETER],
            "get": {
                "operationId": "listJobResults",
                "summary": "A job's per-image results, in input order",
                "description": "A page of JSON; with `Accept: application/x-ndjson`, every "
                "result (all pages), one JSON object per line.",
                "tags": ["JSON API"],
                "parameters": [
                    *PAGE_PARAMETERS,
                    _parameter(
                        "filter",
                        "query",
                        "Only the items that failed, or only those that succeeded.",
                        {"type": "string", "enum": ["failed", "succeeded"]},
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {
                            JSON: {"schema": _ref("ResultPage")},
                            "application/x-ndjson": {"schema": STRING},
                        },
                    },
                    **_errors(authed, oip=False),
                },
            },
        },
        "/v1/jobs/{job}:cancel": {
            "parameters": [JOB_PARAMETER],
            "post": {
                "operationId": "cancelJob",
                "summary": "Cancel a job: its unfinished items end `cancelled`",
                "tags": ["JSON API"],
                "responses": {**_ok(_ref("Job")), **_errors(authed, oip=False)},
            },
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Perito HTTP API",
            "version": version,
            "description": "The Open Inference Protocol (KServe v2) REST endpoints and a JSON "
            "API over the same models, batchers and tenants as the perito.v1 gRPC service.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(),
        },
    }


def _schemas() -> dict[str, Any]:
    detail = {"type": "object", "properties": {"@type": STRING}}
    status_fields = {
        "code": {"type": "integer"},
        "status": STRING,
        "details": {"type": "array", "items": detail},
    }
    prediction = {
        "type": "object",
        "properties": {
            "label": STRING,
            "class_index": {"type": "integer"},
            "probability": NUMBER,
        },
    }
    image = {
        "type": "object",
        "required": ["content"],
        "properties": {
            "content": {"type": "string", "format": "byte", "description": "The image, base64."},
            "id": STRING,
        },
    }
    tensor = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": STRING,
            "datatype": {"type": "string", "enum": ["BYTES", "UINT8"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "parameters": ANY_OBJECT,
            "data": {"type": "array", "items": {}},
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message", "status"],
                    "properties": {"message": STRING, **status_fields},
                }
            },
        },
        "OipError": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": STRING, **status_fields},
        },
        "Live": {"type": "object", "properties": {"live": BOOLEAN}},
        "Ready": {"type": "object", "properties": {"ready": BOOLEAN}},
        "ServerMetadata": {
            "type": "object",
            "properties": {
                "name": STRING,
                "version": STRING,
                "extensions": {"type": "array", "items": STRING},
            },
        },
        "ModelMetadata": {
            "type": "object",
            "properties": {
                "name": STRING,
                "versions": {"type": "array", "items": STRING},
                "platform": STRING,
                "inputs": {"type": "array", "items": TENSOR_METADATA},
                "outputs": {"type": "array", "items": TENSOR_METADATA},
            },
        },
        "InferenceRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": STRING,
                "parameters": ANY_OBJECT,
                "inputs": {"type": "array", "items": tensor},
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"name": STRING, "parameters": ANY_OBJECT},
                    },
                },
            },
        },
        "InferenceResponse": {
            "type": "object",
            "properties": {
                "model_name": STRING,
                "model_version": STRING,
                "id": STRING,
                "outputs": {"type": "array", "items": {"type": "object"}},
            },
        },
        # The same fields as JSON (base64 images) and as a multipart upload (files).
        **{
            name: {
                "type": "object",
                "required": ["images"],
                "properties": {
                    "images": {"type": "array", "items": images},
                    "version": STRING,
                    "top_k": {"type": "integer", "minimum": 0},
                    "confidence_threshold": {"type": "number", "minimum": 0, "maximum": 1},
                },
            }
            for name, images in (
                ("ClassifyRequest", image),
                ("ClassifyUpload", {"type": "string", "format": "binary"}),
            )
        },
        "ClassifyResponse": {
            "type": "object",
            "properties": {
                "model": STRING,
                "model_version": STRING,
                "confidence_threshold": NUMBER,
                "results": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "image_id": STRING,
                            "predictions": {"type": "array", "items": prediction},
                            "margin": NUMBER,
                            "normalized_entropy": NUMBER,
                            "uncertain": BOOLEAN,
                            "first_frame_only": BOOLEAN,
                            "form": STRING,
                        },
                    },
                },
            },
        },
        "Model": {"type": "object", "properties": {"name": STRING}},
        "ModelList": _page("models", _ref("Model")),
        "JobRequest": {
            "type": "object",
            "required": ["model"],
            "description": "perito.v1.SubmitJobRequest in the protobuf JSON mapping: one of "
            "images / uris / prefix / manifest_uri.",
            "properties": {
                "model": STRING,
                "version": STRING,
                "images": {
                    "type": "object",
                    "properties": {"images": {"type": "array", "items": image}},
                },
                "uris": {
                    "type": "object",
                    "properties": {"uris": {"type": "array", "items": STRING}},
                },
                "prefix": STRING,
                "manifest_uri": STRING,
                "output_uri": STRING,
                "top_k": {"type": "integer", "minimum": 0},
                "request_id": STRING,
            },
        },
        "Job": {
            "type": "object",
            "properties": {
                "id": STRING,
                "state": STRING,
                "model": STRING,
                "model_version": STRING,
                "total_items": {"type": "string", "description": "int64, as a JSON string"},
            },
        },
        "JobList": _page("jobs", _ref("Job")),
        "ResultPage": _page("results", {"type": "object"}),
    }
