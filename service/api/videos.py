"""POST /v1/videos: render an action script to an H.264 MP4 (offline, length-limited)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response

from qarvd_core.sampling import Stream
from qarvd_core.video import upscale, write_mp4
from qarvd_core.world.scripts import parse_actions
from service.api.deps import get_engine, get_settings, require_api_key
from service.engine import Engine, UnknownModel
from service.schemas import VideoRequest
from service.settings import Settings

router = APIRouter(prefix="/v1/videos", tags=["videos"], dependencies=[Depends(require_api_key)])


def _render(engine: Engine, model_id: str, req: VideoRequest, actions: list[str]) -> bytes:
    stream = Stream(engine.registry.get(model_id), req.prompt, req.seed)
    fr = stream.args.frames_per_chunk
    padded = actions + [actions[-1]] * (-len(actions) % fr)
    frames = np.concatenate([stream.step(padded[k : k + fr]) for k in range(0, len(padded), fr)])[: len(actions)]
    with tempfile.TemporaryDirectory() as d:
        path = write_mp4(upscale(frames, req.scale), Path(d) / "video.mp4", fps=req.fps)
        return path.read_bytes()


@router.post("", response_class=Response, responses={200: {"content": {"video/mp4": {}}}})
async def render_video(
    req: VideoRequest, engine: Engine = Depends(get_engine), settings: Settings = Depends(get_settings)
) -> Response:
    model_id = req.model or settings.default_model
    try:
        actions = parse_actions(req.actions)
        engine.registry.path_of(model_id)
    except ValueError as e:
        raise HTTPException(422, str(e)) from e
    except UnknownModel as e:
        raise HTTPException(404, str(e)) from e
    if len(actions) > settings.video_max_frames:
        raise HTTPException(422, f"{len(actions)} frames is over the limit of {settings.video_max_frames}")
    # Rendering shares the engine's compute thread, so it never runs beside a live chunk.
    data = await asyncio.get_running_loop().run_in_executor(engine.executor, _render, engine, model_id, req, actions)
    return Response(data, media_type="video/mp4", headers={"Content-Disposition": 'inline; filename="video.mp4"'})
