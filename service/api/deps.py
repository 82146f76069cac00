"""Typed dependencies: settings, engine, metrics, and the API-key check."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, WebSocket

from service.engine import Engine
from service.metrics import Metrics
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def presented_key(headers, query) -> str | None:
    """An API key from `Authorization: Bearer KEY`, `X-API-Key`, or (browsers' WebSockets) `?api_key=`."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key") or query.get("api_key")


def key_is_valid(settings: Settings, key: str | None) -> bool:
    if not settings.api_keys:
        return True
    if key is None:
        return False
    # Compare against every key in constant time so timing reveals neither key nor match.
    ok = False
    for k in settings.api_keys:
        ok |= hmac.compare_digest(k.encode(), key.encode())
    return ok


def require_api_key(request: Request) -> None:
    settings: Settings = request.app.state.settings
    if not key_is_valid(settings, presented_key(request.headers, request.query_params)):
        raise HTTPException(
            status_code=401, detail="missing or invalid API key", headers={"WWW-Authenticate": "Bearer"}
        )


def websocket_allowed(ws: WebSocket, settings: Settings) -> str | None:
    """None if the socket may proceed, else the reason to refuse it (close 1008)."""
    if not key_is_valid(settings, presented_key(ws.headers, ws.query_params)):
        return "missing or invalid API key"
    origin = ws.headers.get("origin")
    if settings.allowed_origins and origin not in settings.allowed_origins:
        return f"origin {origin!r} is not allowed"
    return None
