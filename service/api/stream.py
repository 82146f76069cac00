"""WS /v1/stream: one interactive session (the protocol, for client writers: docs/protocol.md).

Credentials and Origin are checked before a session can start; a refused socket is
closed with 1008 right after the handshake (a close code needs an accepted socket).
Every client message is validated; a bad one gets an `error` message and the session
carries on. No message waits for generation, so the socket is always read and a client
that goes away ends its session at once. Frames flow from the engine through the
session's bounded queue and are dropped, not sent, once older than `max_frame_age_s`; a
separate task sends `stats` every second. Every close the server makes is counted by code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import TypeAdapter, ValidationError

from service.api.deps import websocket_allowed, websocket_subprotocol
from service.engine import AtCapacity, Engine, NotForModel, Session, UnknownModel
from service.metrics import Metrics
from service.schemas import ActionMsg, ClientMsg, ControlMsg, PromptMsg, StartMsg
from service.settings import Settings

router = APIRouter()
_parse = TypeAdapter(ClientMsg)
log = logging.getLogger("qarvd")

CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_INTERNAL, CLOSE_RESTART, CLOSE_BUSY = 1008, 1009, 1011, 1012, 1013


class _Bucket:
    """Token bucket: at most `rate` messages a second on average, bursts up to `rate`."""

    def __init__(self, rate: float):
        self.rate, self.tokens, self.t = rate, rate, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


async def _error(ws: WebSocket, metrics: Metrics, kind: str, message: str) -> None:
    metrics.client_errors.labels(kind).inc()
    await ws.send_text(json.dumps({"type": "error", "code": kind, "message": message}))


def _describe(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "message"
    return f"{where}: {err['msg']}"


async def _receive(ws: WebSocket, settings: Settings, metrics: Metrics, bucket: _Bucket):
    """The next valid message, or None after answering a bad one with an `error` message.

    Raises _TooBig for oversized messages (the caller closes with 1009).
    """
    raw = await ws.receive()
    if raw["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(raw.get("code", 1000))
    text = raw.get("text")
    size = len(text.encode()) if text is not None else len(raw.get("bytes") or b"")
    if size > settings.max_message_bytes:
        raise _TooBig(size)
    if not bucket.take():
        await _error(ws, metrics, "rate_limited", f"more than {settings.actions_per_s:g} messages a second")
        return None
    if text is None:
        await _error(ws, metrics, "bad_message", "send JSON text messages, not binary")
        return None
    try:
        return _parse.validate_json(text)
    except ValidationError as e:
        kind = "bad_json" if any(x["type"] == "json_invalid" for x in e.errors()) else "bad_message"
        await _error(ws, metrics, kind, _describe(e))
        return None


class _TooBig(Exception):
    pass


@router.websocket("/v1/stream")
async def stream(ws: WebSocket):
    app = ws.app
    settings: Settings = app.state.settings
    engine: Engine = app.state.engine
    metrics: Metrics = app.state.metrics
    refusal = websocket_allowed(ws, settings)
    await ws.accept(subprotocol=websocket_subprotocol(ws))
    if refusal is not None:
        metrics.sessions_rejected.labels("auth").inc()
        await _safe_close(ws, metrics, CLOSE_POLICY, refusal)
        return
    bucket = _Bucket(settings.actions_per_s)
    session: Session | None = None
    tasks: list[asyncio.Task] = []
    try:
        while session is None:
            msg = await asyncio.wait_for(_receive(ws, settings, metrics, bucket), settings.idle_timeout_s)
            if msg is None:
                continue
            if not isinstance(msg, StartMsg):
                await _error(ws, metrics, "not_started", "send a start message first")
                continue
            model_id = msg.model or settings.default_model
            try:
                session = await engine.open_session(model_id, msg.prompt, msg.seed, msg.format, msg.quality)
            except AtCapacity as e:
                await _safe_close(ws, metrics, CLOSE_BUSY, str(e))
                return
            except UnknownModel as e:
                await _error(ws, metrics, "unknown_model", str(e))
                continue
            except NotForModel as e:
                await _error(ws, metrics, "bad_prompt", str(e))
                continue
            height, width = session.stream.frame_size
            await ws.send_text(
                json.dumps(
                    {
                        "type": "ready",
                        "session": session.id,
                        "model": model_id,
                        "width": width,
                        "height": height,
                        "frames_per_chunk": session.stream.frames_per_chunk,
                        "fps_target": settings.fps_target,
                        "format": msg.format,
                    }
                )
            )
            tasks = [
                asyncio.create_task(_send_frames(ws, session, settings, metrics)),
                asyncio.create_task(_send_stats(ws, session, settings)),
            ]
        while True:
            msg = await asyncio.wait_for(_receive(ws, settings, metrics, bucket), settings.idle_timeout_s)
            if msg is None:
                continue
            if isinstance(msg, ActionMsg):
                try:
                    engine.set_action(session, msg.action)
                except NotForModel as e:
                    await _error(ws, metrics, "action_not_supported", str(e))
            elif isinstance(msg, PromptMsg):
                try:
                    engine.set_prompt(session, msg.prompt)
                except NotForModel as e:
                    await _error(ws, metrics, "bad_prompt", str(e))
            elif isinstance(msg, ControlMsg) and msg.type in ("pause", "resume"):
                engine.set_paused(session, msg.type == "pause")
            elif isinstance(msg, ControlMsg):  # stop
                await _end(ws, metrics, session, "stopped", 1000)
                return
            else:
                await _error(ws, metrics, "already_started", "this session has started; send stop to end it")
    except TimeoutError:
        await _end(ws, metrics, session, "idle", 1000)
    except _TooBig as e:
        metrics.client_errors.labels("too_large").inc()
        reason = f"message of {e.args[0]} bytes is over {settings.max_message_bytes}"
        await _safe_close(ws, metrics, CLOSE_TOO_BIG, reason)
    except WebSocketDisconnect:
        pass
    except asyncio.CancelledError:  # server shutting down
        await _end(ws, metrics, session, "server restarting", CLOSE_RESTART)
        raise
    except Exception as e:
        log.exception("stream session failed")
        await _end(ws, metrics, session, f"internal error: {type(e).__name__}", CLOSE_INTERNAL)
    finally:
        for t in tasks:
            t.cancel()
        if session is not None:
            engine.close_session(session)


def _totals(s: Session | None) -> dict:
    if s is None:
        return {}
    return {"frames_generated": s.frames_generated, "frames_sent": s.frames_sent, "frames_dropped": s.frames_dropped}


async def _end(ws: WebSocket, metrics: Metrics, session: Session | None, reason: str, code: int) -> None:
    """An `ended` message with the reason and totals, then the close."""
    try:
        await ws.send_text(json.dumps({"type": "ended", "reason": reason, **_totals(session)}))
    except Exception:  # the client may be gone already
        pass
    await _safe_close(ws, metrics, code, reason)


async def _safe_close(ws: WebSocket, metrics: Metrics, code: int, reason: str) -> None:
    metrics.ws_closes.labels(str(code)).inc()
    try:
        await ws.close(code, reason.encode()[:120].decode(errors="ignore"))  # a close reason is at most 123 bytes
    except Exception:  # already closed
        pass


async def _send_frames(ws: WebSocket, s: Session, settings: Settings, metrics: Metrics) -> None:
    while True:
        item = await s.outbound.get()
        if item is None:  # the engine ended this session
            await _end(ws, metrics, s, s.end_reason, CLOSE_INTERNAL if s.failed else CLOSE_RESTART)
            return
        # A frame that waited too long (the client reads slowly) shows a world that has moved on:
        # a newer one is on its way, so this one is dropped.
        if time.perf_counter() - item.made > settings.max_frame_age_s:
            s.frames_dropped += 1
            metrics.frames_dropped.labels(s.model_id).inc()
            metrics.frames_stale.labels(s.model_id).inc()
            continue
        await ws.send_bytes(item.data)
        s.frames_sent += 1
        metrics.frames_sent.labels(s.model_id).inc()
        if not s.first_frame_sent:
            s.first_frame_sent = True
            metrics.time_to_first_frame.labels(s.model_id).observe(time.perf_counter() - s.started)


async def _send_stats(ws: WebSocket, s: Session, settings: Settings) -> None:
    last_sent, last_t = 0, time.perf_counter()
    while True:
        await asyncio.sleep(settings.stats_interval_s)
        now = time.perf_counter()
        fps = (s.frames_sent - last_sent) / (now - last_t)
        last_sent, last_t = s.frames_sent, now
        await ws.send_text(
            json.dumps(
                {
                    "type": "stats",
                    "fps": round(fps, 2),
                    "chunk_ms": round(s.last_chunk_ms, 1),
                    "drift_psnr_db": None if s.drift_psnr_db is None else round(s.drift_psnr_db, 2),
                    "model": s.model_id,
                    "paused": s.paused,
                    **_totals(s),
                }
            )
        )
