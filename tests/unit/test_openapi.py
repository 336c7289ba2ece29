"""The OpenAPI document is derived: every route of the real HTTP app is in it, the JSON API's
schemas are the perito.v1 messages' fields, and what the door writes fits them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, cast

import jsonschema
import pytest
from google.api import field_behavior_pb2
from google.protobuf import descriptor_pool
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from perito.v1 import classify_pb2, jobs_pb2, models_pb2
from perito_core.access.tenancy import Tenants
from perito_core.errors import InvalidArgument
from perito_server import paging
from perito_server.auth import TenantInterceptor
from perito_server.doors.http_edge import HttpEdge, http_app
from perito_server.doors.json_api import JsonApi, _json
from perito_server.doors.oip_rest import OipRest
from perito_server.inference import InferenceService

# Making the routes calls nothing of the inference service (the handlers do, per request),
# so the doors are given none: the app, its routes and its document are the server's own.
NO_SERVICE = cast(InferenceService, None)


def _doors(tenants: Tenants | None = None) -> list[list[Any]]:
    """The doors' routes on a server with `tenants` (None: a token, so calls need one)."""
    tenants = Tenants(tokens=["t0ken"]) if tenants is None else tenants
    edge = HttpEdge(TenantInterceptor(tenants), None, 1 << 20)
    return [OipRest(NO_SERVICE, edge).routes(), JsonApi(NO_SERVICE, edge).routes()]


@pytest.fixture(scope="module")
def app() -> Starlette:
    return http_app(*_doors())


@pytest.fixture(scope="module")
def document(app: Starlette) -> dict[str, Any]:
    response = TestClient(app).get("/openapi.json")
    assert response.status_code == 200
    return cast(dict[str, Any], response.json())


def _route_operations(app: Starlette) -> Iterator[tuple[str, str]]:
    for route in app.routes:
        assert isinstance(route, Route)
        for method in sorted(route.methods or ()):  # None: a path's other methods (405)
            if method != "HEAD":  # Starlette answers HEAD wherever GET is
                yield route.path_format, method.lower()


def test_every_route_of_the_app_is_in_the_document_and_nothing_else(
    app: Starlette, document: dict[str, Any]
) -> None:
    served = set(_route_operations(app))
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert served == documented
    # The doors' routes, not a handful: both HTTP doors and the document itself.
    assert ("/v1/models/{model}:classify", "post") in served
    assert ("/v2/models/{model}/versions/{version}/infer", "post") in served
    assert ("/openapi.json", "get") in served
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)) == len(served)


def test_a_route_made_without_its_operation_fails_the_app() -> None:
    async def extra(request: Request) -> Response:
        return JSONResponse({})

    with pytest.raises(TypeError, match="/v1/extra has no OpenAPI operation"):
        http_app(*_doors(), [Route("/v1/extra", extra, methods=["GET"])])


def test_the_bearer_token_is_asked_for_only_where_the_server_has_tenants(
    document: dict[str, Any],
) -> None:
    assert document["security"] == [{"bearer": []}]
    classify = document["paths"]["/v1/models/{model}:classify"]["post"]
    assert "security" not in classify and "401" in classify["responses"]
    assert document["paths"]["/v2/health/live"]["get"]["security"] == []

    anonymous = TestClient(http_app(*_doors(Tenants()))).get("/openapi.json").json()
    assert "security" not in anonymous and "securitySchemes" not in anonymous["components"]
    for item in anonymous["paths"].values():
        for operation in item.values():
            assert operation["security"] == [] and "401" not in operation["responses"]


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/v1/jobs", "GET, HEAD, OPTIONS, POST"),
        ("/v1/jobs/j1:cancel", "OPTIONS, POST"),
        ("/v1/jobs/j1", "GET, HEAD, OPTIONS"),
        ("/v1/models/m:classify", "OPTIONS, POST"),
        ("/v2/models/m/versions/1/infer", "OPTIONS, POST"),
    ],
)
def test_each_path_allows_exactly_its_documented_methods(
    app: Starlette, document: dict[str, Any], path: str, allow: str
) -> None:
    client = TestClient(app)
    options = client.options(path)
    assert options.status_code == 204 and options.headers["allow"] == allow
    documented = next(item for template, item in document["paths"].items() if _fits(template, path))
    assert {m.upper() for m in documented} == set(allow.split(", ")) - {"HEAD", "OPTIONS"}
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
        if method not in allow:  # before any token is asked for
            refused = client.request(method, path)
            assert refused.status_code == 405 and refused.headers["allow"] == allow
            assert "is not served here" in str(refused.json()["error"])


def _fits(template: str, path: str) -> bool:
    pattern = re.sub(r"{\w+}", "[^/:]+", template)
    return re.fullmatch(pattern, path) is not None


def test_an_unknown_path_and_a_colon_in_a_parameter_are_404_json(app: Starlette) -> None:
    client = TestClient(app)
    for path in ("/v1/nothing", "/v1/jobs/a:b", "/v1/models/m:frobnicate"):
        missing = client.get(path)
        assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"


def test_path_parameters_are_those_of_the_path(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        for operation in item.values():
            names = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            parts = path.replace(":", "/").split("/")
            assert names == {part[1:-1] for part in parts if part.startswith("{")}


def _message_components(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: schema
        for name, schema in document["components"]["schemas"].items()
        if schema.get("title", "").startswith("perito.v1.")
    }


def test_each_message_schema_has_exactly_its_messages_fields(document: dict[str, Any]) -> None:
    pool = descriptor_pool.Default()
    messages = _message_components(document)
    for schema in messages.values():
        descriptor = pool.FindMessageTypeByName(schema["title"])
        assert list(schema["properties"]) == [field.name for field in descriptor.fields]
    # Every JSON API answer and body is one of them, found through its $ref.
    answers = {
        "/v1/models/{model}:classify": ("post", "ClassifyResponse"),
        "/v1/models": ("get", "ListModelsResponse"),
        "/v1/models/{model}": ("get", "Model"),
        "/v1/jobs": ("get", "ListJobsResponse"),
        "/v1/jobs/{job}": ("get", "Job"),
        "/v1/jobs/{job}/results": ("get", "ListJobResultsResponse"),
        "/v1/jobs/{job}:cancel": ("post", "Job"),
    }
    for path, (method, message) in answers.items():
        ok = document["paths"][path][method]["responses"]["200"]["content"]["application/json"]
        assert ok["schema"] == {"$ref": f"#/components/schemas/{message}"}
    post_jobs = document["paths"]["/v1/jobs"]["post"]
    assert post_jobs["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/SubmitJobRequest"
    )
    # The messages those hold are there too: a Job's, a result's, a version's.
    assert {"Job", "JobItemResult", "Classification", "Prediction", "ModelVersion"} <= set(messages)


def _validator(document: dict[str, Any], name: str) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(
        {"$ref": f"#/components/schemas/{name}", "components": document["components"]},
        format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER,
    )


def _timestamp(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=250_000_000)


def test_what_the_json_api_writes_fits_the_schemas(document: dict[str, Any]) -> None:
    """Every kind of field, set, in the door's own JSON mapping: int64 as strings, enums by
    name, timestamps, maps, a Struct, nested and repeated messages."""
    classification = classify_pb2.Classification(
        image_id="a.jpg",
        predictions=[classify_pb2.Prediction(label="cat", class_index=3, probability=0.75)],
        margin=0.5,
        uncertain=True,
        form="fp32",
    )
    card = Struct()
    card.update({"metrics": {"top1": 0.9}, "intended_use": "photos"})
    answers = {
        "Job": jobs_pb2.Job(
            id="j1",
            state=jobs_pb2.JOB_STATE_RUNNING,
            total_items=2**40,
            create_time=_timestamp(1_700_000_000),
            result_uris=["s3://b/r"],
            labels={"team": "claims"},
        ),
        "ClassifyResponse": classify_pb2.ClassifyResponse(
            model="m", model_version="1", results=[classification], confidence_threshold=0.2
        ),
        "ListJobResultsResponse": jobs_pb2.ListJobResultsResponse(
            results=[
                jobs_pb2.JobItemResult(
                    index=7, state=jobs_pb2.ITEM_STATE_SUCCEEDED, classification=classification
                )
            ],
            next_page_token="8",
        ),
        "ListModelsResponse": models_pb2.ListModelsResponse(
            models=[
                models_pb2.Model(
                    name="m",
                    aliases={"production": "1"},
                    versions=[
                        models_pb2.ModelVersion(
                            version="1", labels=["cat"], create_time=_timestamp(1), card=card
                        )
                    ],
                )
            ]
        ),
        "ListJobsResponse": jobs_pb2.ListJobsResponse(jobs=[jobs_pb2.Job()]),
    }
    for name, message in answers.items():
        _validator(document, name).validate(_json(message))


@pytest.mark.parametrize(
    ("name", "wrong"),
    [
        ("Job", {"total_items": 5}),  # int64 is a string in the JSON mapping
        ("Job", {"state": 2}),  # enums by name
        ("Job", {"create_time": "yesterday"}),
        ("Job", {"labels": {"team": 1}}),
        ("ListJobResultsResponse", {"results": [{"classification": {"margin": "high"}}]}),
        ("ClassifyRequest", {"images": []}),  # at least one image, as the server checks
        ("ClassifyRequest", {"images": [{"content": "eA=="}], "top_k": -1}),
        ("SubmitJobRequest", {"model": "m", "confidence_threshold": 1.5}),
        ("SubmitJobRequest", {"images": {"images": [{"uri": "s3://b/k"}]}}),  # no model
        ("SubmitJobRequest", {"model": "", "uris": {"uris": ["s3://b/k"]}}),
        ("SubmitJobRequest", {"model": "m", "images": {"images": []}}),  # no image
        ("SubmitJobRequest", {"model": "m", "uris": {"uris": []}}),
    ],
)
def test_the_schemas_refuse_what_the_mapping_or_the_server_refuses(
    document: dict[str, Any], name: str, wrong: dict[str, Any]
) -> None:
    assert not _validator(document, name).is_valid(wrong)


def test_the_fields_the_protos_require_are_required_and_not_empty(
    document: dict[str, Any],
) -> None:
    """`(google.api.field_behavior) = REQUIRED` in proto/ is the one source: each such field
    of a message in the document is required, a list or string of it at least one long;
    except where the route fills it from its path (Classify's model)."""
    pool = descriptor_pool.Default()
    schemas = document["components"]["schemas"]
    found = {}
    for name, schema in _message_components(document).items():
        descriptor = pool.FindMessageTypeByName(schema["title"])
        for field in descriptor.fields:
            behaviors = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
            if field_behavior_pb2.REQUIRED in behaviors:
                found[f"{name}.{field.name}"] = schema
    assert set(found) == {
        "ClassifyRequest.model",
        "ClassifyRequest.images",
        "SubmitJobRequest.model",
        "InlineImages.images",
        "UriList.uris",
    }
    assert schemas["ClassifyRequest"]["required"] == ["images"]  # the model is the path's
    assert schemas["ClassifyRequest"]["properties"]["images"]["minItems"] == 1
    assert schemas["SubmitJobRequest"]["required"] == ["model"]
    assert schemas["SubmitJobRequest"]["properties"]["model"]["minLength"] == 1
    assert schemas["UriList"]["properties"]["uris"]["minItems"] == 1
    classify = document["paths"]["/v1/models/{model}:classify"]["post"]
    assert "model" not in classify["requestBody"]["content"]["application/json"]["schema"].get(
        "required", []
    )


def test_page_size_is_documented_from_the_paging_rule(document: dict[str, Any]) -> None:
    """Each list's page_size: the bounds the JSON API accepts, the call's default page, and
    its largest page in the description, all from perito_server.paging (Google AIP-158)."""
    lists = {
        "/v1/models": paging.LIST_MODELS,
        "/v1/jobs": paging.LIST_JOBS,
        "/v1/jobs/{job}/results": paging.LIST_JOB_RESULTS,
    }
    for path, sizes in lists.items():
        (page_size,) = [p for p in document["paths"][path]["get"]["parameters"]
                        if p["name"] == "page_size"]  # fmt: skip
        schema = page_size["schema"]
        assert (schema["minimum"], schema["maximum"]) == (0, 2**31 - 1), path
        assert schema["default"] == sizes.default, path
        assert (
            f"above {sizes.largest}, the largest page, {sizes.largest}"
            in (page_size["description"])
        ), path
    pages = [
        p["name"]
        for item in document["paths"].values()
        for operation in item.values()
        if isinstance(operation, dict)
        for p in operation.get("parameters", [])
        if p["name"] == "page_size"
    ]
    assert len(pages) == len(lists)  # no other list call to keep to the rule


def test_the_paging_rule() -> None:
    rule = paging.PageSize(default=100, largest=1000)
    assert [rule.of(n) for n in (0, 1, 1000, 1001, 2**31 - 1)] == [100, 1, 1000, 1000, 1000]
    with pytest.raises(InvalidArgument) as refused:
        rule.of(-1)
    assert refused.value.field == "page_size" and "page_size" in str(refused.value)
