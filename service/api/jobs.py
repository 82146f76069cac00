"""/v1/quantization-jobs: submit, list, read, cancel, and follow (Server-Sent Events)."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from redis.exceptions import RedisError

from qarvd_core.quant import ConfigError, config_from_dict
from service.api.deps import get_engine, require_api_key
from service.api.http import BODY_ERRORS, error_responses
from service.engine import Engine, UnknownModel
from service.jobs.client import IdempotencyConflict, JobClient, is_terminal
from service.schemas import JobRequest, JobState, JobView

router = APIRouter(prefix="/v1/quantization-jobs", tags=["quantization jobs"], dependencies=[Depends(require_api_key)])
# One Server-Sent Event: its `data` is the job, as JSON (OpenAPI before 3.2 describes each event).
_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/JobView"},
        }
    },
}
JobId = Path(..., pattern=r"^[0-9a-f]{32}$")
QUEUE_UNAVAILABLE = "the job queue (Redis) is unreachable; retry in a few seconds"
QUEUE_RETRY_AFTER_S = 5


def queue_unavailable(request: Request, exc: RedisError) -> JSONResponse:
    """Every job route, while Redis is unreachable: 503 with Retry-After, never a 500."""
    return JSONResponse(
        {"detail": QUEUE_UNAVAILABLE}, status_code=503, headers={"Retry-After": str(QUEUE_RETRY_AFTER_S)}
    )


def get_jobs(request: Request) -> JobClient:
    jobs = request.app.state.jobs
    if jobs is None:
        raise HTTPException(503, "no job queue configured: set QARVD_REDIS_URL or run `qarvd serve` without it")
    return jobs


@router.post("", status_code=202, response_model=JobView, responses=error_responses(409, *BODY_ERRORS))
async def submit(
    body: JobRequest,
    response: Response,
    jobs: JobClient = Depends(get_jobs),
    engine: Engine = Depends(get_engine),
    idempotency_key: str | None = Header(None, max_length=200),
) -> dict:
    """Enqueue a calibration/quantization job; the same `Idempotency-Key` and body give the same job."""
    for key in ("method", "w_bits", "a_bits"):
        if key in body.options:
            msg = f"{key} is set at the top level of the request, not in options"
            raise HTTPException(422, [{"loc": ["body", "options", key], "msg": msg, "type": "value_error"}])
    try:
        config_from_dict({**body.options, "method": body.method, "w_bits": body.w_bits, "a_bits": body.a_bits})
    except ConfigError as e:
        loc = ["body", "options", *([e.field] if e.field else [])]
        raise HTTPException(422, [{"loc": loc, "msg": str(e), "type": "value_error"}]) from e
    try:
        if engine.model(body.base_model).kind == "quantized":
            raise HTTPException(
                422, [{"loc": ["body", "base_model"], "msg": "already quantized; use its base", "type": "value_error"}]
            )
    except UnknownModel as e:
        raise HTTPException(422, [{"loc": ["body", "base_model"], "msg": str(e), "type": "value_error"}]) from e
    try:
        view, _created = await jobs.submit(body.model_dump(), idempotency_key)
    except IdempotencyConflict as e:
        raise HTTPException(409, str(e)) from e
    response.headers["Location"] = f"/v1/quantization-jobs/{view['id']}"
    return view


@router.get("", response_model=list[JobView])
async def list_jobs(
    status: JobState | None = None,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0),
    jobs: JobClient = Depends(get_jobs),
) -> list[dict]:
    return await jobs.list(status, limit, offset)


def _found(view: dict | None, job_id: str) -> dict:
    if view is None:
        raise HTTPException(404, f"no job {job_id}")
    return view


@router.get("/{job_id}", response_model=JobView, responses=error_responses(404))
async def get_job(job_id: str = JobId, jobs: JobClient = Depends(get_jobs)) -> dict:
    return _found(await jobs.get(job_id), job_id)


@router.delete("/{job_id}", response_model=JobView, responses=error_responses(404))
async def cancel_job(job_id: str = JobId, jobs: JobClient = Depends(get_jobs)) -> dict:
    """Cancel: a queued job never runs; a running one stops at its next progress step."""
    return _found(await jobs.cancel(job_id), job_id)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": _EVENT}}}, **error_responses(404)},
)
async def job_events(job_id: str = JobId, jobs: JobClient = Depends(get_jobs)) -> StreamingResponse:
    """Server-Sent Events: one `data:` line with the job whenever it changes, until it ends."""
    _found(await jobs.get(job_id), job_id)

    async def events():
        last = None
        while True:
            try:
                view = await jobs.get(job_id)
            except RedisError:  # the stream ends cleanly; the client reconnects when it likes
                yield f"event: error\ndata: {json.dumps({'detail': QUEUE_UNAVAILABLE})}\n\n"
                return
            text = json.dumps(view)
            if text != last:
                yield f"data: {text}\n\n"
                last = text
            if is_terminal(view):
                return
            await asyncio.sleep(0.5)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
