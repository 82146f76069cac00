"""Soak: a 30-minute stream's worth of frames through the real server, on a tiny config.

`tiny-world` streams ~16 frames/s, so 30 minutes is 28,800 frames. A miniature model (same
architecture, dim 32, one block, random weights) makes that many frames in minutes through
the same server, engine, rolling cache, encoder and WebSocket path. Server memory and
per-frame latency are sampled every 1,000 frames; flat means no leak and no latency creep.

    python benchmarks/stream_soak.py --frames 28800 --out benchmarks/results/stream_soak
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import ServerProcess, StreamClient

from qarvd_core.checkpoint import save_weights
from qarvd_core.model import ModelArgs, WorldModel

MINI = ModelArgs(dim=32, n_layers=1, n_heads=2, ffn_dim=64, text_dim=16)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=28_800, help="30 minutes at 16 frames/s")
    ap.add_argument("--every", type=int, default=1_000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/stream_soak"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = WorldModel(MINI)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        save_weights(model, Path(tmp) / "soak-mini.safetensors", preset=None)
        server = ServerProcess(
            artifact_dir=tmp, default_model="soak-mini", fps_target=10_000, drift_sample_rate=0, threads=1
        )
        samples = []
        try:
            c = StreamClient(server.ws_url)
            c.start(model="soak-mini")
            t0, n = time.perf_counter(), 0
            while n < a.frames:
                got = c.frames(a.every, timeout=60)
                n += len(got)
                samples.append(
                    {
                        "frames": n,
                        "seconds": round(time.perf_counter() - t0, 2),
                        "rss_mb": round(rss_mb(server.proc.pid), 1),
                        "latency_ms": round(float(np.mean([h["latency_ms"] for h, _ in got])), 3),
                        "chunk": got[-1][0]["chunk"],
                    }
                )
            c.close()
        finally:
            server.stop()
    q = max(1, len(samples) // 4)
    first, last = samples[:q], samples[-q:]
    r = {
        "frames": samples[-1]["frames"],
        "seconds": samples[-1]["seconds"],
        "model": MINI.to_dict(),
        "rss_mb_first_quarter": float(np.mean([s["rss_mb"] for s in first])),
        "rss_mb_last_quarter": float(np.mean([s["rss_mb"] for s in last])),
        "latency_ms_first_quarter": float(np.mean([s["latency_ms"] for s in first])),
        "latency_ms_last_quarter": float(np.mean([s["latency_ms"] for s in last])),
        "samples": samples,
    }
    a.out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    md = [
        f"# Stream soak: {r['frames']} frames (30 min at 16 fps) through the server, tiny config",
        "",
        "| measure | first quarter | last quarter |",
        "|---|---|---|",
        f"| server RSS MB | {r['rss_mb_first_quarter']:.1f} | {r['rss_mb_last_quarter']:.1f} |",
        f"| frame latency ms | {r['latency_ms_first_quarter']:.2f} | {r['latency_ms_last_quarter']:.2f} |",
        "",
        f"{r['seconds']:.0f} s wall; samples every {a.every} frames in the JSON.",
    ]
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
