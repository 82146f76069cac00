"""A live stream's frame rate alone and while POST /v1/videos renders 600 frames, in one run.

The server runs as deployed: streams paced at fps_target (16 frames/s), one render at a
time, the render stepped by the engine a chunk at a time between the stream's chunks. The
stream's delivered frames/s is measured before the render, during it and after it; the
ratio is during / the mean of before and after. Writes JSON and a Markdown table.

    python benchmarks/stream_with_render.py --model tiny-world --out benchmarks/results/stream_with_render
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import httpx
import torch
from harness import ServerProcess, StreamClient

SCRIPT = "right*150,down*150,left*150,up*150"  # 600 frames


def receive(client: StreamClient, until) -> tuple[int, float]:
    """Frames received until `until()` is true, and the seconds it took; steers once a second
    like a player (a silent client would be ended as idle)."""
    t0 = last = time.perf_counter()
    n, turn = 0, 0
    while not until(time.perf_counter() - t0):
        n += len(client.frames(1, timeout=1))
        if time.perf_counter() - last > 1:
            last, turn = time.perf_counter(), turn + 1
            client.send({"type": "action", "action": ("right", "down", "left", "up")[turn % 4]})
    return n, time.perf_counter() - t0


def rate(client: StreamClient, seconds: float) -> float:
    """Frames/s the client receives over `seconds`."""
    n, elapsed = receive(client, lambda t: t >= seconds)
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-world", help="a model id: shipped, or in --artifact-dir")
    ap.add_argument("--artifact-dir", type=Path, default=Path("artifacts"))
    ap.add_argument("--seconds", type=float, default=15, help="measuring time alone, before and after the render")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/stream_with_render"))
    a = ap.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(default_model=a.model, artifact_dir=a.artifact_dir, drift_sample_rate=0)
    r: dict = {"model": a.model, "threads": torch.get_num_threads(), "script": SCRIPT}
    try:
        c = StreamClient(server.ws_url)
        c.start(seed=1)
        c.frames(12, timeout=60)  # warm-up
        before = rate(c, a.seconds)
        response: list = []
        body = {"model": a.model, "actions": SCRIPT, "seed": 2}
        render = threading.Thread(
            target=lambda: response.append(httpx.post(server.url + "/v1/videos", json=body, timeout=900))
        )
        render.start()
        n, render_s = receive(c, lambda _: not render.is_alive())
        if response[0].status_code != 200:
            raise SystemExit(f"render failed: {response[0].status_code} {response[0].text[:200]}")
        after = rate(c, a.seconds)
        c.close()
    finally:
        server.stop()
    alone = (before + after) / 2
    r.update(
        fps_alone_before=before,
        fps_alone_after=after,
        fps_during_render=n / render_s,
        render_seconds=render_s,
        render_frames_per_s=600 / render_s,
        ratio=n / render_s / alone,
    )
    a.out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    rows = [
        ("stream frames/s alone: before / after the render", f"{before:.1f} / {after:.1f}"),
        ("stream frames/s during the 600-frame render", f"{r['fps_during_render']:.1f}"),
        ("ratio during / alone (target >= 0.8)", f"{r['ratio']:.2f}"),
        ("render: seconds (frames/s)", f"{render_s:.1f} ({r['render_frames_per_s']:.1f})"),
    ]
    md = [f"# A live stream during a video render, model {a.model} ({r['threads']} threads)", ""]
    md += ["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(a.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
