"""HTTP endpoints behind the page: JSON in front of the gRPC service, via `AsyncClient`.

The page acts as one tenant at a time: whoever signs in with a tenant's token. Nothing is
relayed with a token of the web server's own.

- **Sessions.** `POST /api/login` with `{"token": ...}` (JSON: a cross-site HTML form cannot
  send it) checks the token against the service and starts a session: a random id in a
  cookie that is `HttpOnly` (scripts cannot read it), `SameSite=Strict` (other sites' pages
  never send it) and `Secure` when served over HTTPS. The token stays in this process's
  memory, never in the browser. When the service needs no token (its anonymous mode on
  loopback), `GET /api/session` starts a session by itself, but only while the page itself
  listens on loopback only (`loopback_only`): beyond loopback every session needs a token,
  and in front of a service without tenants the page opens none (`perito web` refuses to
  start there when it can reach the service; else `/api/session` and `/api/login` answer
  401 saying why), since anyone who reaches the page would act with every right.
- **CSRF.** Every `/api/` request but login and the session probe must carry the session's
  CSRF token in `X-CSRF-Token` (the page's script adds it to every fetch and form); a forged
  request from another site has the cookie at most, never the token, and gets 403. Unsafe
  methods must also come from this origin when the browser says where they come from.
- **Uploads** are bounded while they stream: a body past `max_upload_bytes` is cut off at
  that byte with 413 (a `Content-Length` over it is refused before any byte is read), and a
  form with more files than allowed is refused by the parser as it reaches the extra file.
- **Deep links.** `/jobs`, `/jobs/{id}`, `/models/{name}`, `/classify` serve the page, which
  shows that view: a job's link can be sent to a colleague of the same tenant.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import enum
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import perito
from perito.v1.vocabulary import HTTP_STATUS

T = TypeVar("T")

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 256 * 1024 * 1024
MAX_CLASSIFY_FILES = 64
MAX_JOB_FILES = 5_000
MAX_PART_BYTES = 32 * 1024 * 1024
SESSION_COOKIE = "perito_session"
CSRF_HEADER = "x-csrf-token"
SESSION_IDLE_S = 12 * 3600
MAX_SESSIONS = 10_000


def to_json(value: Any) -> Any:
    """SDK dataclasses, enums and datetimes as plain JSON values; bytes (an explanation's
    overlay PNG) as base64."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


@dataclasses.dataclass
class Session:
    """One signed-in browser: the tenant's token (None in anonymous mode) and its CSRF token."""

    token: str | None
    csrf: str
    seen: float

    def metadata(self) -> list[tuple[str, str]] | None:
        return [("authorization", f"Bearer {self.token}")] if self.token else None


class Sessions:
    """Sessions in memory, by random id; idle ones expire, the oldest go past the cap."""

    def __init__(self, idle_s: float = SESSION_IDLE_S, cap: int = MAX_SESSIONS) -> None:
        self._by_id: OrderedDict[str, Session] = OrderedDict()
        self._idle_s = idle_s
        self._cap = cap

    def start(self, token: str | None) -> tuple[str, Session]:
        session_id = secrets.token_urlsafe(32)
        session = Session(token, secrets.token_urlsafe(32), time.monotonic())
        self._by_id[session_id] = session
        while len(self._by_id) > self._cap:
            self._by_id.popitem(last=False)
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.seen > self._idle_s:
            del self._by_id[session_id]
            return None
        session.seen = now
        self._by_id.move_to_end(session_id)
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._by_id.pop(session_id, None)


class BodyLimit:
    """ASGI middleware: 413 for a request body past `max_bytes`, counted as it streams."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, f"the upload is larger than {self.max_bytes:,} bytes")
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> Response:
    return JSONResponse({"error": f"the upload is larger than {limit:,} bytes"}, status_code=413)


async def opens_without_token(client: perito.AsyncClient) -> bool:
    """True when the service answers a call that carries no token: it runs without tenants
    (anonymous mode), every caller with every right.

    Raises:
        perito.PeritoError: the service could not be asked (UNAVAILABLE, DEADLINE_EXCEEDED, ...).
    """
    try:
        await client.list_models()
    except (perito.UnauthenticatedError, perito.PermissionDeniedError):
        return False
    return True


def anonymous_beyond_loopback(server: str, addresses: list[str]) -> str:
    """Why the page opens no session in front of the service at `server`, which runs without
    tenants, while it listens on `addresses` (`host:port`), not all loopback."""
    return (
        f"the Perito service at {server} runs without tenants (anonymous: every caller has "
        f"every right) and this page listens beyond loopback ({', '.join(addresses)}), so it "
        "opens no session: serve the page on 127.0.0.1 (--host), or give the service tenants "
        "(PERITO_TENANTS_FILE or PERITO_AUTH_TOKENS) and sign in with a token"
    )


def create_app(
    server: str,
    *,
    timeout: float = 30.0,
    tls: bool = False,
    root_certificates: str | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    loopback_only: bool = False,
    addresses: list[str] | None = None,
) -> Starlette:
    """The web app for the Perito service at `server` (host:port).

    Args:
        tls, root_certificates: how to reach a service that serves TLS.
        max_upload_bytes: the largest request body accepted (counted while it streams).
        loopback_only: the page listens on loopback addresses only
            (`perito_core.listening.is_loopback` of each socket). Only then does a service
            without tenants get sessions without a token; otherwise `/api/session` and
            `/api/login` in front of such a service answer 401 saying why.
        addresses: the `host:port` the page listens on, named in that 401.
    """
    # Made on startup, inside the server's event loop: grpc.aio channels belong to one loop.
    # One channel for every session; each call carries its session's token.
    clients: list[perito.AsyncClient] = []
    sessions = Sessions()

    def sdk() -> perito.AsyncClient:
        return clients[0]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        clients.append(
            perito.AsyncClient(
                server, timeout=timeout, tls=tls, root_certificates=root_certificates
            )
        )
        try:
            yield
        finally:
            await clients.pop().close()

    def session_of(request: Request) -> Session:
        """The request's session, if it carries its CSRF token.

        Raises:
            HTTPException: 401 without a live session, 403 without the right CSRF token or
                from another origin.
        """
        session = sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            raise HTTPException(401, "sign in with your tenant's token")
        presented = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(presented.encode(), session.csrf.encode()):
            raise HTTPException(403, "missing or wrong CSRF token")
        if request.method not in ("GET", "HEAD"):
            _same_origin(request)
        return session

    def with_cookie(response: Response, request: Request, session_id: str) -> Response:
        response.set_cookie(
            SESSION_COOKIE,
            session_id,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
            max_age=SESSION_IDLE_S,
        )
        return response

    async def page(request: Request) -> Response:
        return FileResponse(
            STATIC / "index.html",
            media_type="text/html",
            headers={
                "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; "
                "frame-ancestors 'none'",
                "X-Frame-Options": "DENY",
                "Referrer-Policy": "same-origin",
            },
        )

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def refuse_anonymous() -> Response:
        """401 for a service without tenants in front of a page beyond loopback."""
        why = anonymous_beyond_loopback(server, addresses or ["not loopback only"])
        return JSONResponse({"authenticated": False, "error": why}, status_code=401)

    async def session_probe(request: Request) -> Response:
        """The session's CSRF token; in the service's anonymous mode, a new session when the
        page listens on loopback only, else 401 saying why."""
        session = sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            return JSONResponse({"authenticated": True, "csrf": session.csrf})
        if not await opens_without_token(sdk()):
            return JSONResponse({"authenticated": False})
        if not loopback_only:
            return refuse_anonymous()
        session_id, session = sessions.start(None)
        body = {"authenticated": True, "csrf": session.csrf, "anonymous": True}
        return with_cookie(JSONResponse(body), request, session_id)

    async def login(request: Request) -> Response:
        _same_origin(request)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise HTTPException(415, "send the token as JSON")
        try:
            data = await request.json()
        except (ValueError, RecursionError):  # RecursionError: nested deeper than json's stack
            raise HTTPException(400, "send the token as JSON") from None
        token = str(data.get("token") or "").strip() if isinstance(data, dict) else ""
        if not token or len(token) > 512:
            raise HTTPException(400, "a token is required")
        # A service without tenants takes any token as the anonymous tenant's.
        if not loopback_only and await opens_without_token(sdk()):
            return refuse_anonymous()
        metadata = [("authorization", f"Bearer {token}")]
        try:
            await sdk().list_models(metadata=metadata)
        except perito.UnauthenticatedError:
            raise HTTPException(401, "unknown token") from None
        except perito.PermissionDeniedError:
            pass  # a tenant without models:read may still classify or run jobs
        sessions.end(request.cookies.get(SESSION_COOKIE))
        session_id, session = sessions.start(token)
        return with_cookie(
            JSONResponse({"authenticated": True, "csrf": session.csrf}), request, session_id
        )

    async def logout(request: Request) -> Response:
        session_of(request)
        sessions.end(request.cookies.get(SESSION_COOKIE))
        response = JSONResponse({"authenticated": False})
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    async def list_models(request: Request) -> Response:
        session = session_of(request)
        return JSONResponse(to_json(await sdk().list_models(metadata=session.metadata())))

    async def get_model(request: Request) -> Response:
        session = session_of(request)
        name = request.path_params["name"]
        return JSONResponse(to_json(await sdk().get_model(name, metadata=session.metadata())))

    async def send_upload(
        request: Request, call: Callable[..., Awaitable[T]], max_files: int, default_top_k: int
    ) -> T:
        """The uploaded images, model and top_k passed to `call` (the SDK's `classify` or
        `submit_job`) as the session's tenant."""
        session = session_of(request)
        model, images, names, top_k, _ = await _upload(
            request, max_files=max_files, default_top_k=default_top_k
        )
        return await call(images, model=model, top_k=top_k, ids=names, metadata=session.metadata())

    async def classify(request: Request) -> Response:
        """The upload classified, with each image's explanation when the form's `explain`
        is on (its overlay PNG base64 in `explanation.overlay_png`)."""
        session = session_of(request)
        model, images, names, top_k, explain = await _upload(
            request, max_files=MAX_CLASSIFY_FILES, default_top_k=5
        )
        results = await sdk().classify(
            images,
            model=model,
            top_k=top_k,
            ids=names,
            explain=explain,
            metadata=session.metadata(),
        )
        return JSONResponse(to_json(results))

    async def submit_job(request: Request) -> Response:
        handle = await send_upload(request, sdk().submit_job, MAX_JOB_FILES, default_top_k=3)
        return JSONResponse(to_json(handle.last), status_code=202)

    async def list_jobs(request: Request) -> Response:
        session = session_of(request)
        limit = _int(request.query_params.get("limit"), 50)
        states = [s for s in request.query_params.getlist("state") if s]
        found = []
        try:
            jobs = sdk().list_jobs(
                states=states, page_size=min(limit, 100), metadata=session.metadata()
            )
        except ValueError:
            raise HTTPException(400, "unknown job state") from None
        async for job in jobs:
            found.append(to_json(job))
            if len(found) >= limit:
                break
        return JSONResponse(found)

    async def get_job(request: Request) -> Response:
        session = session_of(request)
        job = await sdk().get_job(request.path_params["job_id"], metadata=session.metadata())
        return JSONResponse(to_json(job))

    async def cancel_job(request: Request) -> Response:
        session = session_of(request)
        job = await sdk().cancel_job(request.path_params["job_id"], metadata=session.metadata())
        return JSONResponse(to_json(job))

    async def job_results(request: Request) -> Response:
        session = session_of(request)
        limit = _int(request.query_params.get("limit"), 1000)
        results = []
        async for item in sdk().list_job_results(
            request.path_params["job_id"],
            page_size=min(limit, 1000),
            metadata=session.metadata(),
        ):
            results.append(to_json(item))
            if len(results) >= limit:
                break
        return JSONResponse(results)

    async def on_sdk_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, perito.PeritoError)
        status = HTTP_STATUS[exc.code.name]  # the same table as the server's HTTP doors
        body: dict[str, Any] = {"error": str(exc), "code": exc.code.name, "reason": exc.reason}
        if exc.violations:
            body["violations"] = [dataclasses.asdict(v) for v in exc.violations]
        return JSONResponse(body, status_code=status)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/classify", page),
            Route("/jobs", page),
            Route("/jobs/{job_id}", page),
            Route("/models", page),
            Route("/models/{name}", page),
            Route("/healthz", health),
            Route("/api/session", session_probe),
            Route("/api/login", login, methods=["POST"]),
            Route("/api/logout", logout, methods=["POST"]),
            Route("/api/models", list_models),
            Route("/api/models/{name}", get_model),
            Route("/api/classify", classify, methods=["POST"]),
            Route("/api/jobs", list_jobs, methods=["GET"]),
            Route("/api/jobs", submit_job, methods=["POST"]),
            Route("/api/jobs/{job_id}", get_job),
            Route("/api/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
            Route("/api/jobs/{job_id}/results", job_results),
        ],
        exception_handlers={perito.PeritoError: on_sdk_error, HTTPException: on_http_error},
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)
    return app


def _same_origin(request: Request) -> None:
    """Refuse a state-changing request that the browser says comes from another site
    (`Sec-Fetch-Site`, or an `Origin` naming another host). Clients that are not browsers
    send neither; the CSRF token is still required of them."""
    if request.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        raise HTTPException(403, "cross-site request refused")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise HTTPException(403, "cross-site request refused")


async def _upload(
    request: Request, *, max_files: int, default_top_k: int
) -> tuple[str, list[bytes], list[str], int, bool]:
    """The model, the images (bytes and file names), top_k and `explain` (a checkbox: on
    when sent) of a multipart upload; the parser refuses the file past `max_files` and a
    field past `MAX_PART_BYTES` as they come."""
    try:
        async with request.form(max_files=max_files, max_part_size=MAX_PART_BYTES) as form:
            model = str(form.get("model") or "")
            files = [f for f in form.getlist("image") if isinstance(f, UploadFile)]
            if not model or not files:
                raise HTTPException(400, "send a model and at least one image")
            images = [await f.read() for f in files]
            names = [f.filename or str(i) for i, f in enumerate(files)]
            explain = form.get("explain") not in (None, "", "0", "false")
            return model, images, names, _int(form.get("top_k"), default_top_k), explain
    except HTTPException as exc:
        if exc.status_code == 400 and "Too many files" in str(exc.detail):
            raise HTTPException(413, f"more than {max_files:,} files in one upload") from None
        raise


def _int(value: object, default: int) -> int:
    try:
        return max(1, int(str(value))) if value not in (None, "") else default
    except ValueError:
        raise HTTPException(400, f"not a whole number: {value!r}") from None
