"""What every HTTP route shares: the body limit, JSON-only bodies, error shapes, the documented
error responses, the server-error count, and keeping secrets out of the server's log lines."""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

EXCERPT_CHARS = 100


class ErrorMessage(BaseModel):
    """Every error but 422 (whose `detail` is a list of errors)."""

    detail: str


_DESCRIPTIONS = {
    400: "The body could not be read (e.g. not UTF-8)",
    401: "Missing or invalid API key",
    404: "No such resource",
    409: "Conflicts with the current state",
    413: "Request body over QARVD_MAX_BODY_BYTES",
    415: "The body is not JSON: send Content-Type: application/json",
    503: "A dependency is unavailable; retry later",
}


def error_responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI `responses=` for these error statuses, each a JSON `{"detail": "..."}`."""
    out: dict[int | str, dict] = {c: {"model": ErrorMessage, "description": _DESCRIPTIONS[c]} for c in codes}
    if 401 in out:
        out[401]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}}
    return out


# What a route that takes a JSON body may also answer.
BODY_ERRORS = (400, 413, 415)


def require_json(request: Request) -> None:
    """Refuse non-JSON bodies: a cross-site HTML form can POST text/plain without a CORS preflight."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        raise HTTPException(415, f"send the body as JSON with Content-Type: application/json, not {media[:60]!r}")


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Answers 413 once a request body passes `max_bytes`, counted as it arrives: a declared
    Content-Length is checked up front, and chunked bodies (no length) are cut off mid-stream."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await too_large(scope, receive, send)
            return
        received, over, answered = 0, False, False

        async def receive_limited() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise _BodyTooLarge
            return message

        async def send_or_replace(message: Message) -> None:
            nonlocal answered
            if over:  # whatever the app answers about the cut-off body, the answer is 413
                if not answered:
                    answered = True
                    await too_large(scope, receive, send)
                return
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_limited, send_or_replace)
        except _BodyTooLarge:
            if answered:
                raise
            await too_large(scope, receive, send)


class CountServerErrors:
    """Counts 5xx responses by status, including unhandled exceptions (answered 500 further out)."""

    def __init__(self, app: ASGIApp, counter: Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 500:
                    self.counter.labels(str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            if not started:
                self.counter.labels("500").inc()
            raise


def _excerpt(value):
    """`value` as is when short; else the start of its JSON text, so errors never echo a big input."""
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else json.dumps(jsonable_encoder(value), default=str)
    if len(text) <= EXCERPT_CHARS:
        return value
    return text[:EXCERPT_CHARS] + "..."


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for e in exc.errors():
        e = dict(e)
        if "input" in e:
            e["input"] = _excerpt(e["input"])
        if isinstance(e.get("ctx"), dict):
            e["ctx"] = {k: _excerpt(v) for k, v in e["ctx"].items()}
        errors.append(e)
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route answers on this path (routes may sit inside included routers)."""

    def routed(method: str) -> bool:
        probe = {"type": "http", "path": request.url.path, "root_path": request.scope.get("root_path", "")}
        probe |= {"method": method, "headers": []}
        return any(route.matches(probe)[0] == Match.FULL for route in request.app.router.routes)

    return [m for m in _METHODS if routed(m)]


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 405:
        # Starlette lists only the first route with this path; GET and DELETE of one path are two routes.
        exc.headers = {**(exc.headers or {}), "Allow": ", ".join(_allowed_methods(request))}
    elif exc.status_code == 422 and isinstance(exc.detail, str):
        # One documented 422 shape: a list of errors.
        exc = HTTPException(422, [{"loc": ["body"], "msg": exc.detail, "type": "value_error"}], exc.headers)
    return await http_exception_handler(request, exc)


def install(app: FastAPI, max_body_bytes: int, server_errors: Counter) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(CountServerErrors, counter=server_errors)  # outermost: sees every response
    redact_secrets_in_server_logs()


_SECRET_QUERY = re.compile(r"\b((?:api_key|access_token|token|key)=)[^&\s\"]*", re.IGNORECASE)


class _RedactQuerySecrets(logging.Filter):
    """uvicorn logs each request's path with its query string: a key a client put in the URL is
    replaced by REDACTED before the line is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_SECRET_QUERY.sub(r"\1REDACTED", a) if isinstance(a, str) else a for a in record.args)
        return True


def redact_secrets_in_server_logs() -> None:
    # "uvicorn.access" logs HTTP requests, "uvicorn.error" WebSocket handshakes.
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactQuerySecrets) for f in logger.filters):
            logger.addFilter(_RedactQuerySecrets())
