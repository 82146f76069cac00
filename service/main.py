"""The FastAPI app: `create_app(settings)`; `qarvd serve` runs it under uvicorn."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel
from redis.exceptions import RedisError

from service.api import http, jobs, models, stream, videos
from service.engine import Engine
from service.jobs.client import JobClient
from service.metrics import Metrics
from service.settings import Settings, get_settings
from service.store import ModelStore

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("qarvd")


class PrometheusText(Response):
    media_type = "text/plain; version=0.0.4; charset=utf-8"  # the Prometheus text exposition format


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    model: str
    sessions: int


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("engine start failed; /readyz stays 503", exc_info=task.exception())


def create_app(settings: Settings | None = None, on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The app; `on_shutdown` runs (on a thread) after the engine stops, inside uvicorn's
    graceful shutdown, i.e. before uvicorn re-raises SIGTERM and the process ends."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load and warm up in the background: /healthz answers at once, /readyz when done.
        if settings.redis_url:
            app.state.jobs = JobClient(
                settings.redis_url, settings.job_attempts, settings.job_retry_delay_s, settings.job_heartbeat_s
            )
            await app.state.jobs.connect()
        starting = asyncio.create_task(app.state.engine.start())
        starting.add_done_callback(_log_failure)
        yield
        if not starting.done():
            starting.cancel()
        await app.state.engine.stop()
        if app.state.jobs is not None:
            await app.state.jobs.close()
        if on_shutdown is not None:
            await asyncio.to_thread(on_shutdown)

    app = FastAPI(
        title="qarvd", version="0.1.0", lifespan=lifespan, description="A streaming world model, quantized with Q-ARVD."
    )
    metrics = Metrics()
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = Engine(settings, metrics, ModelStore(settings.artifact_dir, settings.model_cards))
    app.state.jobs = None

    http.install(app, settings.max_body_bytes, metrics.http_server_errors)
    json_body = [Depends(http.require_json)]
    app.include_router(stream.router)
    app.include_router(models.router)
    app.include_router(
        videos.router, dependencies=json_body, responses=http.error_responses(401, 404, *http.BODY_ERRORS)
    )
    app.include_router(jobs.router, dependencies=json_body, responses=http.error_responses(401, 503))
    app.add_exception_handler(RedisError, jobs.queue_unavailable)

    @app.get("/healthz", tags=["health"])
    def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", tags=["health"], response_model=Readiness, responses={503: {"model": Readiness}})
    def readyz() -> JSONResponse:
        engine: Engine = app.state.engine
        ready = engine.ready
        return JSONResponse(
            {"ready": ready, "model": settings.default_model, "sessions": len(engine.sessions)},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics", tags=["health"], response_class=PrometheusText)
    async def prometheus() -> PrometheusText:
        if app.state.jobs is not None:
            try:
                metrics.jobs.snapshot = await app.state.jobs.snapshot()
            except Exception:  # Redis unreachable: export the streaming metrics anyway
                log.exception("job metrics unavailable")
                metrics.jobs.snapshot = None
        return PrometheusText(metrics.exposition())

    @app.get("/", include_in_schema=False)
    def demo() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app
