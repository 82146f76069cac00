"""Typed dependencies: settings, engine, metrics, and the API-key check."""

from __future__ import annotations

import base64
import binascii
import hmac

from fastapi import HTTPException, Request, WebSocket

from service.engine import Engine
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


# Browsers cannot set headers on a WebSocket, so the demo offers the subprotocols
# ["qarvd", "key.<base64url of the key>"]; the server answers "qarvd". A URL would end up in
# access logs, this header does not.
WS_SUBPROTOCOL = "qarvd"
_WS_KEY_PREFIX = "key."


def _offered_subprotocols(headers) -> list[str]:
    return [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]


def _subprotocol_key(headers) -> str | None:
    for p in _offered_subprotocols(headers):
        if p.startswith(_WS_KEY_PREFIX):
            encoded = p[len(_WS_KEY_PREFIX) :]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
    return None


def presented_key(headers) -> str | None:
    """An API key from `Authorization: Bearer KEY` or `X-API-Key`."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key")


def websocket_subprotocol(ws: WebSocket) -> str | None:
    """The subprotocol to accept: "qarvd" when the client offered it (it must be echoed back)."""
    return WS_SUBPROTOCOL if WS_SUBPROTOCOL in _offered_subprotocols(ws.headers) else None


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
    if not key_is_valid(settings, presented_key(request.headers)):
        raise HTTPException(
            status_code=401, detail="missing or invalid API key", headers={"WWW-Authenticate": "Bearer"}
        )


def websocket_allowed(ws: WebSocket, settings: Settings) -> str | None:
    """None if the socket may proceed, else the reason to refuse it (close 1008)."""
    if not key_is_valid(settings, presented_key(ws.headers) or _subprotocol_key(ws.headers)):
        return "missing or invalid API key"
    origin = ws.headers.get("origin")
    if settings.allowed_origins and origin not in settings.allowed_origins:
        return f"origin {origin!r} is not allowed"
    return None
