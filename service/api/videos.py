"""POST /v1/videos: render an action script (or, for a model without actions, a number of
chunks) to an H.264 MP4 (offline, length-limited).

The script's length is checked from its counts before it is expanded. The render runs
through the engine one chunk at a time, between live sessions' chunks, so streams keep
their frame rate; at most `max_concurrent_videos` renders run at once (503 past it).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response

from qarvd_core.world.scripts import parse_actions
from service.api.deps import get_engine, get_settings, require_api_key
from service.api.http import ErrorMessage
from service.engine import AtCapacity, Engine, NotForModel, UnknownModel
from service.schemas import VideoRequest
from service.settings import Settings

router = APIRouter(prefix="/v1/videos", tags=["videos"], dependencies=[Depends(require_api_key)])

# What a client over the render cap is told to wait: about a short render's length.
RETRY_AFTER_S = 5


@router.post(
    "",
    response_class=Response,
    responses={
        200: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}},
        503: {
            "model": ErrorMessage,
            "description": "as many renders as QARVD_MAX_CONCURRENT_VIDEOS are running; retry after Retry-After",
        },
    },
)
async def render_video(
    req: VideoRequest, engine: Engine = Depends(get_engine), settings: Settings = Depends(get_settings)
) -> Response:
    model_id = req.model or settings.default_model
    if (req.actions is None) == (req.chunks is None):
        raise HTTPException(422, "give either actions (a model steered by actions) or chunks (a text model)")
    try:
        script = req.chunks if req.actions is None else parse_actions(req.actions, max_frames=settings.video_max_frames)
    except ValueError as e:
        raise HTTPException(422, str(e)) from e
    try:
        data = await engine.render_video(model_id, req.prompt, req.seed, script, req.fps, req.scale)
    except UnknownModel as e:
        raise HTTPException(404, str(e)) from e
    except NotForModel as e:
        raise HTTPException(422, str(e)) from e
    except AtCapacity as e:
        raise HTTPException(503, str(e), headers={"Retry-After": str(RETRY_AFTER_S)}) from e
    return Response(data, media_type="video/mp4", headers={"Content-Disposition": 'inline; filename="video.mp4"'})
