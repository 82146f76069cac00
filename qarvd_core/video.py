"""Writing generated frames: H.264 MP4 through PyAV, lossless PNG frames through Pillow.

Files are written to a temporary name and renamed on success, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import av
import numpy as np
from PIL import Image


def encode_mp4(frames, fps: int = 16, scale: int = 1) -> bytes:
    """An iterable of [H, W, 3] uint8 frames as H.264 (yuv420p) MP4 bytes at `fps`.

    Each frame is upscaled by `scale` (nearest neighbour: pixel-art edges stay crisp) as it
    is encoded, so only one upscaled frame is ever in memory.
    """
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = None
        for frame in frames:
            frame = frame.repeat(scale, axis=0).repeat(scale, axis=1)
            if stream is None:
                stream = container.add_stream("libx264", rate=fps)
                # yuv420p needs even sizes; all presets are multiples of 8.
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": "18", "preset": "veryfast"}
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError("no frames to write")
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def write_mp4(frames, path: Path, fps: int = 16, scale: int = 1) -> Path:
    """`encode_mp4` to a file, written under a temporary name and renamed."""
    path = Path(path)
    data = encode_mp4(frames, fps, scale)
    tmp = path.with_name(f".{path.name}.part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_mp4(path: Path) -> np.ndarray:
    """Decode every frame of a video as [T, H, W, 3] uint8."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def write_pngs(frames: np.ndarray, directory: Path, start: int = 0) -> None:
    """Frames as DIR/000000.png, 000001.png, ... (lossless)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames, start):
        tmp = directory / f".{i:06d}.png.part"
        Image.fromarray(frame).save(tmp, format="PNG")
        os.replace(tmp, directory / f"{i:06d}.png")
