"""The OpenAPI 3.0 document of the HTTP doors (`GET /openapi.json`), derived from the routes.

Nothing here lists the routes. Each door makes its routes with `HttpEdge.route`, which keeps
the route's `Operation` (its id, summary, parameters, bodies, error statuses) on the route as
an `OperationRoute`; `openapi_document` walks an app's routes and refuses a route made
without one, so the document cannot miss a route. Bodies that are perito.v1 messages are
described from their descriptors by `message_schema`, as the protobuf JSON mapping writes
them (what the JSON API speaks), so a new proto field is in the document without an edit
here; bodies that are not messages (the Open Inference Protocol's, the error bodies) are
`Named` schemas written once, beside the code that reads or writes them.

`tests/unit/test_openapi.py` checks the document against the routes and the descriptors;
`tests/integration/test_http_api.py` runs schemathesis against it over a real socket (no 5xx,
every answer's status, content type and body as documented).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from starlette.routing import BaseRoute, Route

JSON = "application/json"
# What each error status means, for the operations that answer it.
ERROR_STATUSES = {
    "400": "INVALID_ARGUMENT or FAILED_PRECONDITION: the request is malformed; the details name "
    "the field (`images[3]`, an input's name).",
    "401": "UNAUTHENTICATED: no bearer token, or an unknown one.",
    "403": "PERMISSION_DENIED: the token's tenant lacks the role, the model or the location.",
    "404": "NOT_FOUND: no such model, version, alias or job (or another tenant's job).",
    "409": "ALREADY_EXISTS.",
    "413": "RESOURCE_EXHAUSTED (REQUEST_TOO_LARGE): the body is over the server's limit.",
    "429": "RESOURCE_EXHAUSTED: a full queue or the tenant's quota; see Retry-After.",
    "503": "UNAVAILABLE: the server drains, or storage or the broker is down.",
    "504": "DEADLINE_EXCEEDED.",
}

MAX_INT32 = 2**31 - 1
MAX_UINT32 = 2**32 - 1
_T = FieldDescriptor
_INT32 = {"type": "integer", "format": "int32", "minimum": -MAX_INT32 - 1, "maximum": MAX_INT32}
_UINT32 = {"type": "integer", "minimum": 0, "maximum": MAX_UINT32}
_INT64 = {"type": "string", "pattern": "^-?[0-9]+$", "description": "int64, a decimal string"}
_UINT64 = {"type": "string", "pattern": "^[0-9]+$", "description": "uint64, a decimal string"}
# The proto3 JSON mapping of each scalar type
# (https://protobuf.dev/programming-guides/json/): 64-bit integers are decimal strings.
SCALARS: dict[int, dict[str, Any]] = {
    _T.TYPE_DOUBLE: {"type": "number", "format": "double"},
    _T.TYPE_FLOAT: {"type": "number", "format": "float"},
    _T.TYPE_INT32: _INT32,
    _T.TYPE_SINT32: _INT32,
    _T.TYPE_SFIXED32: _INT32,
    _T.TYPE_UINT32: _UINT32,
    _T.TYPE_FIXED32: _UINT32,
    _T.TYPE_INT64: _INT64,
    _T.TYPE_SINT64: _INT64,
    _T.TYPE_SFIXED64: _INT64,
    _T.TYPE_UINT64: _UINT64,
    _T.TYPE_FIXED64: _UINT64,
    _T.TYPE_BOOL: {"type": "boolean"},
    _T.TYPE_STRING: {"type": "string"},
    _T.TYPE_BYTES: {"type": "string", "format": "byte", "description": "base64"},
}
# The well-known types the perito.v1 messages hold, in their JSON mapping.
WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
}


@dataclass(frozen=True)
class Named:
    """A body schema written by hand (not a perito.v1 message): the component `name`."""

    name: str
    schema: Mapping[str, Any]


# A body: a perito.v1 message (its class), or a schema written by hand.
Body = type[Message] | Named


@dataclass(frozen=True)
class Parameter:
    """An OpenAPI parameter: in the path (required), the query or a header."""

    name: str
    where: Literal["path", "query", "header"]
    description: str
    schema: Mapping[str, Any]

    def openapi(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in": self.where,
            "required": self.where == "path",
            "description": self.description,
            "schema": dict(self.schema),
        }


@dataclass(frozen=True)
class Operation:
    """What the document says of one route, declared by its door where it makes the route.

    Args:
        operation_id: unique in the document (`classify`, `oipModelInfer`).
        summary: one line.
        tag: the door's name (`JSON API`, `Open Inference Protocol`).
        ok: the 200 answer's JSON body: a perito.v1 message class (`jobs_pb2.Job`), in the
            protobuf JSON mapping, or a `Named` schema.
        errors: the error statuses it answers, space-separated keys of `ERROR_STATUSES`.
        parameters: its query, header and path parameters (`HttpEdge.route` adds the path's
            `{model}` and `{version}`); the path's must be exactly those in the path.
        body: the request's JSON body, or None.
        body_also: the body in other content types (`multipart/form-data`).
        checks: JSON Schema keywords the server enforces on the body's fields, by field
            (`{"top_k": {"minimum": 0}}`); a field the body lacks fails the document. Which
            fields are required is the proto's (`message_schema`), not a check.
        from_path: the body's fields the route fills from its path (`model`): not required
            in the body, whatever the proto says.
        ok_also: the 200 answer in other content types (`application/x-ndjson`).
        answers: other statuses it answers with a body of their own: description and body.
        description: more than the summary, or "".
        open: no token needed (set by `HttpEdge.route`: a route with no gRPC method).
        error: the error body (set by `HttpEdge.route`: AIP-193's, or the protocol's).
    """

    operation_id: str
    summary: str
    tag: str
    ok: Body
    errors: str = ""
    parameters: tuple[Parameter, ...] = ()
    body: Body | None = None
    body_also: Mapping[str, Body] = dataclasses.field(default_factory=dict)
    checks: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    from_path: tuple[str, ...] = ()
    ok_also: Mapping[str, Body] = dataclasses.field(default_factory=dict)
    answers: Mapping[str, tuple[str, Body]] = dataclasses.field(default_factory=dict)
    description: str = ""
    open: bool = False
    error: Named | None = None


class OperationRoute(Route):
    """A Starlette route for one HTTP method, with the `Operation` that documents it."""

    def __init__(self, path: str, endpoint: Any, method: str, operation: Operation) -> None:
        super().__init__(path, endpoint, methods=[method])
        self.method = method
        self.operation = operation


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def message_schema(message: Descriptor, components: dict[str, Any]) -> dict[str, Any]:
    """A `$ref` to `message`'s JSON Schema, added to `components` (the document's
    `components.schemas`, by message name) with the messages its fields hold.

    As the protobuf JSON mapping writes a message (field names as in the proto): 32-bit
    integers as numbers, 64-bit ones as decimal strings, bytes as base64 strings (`format:
    byte`), enums as their value names, repeated fields as arrays, maps as objects with
    `additionalProperties`, `Timestamp` as an RFC 3339 `date-time` string, `Struct` as a free
    object, other messages as `$ref`s to their components. A field annotated
    `(google.api.field_behavior) = REQUIRED` in the proto (Google AIP-203: the server refuses
    the message without it) is `required`, and not empty: a list `minItems: 1`, a string
    `minLength: 1` (the JSON mapping cannot tell an empty string from an absent one).

    Raises:
        ValueError: two messages of one name (in different packages).
        NotImplementedError: a well-known type not in `WELL_KNOWN`.
    """
    name = message.name
    if name in components:
        if components[name].get("title") != message.full_name:
            raise ValueError(f"two schemas named {name}: {message.full_name} and another")
        return _ref(name)
    schema: dict[str, Any] = {"type": "object", "title": message.full_name}
    components[name] = schema  # before its fields: a message may hold itself
    schema["properties"] = {f.name: _field_schema(f, components) for f in message.fields}
    required = [f for f in message.fields if _is_required(f)]
    for field in required:
        schema["properties"][field.name].update(_not_empty(field))
    if required:
        schema["required"] = [f.name for f in required]
    groups = [
        o for o in message.oneofs if not (len(o.fields) == 1 and o.name == "_" + o.fields[0].name)
    ]
    if groups:
        schema["description"] = " ".join(
            f"At most one of {', '.join(f'`{f.name}`' for f in o.fields)} (oneof `{o.name}`)."
            for o in groups
        )
    return _ref(name)


def _is_required(field: FieldDescriptor) -> bool:
    behaviors = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
    return field_behavior_pb2.REQUIRED in behaviors


def _not_empty(field: FieldDescriptor) -> dict[str, Any]:
    """The keywords that refuse an empty value of `field` (a list, a string, bytes)."""
    if field.is_repeated:
        return {"minItems": 1} if field.message_type is None or not _is_map(field) else {}
    if field.type in (_T.TYPE_STRING, _T.TYPE_BYTES):
        return {"minLength": 1}
    return {}


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _field_schema(field: FieldDescriptor, components: dict[str, Any]) -> dict[str, Any]:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        value = _single_schema(entry.fields_by_name["value"], components)
        return {"type": "object", "additionalProperties": value}
    single = _single_schema(field, components)
    return {"type": "array", "items": single} if field.is_repeated else single


def _single_schema(field: FieldDescriptor, components: dict[str, Any]) -> dict[str, Any]:
    if field.enum_type is not None:
        return {"type": "string", "enum": [value.name for value in field.enum_type.values]}
    if field.message_type is not None:
        full_name = field.message_type.full_name
        if full_name in WELL_KNOWN:
            return dict(WELL_KNOWN[full_name])
        if full_name.startswith("google.protobuf."):
            raise NotImplementedError(f"no JSON Schema for {full_name} (add it to WELL_KNOWN)")
        return message_schema(field.message_type, components)
    return dict(SCALARS[field.type])


class _Components:
    """The document's `components.schemas`, filled as operations name their bodies."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}
        self._checked: dict[str, Any] = {}

    def ref(self, body: Body) -> dict[str, Any]:
        if not isinstance(body, Named):
            # upb's descriptor at run time, which the stubs type apart from Descriptor.
            return message_schema(cast(Descriptor, body.DESCRIPTOR), self.schemas)
        if self.schemas.setdefault(body.name, dict(body.schema)) != body.schema:
            raise ValueError(f"two schemas named {body.name}")
        return _ref(body.name)

    def checked(
        self, body: Body, checks: Mapping[str, Mapping[str, Any]], from_path: tuple[str, ...]
    ) -> dict[str, Any]:
        """`ref(body)`, its schema given `checks` and `from_path` (`Operation`'s)."""
        ref = self.ref(body)
        if not checks and not from_path:
            return ref
        name = ref["$ref"].rpartition("/")[2]
        schema = self._checked.get(name, self.schemas[name])
        properties = dict(schema["properties"])
        for field_name in (*checks, *from_path):
            if field_name not in properties:
                raise ValueError(f"{name} has no field {field_name!r} to check")
        for field_name, keywords in checks.items():
            properties[field_name] = {**properties[field_name], **keywords}
        for field_name in from_path:  # the path's value replaces the body's: any will do
            properties[field_name] = {
                k: v
                for k, v in properties[field_name].items()
                if k not in ("minLength", "minItems")
            }
        checked = {**schema, "properties": properties}
        required = [f for f in schema.get("required", ()) if f not in from_path]
        checked.pop("required", None)
        if required:
            checked["required"] = required
        if self._checked.setdefault(name, checked) != checked:
            raise ValueError(f"{name} is checked differently by two operations")
        self.schemas[name] = checked
        return ref


def _content(main: Body, more: Mapping[str, Body], components: _Components) -> dict[str, Any]:
    return {kind: {"schema": components.ref(body)} for kind, body in {JSON: main, **more}.items()}


def _operation(operation: Operation, components: _Components) -> dict[str, Any]:
    found: dict[str, Any] = {
        "operationId": operation.operation_id,
        "summary": operation.summary,
        "tags": [operation.tag],
    }
    if operation.description:
        found["description"] = operation.description
    if operation.open:
        found["security"] = []
    if operation.parameters:
        found["parameters"] = [p.openapi() for p in operation.parameters]
    if operation.body is not None:
        body = components.checked(operation.body, operation.checks, operation.from_path)
        content = {JSON: {"schema": body}}
        content.update(
            (kind, {"schema": components.ref(also)}) for kind, also in operation.body_also.items()
        )
        found["requestBody"] = {"required": True, "content": content}
    responses = {
        "200": {
            "description": "OK",
            "content": _content(operation.ok, operation.ok_also, components),
        }
    }
    for status, (description, answer) in operation.answers.items():
        responses[status] = {
            "description": description,
            "content": _content(answer, {}, components),
        }
    for status in operation.errors.split():
        if status in responses:
            raise ValueError(f"{operation.operation_id}: status {status} documented twice")
        if operation.error is None:
            raise ValueError(f"{operation.operation_id}: error statuses without an error body")
        responses[status] = {
            "description": ERROR_STATUSES[status],
            "content": _content(operation.error, {}, components),
        }
    found["responses"] = responses
    return found


def openapi_document(routes: Iterable[BaseRoute], version: str) -> dict[str, Any]:
    """The OpenAPI 3.0.3 document of `routes` (an app's), for server version `version`.

    Raises:
        TypeError: a route that is not an `OperationRoute` (made without its operation).
        ValueError: two operations of one id, or of one path and method; path parameters
            other than the path's; a check naming no field of its body; two bodies of one name.
    """
    components = _Components()
    paths: dict[str, dict[str, Any]] = {}
    ids: set[str] = set()
    secured = False
    for route in routes:
        if not isinstance(route, OperationRoute):
            where = getattr(route, "path", repr(route))
            raise TypeError(f"the route {where} has no OpenAPI operation (see HttpEdge.route)")
        operation = route.operation
        if operation.operation_id in ids:
            raise ValueError(f"two operations with the id {operation.operation_id}")
        ids.add(operation.operation_id)
        declared = sorted(p.name for p in operation.parameters if p.where == "path")
        if declared != sorted(route.param_convertors):
            raise ValueError(
                f"{route.path}: path parameters {sorted(route.param_convertors)}, "
                f"documented {declared}"
            )
        # What the route's convertor matches (one segment, no `:`), unless the parameter
        # says more (a model name's pattern).
        operation = dataclasses.replace(
            operation,
            parameters=tuple(
                p
                if p.where != "path"
                else dataclasses.replace(
                    p,
                    schema={"pattern": f"^{route.param_convertors[p.name].regex}$", **p.schema},
                )
                for p in operation.parameters
            ),
        )
        secured = secured or not operation.open
        methods = paths.setdefault(route.path_format, {})
        if route.method.lower() in methods:
            raise ValueError(f"two operations for {route.method} {route.path_format}")
        methods[route.method.lower()] = _operation(operation, components)
    # Without tenants every operation is open: no bearer token is asked for anywhere.
    security: dict[str, Any] = {"security": [{"bearer": []}]} if secured else {}
    schemes = {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Perito HTTP API",
            "version": version,
            "description": "The Open Inference Protocol (KServe v2) REST endpoints and a JSON "
            "API over the same models, batchers and tenants as the perito.v1 gRPC service. "
            "The JSON API's bodies are perito.v1 messages in the protobuf JSON mapping "
            "(docs/api.md describes each field).",
        },
        **security,
        "paths": paths,
        "components": {**(schemes if secured else {}), "schemas": components.schemas},
    }
