"""The OpenAPI 3.0 document of the HTTP API (`GET /openapi.json`, `perito_server.http_api`).

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
MODEL_PARAMETER = {
    "name": "model",
    "in": "path",
    "required": True,
    "description": "The model's name; `name@version` (or `?version=`) picks a version or alias.",
    "schema": {"type": "string"},
}
VERSION_PARAMETER = {
    "name": "version",
    "in": "path",
    "required": True,
    "description": "A version number or an alias (`production`).",
    "schema": {"type": "string"},
}
TIMEOUT_PARAMETER = {
    "name": "X-Server-Timeout",
    "in": "header",
    "required": False,
    "description": "Seconds the caller will wait (as Google's HTTP APIs read it; gRPC's "
    "deadline): images still waiting then are given up and the call answers 504.",
    "schema": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 86400},
}
JOB_PARAMETER = {
    "name": "job",
    "in": "path",
    "required": True,
    "description": "The job's id.",
    "schema": {"type": "string"},
}
PAGE_PARAMETERS = [
    {
        "name": "page_size",
        "in": "query",
        "description": "At most this many per page (0: the default).",
        "schema": {"type": "integer", "minimum": 0, "maximum": 1000},
    },
    {
        "name": "page_token",
        "in": "query",
        "description": "`next_page_token` of the previous page.",
        "schema": {"type": "string"},
    },
]
TENSOR_METADATA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
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
                    {
                        "name": "state",
                        "in": "query",
                        "description": "Only jobs in these states (queued, running, ...).",
                        "schema": {"type": "array", "items": {"type": "string"}},
                        "style": "form",
                        "explode": True,
                    },
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
                    {
                        "name": "filter",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["failed", "succeeded"]},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {
                            JSON: {"schema": _ref("ResultPage")},
                            "application/x-ndjson": {"schema": {"type": "string"}},
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
    detail = {"type": "object", "properties": {"@type": {"type": "string"}}}
    status_fields = {
        "code": {"type": "integer"},
        "status": {"type": "string"},
        "details": {"type": "array", "items": detail},
    }
    prediction = {
        "type": "object",
        "properties": {
            "label": {"type": "string"},
            "class_index": {"type": "integer"},
            "probability": {"type": "number"},
        },
    }
    image = {
        "type": "object",
        "required": ["content"],
        "properties": {
            "content": {"type": "string", "format": "byte", "description": "The image, base64."},
            "id": {"type": "string"},
        },
    }
    tensor = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
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
                    "properties": {"message": {"type": "string"}, **status_fields},
                }
            },
        },
        "OipError": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}, **status_fields},
        },
        "Live": {"type": "object", "properties": {"live": {"type": "boolean"}}},
        "Ready": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
        "ServerMetadata": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            },
        },
        "ModelMetadata": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": TENSOR_METADATA},
                "outputs": {"type": "array", "items": TENSOR_METADATA},
            },
        },
        "InferenceRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": ANY_OBJECT,
                "inputs": {"type": "array", "items": tensor},
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "parameters": ANY_OBJECT},
                    },
                },
            },
        },
        "InferenceResponse": {
            "type": "object",
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "outputs": {"type": "array", "items": {"type": "object"}},
            },
        },
        "ClassifyRequest": {
            "type": "object",
            "required": ["images"],
            "properties": {
                "images": {"type": "array", "items": image},
                "version": {"type": "string"},
                "top_k": {"type": "integer", "minimum": 0},
                "confidence_threshold": {"type": "number", "minimum": 0, "maximum": 1},
            },
        },
        "ClassifyUpload": {
            "type": "object",
            "required": ["images"],
            "properties": {
                "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                "version": {"type": "string"},
                "top_k": {"type": "integer", "minimum": 0},
                "confidence_threshold": {"type": "number", "minimum": 0, "maximum": 1},
            },
        },
        "ClassifyResponse": {
            "type": "object",
            "properties": {
                "model": {"type": "string"},
                "model_version": {"type": "string"},
                "confidence_threshold": {"type": "number"},
                "results": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "image_id": {"type": "string"},
                            "predictions": {"type": "array", "items": prediction},
                            "margin": {"type": "number"},
                            "normalized_entropy": {"type": "number"},
                            "uncertain": {"type": "boolean"},
                            "first_frame_only": {"type": "boolean"},
                            "form": {"type": "string"},
                        },
                    },
                },
            },
        },
        "Model": {"type": "object", "properties": {"name": {"type": "string"}}},
        "ModelList": {
            "type": "object",
            "properties": {
                "models": {"type": "array", "items": _ref("Model")},
                "next_page_token": {"type": "string"},
            },
        },
        "JobRequest": {
            "type": "object",
            "required": ["model"],
            "description": "perito.v1.SubmitJobRequest in the protobuf JSON mapping: one of "
            "images / uris / prefix / manifest_uri.",
            "properties": {
                "model": {"type": "string"},
                "version": {"type": "string"},
                "images": {
                    "type": "object",
                    "properties": {"images": {"type": "array", "items": image}},
                },
                "uris": {
                    "type": "object",
                    "properties": {"uris": {"type": "array", "items": {"type": "string"}}},
                },
                "prefix": {"type": "string"},
                "manifest_uri": {"type": "string"},
                "output_uri": {"type": "string"},
                "top_k": {"type": "integer", "minimum": 0},
                "request_id": {"type": "string"},
            },
        },
        "Job": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "state": {"type": "string"},
                "model": {"type": "string"},
                "model_version": {"type": "string"},
                "total_items": {"type": "string", "description": "int64, as a JSON string"},
            },
        },
        "JobList": {
            "type": "object",
            "properties": {
                "jobs": {"type": "array", "items": _ref("Job")},
                "next_page_token": {"type": "string"},
            },
        },
        "ResultPage": {
            "type": "object",
            "properties": {
                "results": {"type": "array", "items": {"type": "object"}},
                "next_page_token": {"type": "string"},
            },
        },
    }
