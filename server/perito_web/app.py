"""HTTP endpoints behind the page: JSON in front of the gRPC service, via `AsyncClient`."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

import perito

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
MAX_JOB_FILES = 5_000

# HTTP status for each SDK error: what a browser (or curl) expects.
HTTP_STATUS = {
    perito.InvalidArgumentError: 400,
    perito.UnauthenticatedError: 401,
    perito.PermissionDeniedError: 403,
    perito.NotFoundError: 404,
    perito.AlreadyExistsError: 409,
    perito.FailedPreconditionError: 409,
    perito.ResourceExhaustedError: 429,
    perito.UnavailableError: 503,
    perito.DeadlineExceededError: 504,
}


def to_json(value: Any) -> Any:
    """SDK dataclasses, enums and datetimes as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def create_app(server: str, *, token: str | None = None, timeout: float = 30.0) -> Starlette:
    """The web app for the Perito service at `server` (host:port)."""
    # Made on startup, inside the server's event loop: grpc.aio channels belong to one loop.
    clients: list[perito.AsyncClient] = []

    def sdk() -> perito.AsyncClient:
        return clients[0]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        clients.append(perito.AsyncClient(server, token=token, timeout=timeout))
        try:
            yield
        finally:
            await clients.pop().close()

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def list_models(request: Request) -> Response:
        return JSONResponse(to_json(await sdk().list_models()))

    async def get_model(request: Request) -> Response:
        return JSONResponse(to_json(await sdk().get_model(request.path_params["name"])))

    async def classify(request: Request) -> Response:
        model, images, names, top_k = await _upload(request, max_files=64, default_top_k=5)
        results = await sdk().classify(images, model=model, top_k=top_k, ids=names)
        return JSONResponse(to_json(results))

    async def submit_job(request: Request) -> Response:
        model, images, names, top_k = await _upload(
            request, max_files=MAX_JOB_FILES, default_top_k=3
        )
        handle = await sdk().submit_job(images, model=model, top_k=top_k, ids=names)
        return JSONResponse(to_json(handle.last), status_code=202)

    async def get_job(request: Request) -> Response:
        return JSONResponse(to_json(await sdk().get_job(request.path_params["job_id"])))

    async def job_results(request: Request) -> Response:
        handle = await sdk().job(request.path_params["job_id"])
        limit = _int(request.query_params.get("limit"), 1000)
        results = []
        async for item in handle.results(page_size=min(limit, 1000)):
            results.append(to_json(item))
            if len(results) >= limit:
                break
        return JSONResponse(results)

    async def on_sdk_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, perito.PeritoError)
        status = next((s for t, s in HTTP_STATUS.items() if isinstance(exc, t)), 502)
        body: dict[str, Any] = {"error": str(exc), "code": exc.code.name, "reason": exc.reason}
        if exc.violations:
            body["violations"] = [dataclasses.asdict(v) for v in exc.violations]
        return JSONResponse(body, status_code=status)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/healthz", health),
            Route("/api/models", list_models),
            Route("/api/models/{name}", get_model),
            Route("/api/classify", classify, methods=["POST"]),
            Route("/api/jobs", submit_job, methods=["POST"]),
            Route("/api/jobs/{job_id}", get_job),
            Route("/api/jobs/{job_id}/results", job_results),
        ],
        exception_handlers={perito.PeritoError: on_sdk_error, HTTPException: on_http_error},
        lifespan=lifespan,
    )


async def _upload(
    request: Request, *, max_files: int, default_top_k: int
) -> tuple[str, list[bytes], list[str], int]:
    """The model, the images (bytes and file names) and top_k of a multipart upload."""
    async with request.form(max_files=max_files, max_part_size=MAX_UPLOAD_BYTES) as form:
        model = str(form.get("model") or "")
        files = [f for f in form.getlist("image") if isinstance(f, UploadFile)]
        if not model or not files:
            raise HTTPException(400, "send a model and at least one image")
        images = [await f.read() for f in files]
        names = [f.filename or str(i) for i, f in enumerate(files)]
        return model, images, names, _int(form.get("top_k"), default_top_k)


def _int(value: object, default: int) -> int:
    try:
        return max(1, int(str(value))) if value not in (None, "") else default
    except ValueError:
        raise HTTPException(400, f"not a whole number: {value!r}") from None
