"""Streaming service benchmark: a real server process and real WebSocket clients on loopback.

Measures, in one run: the model's in-process `qarvd bench` rate; time to first frame;
one session's frame rate; four concurrent sessions (aggregate, min and max per session);
a client that stops reading (server memory, dropped frames, the other session's rate);
and a long run's memory and latency trend. Pacing is off (fps_target very high) so the
rates are the server's capacity. Writes JSON and a Markdown table.

    python benchmarks/stream_service.py --model tiny-world --out benchmarks/results/stream_service
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

from qarvd_core.checkpoint import DTYPES, load_model
from qarvd_core.eval.bench import bench_stream


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def count_frames(url: str, seconds: float, results: list, index: int, **start) -> None:
    c = StreamClient(url)
    c.start(**start)
    c.frames(6, timeout=60)  # warm-up
    t0, n = time.perf_counter(), 0
    lat = []
    while time.perf_counter() - t0 < seconds:
        got = c.frames(1, timeout=5)
        n += len(got)
        lat += [h["latency_ms"] for h, _ in got]
    results[index] = {"fps": n / (time.perf_counter() - t0), "frame_latency_ms_mean": sum(lat) / max(len(lat), 1)}
    c.close()


def concurrent(url: str, sessions: int, seconds: float) -> list[dict]:
    results: list = [None] * sessions
    threads = [
        threading.Thread(target=count_frames, args=(url, seconds, results, i), kwargs={"seed": i})
        for i in range(sessions)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-world", help="a model id: shipped, or in --artifact-dir")
    ap.add_argument("--artifact-dir", type=Path, default=Path("artifacts"))
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--slow-seconds", type=float, default=30)
    ap.add_argument("--long-seconds", type=float, default=120)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="QARVD_DTYPE for the server and the bench")
    ap.add_argument("--compile", action="store_true", help="QARVD_COMPILE: compiled blocks in the server and the bench")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/stream_service"))
    a = ap.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    r: dict = {"model": a.model, "threads": torch.get_num_threads(), "dtype": a.dtype, "compiled": a.compile}

    local = a.artifact_dir / f"{a.model}.safetensors"
    model = load_model(str(local) if local.is_file() else a.model, dtype=DTYPES[a.dtype])
    r["qarvd_bench"] = bench_stream(model.compile_blocks() if a.compile else model, chunks=30)
    server = ServerProcess(
        ready_timeout=600,  # compiling every batch size up to max_sessions takes minutes on 2 cores
        default_model=a.model,
        artifact_dir=a.artifact_dir,
        fps_target=1000,
        max_sessions=8,
        drift_sample_rate=0,
        send_buffer_bytes=65536,
        dtype=a.dtype,
        compile=a.compile,
    )
    try:
        ttff = []
        for i in range(5):
            c = StreamClient(server.ws_url)
            t0 = time.perf_counter()
            c.start(seed=i)
            c.frames(1)
            ttff.append(time.perf_counter() - t0)
            c.close()
        r["time_to_first_frame_s"] = {"min": min(ttff), "max": max(ttff), "mean": sum(ttff) / len(ttff)}
        r["one_session"] = concurrent(server.ws_url, 1, a.seconds)[0]
        four = concurrent(server.ws_url, 4, a.seconds)
        r["four_sessions"] = {
            "aggregate_fps": sum(x["fps"] for x in four),
            "min_fps": min(x["fps"] for x in four),
            "max_fps": max(x["fps"] for x in four),
        }
        r["four_vs_one"] = r["four_sessions"]["aggregate_fps"] / r["one_session"]["fps"]
        r["one_session_vs_bench"] = r["one_session"]["fps"] / r["qarvd_bench"]["fps"]

        slow = StreamClient(server.ws_url, recv_buffer=4096, max_queue=1)
        slow.start(format="png")
        rss0 = rss_mb(server.proc.pid)
        other: list = [None]
        count_frames(server.ws_url, a.slow_seconds, other, 0)
        metrics = httpx.get(server.url + "/metrics").text
        dropped = sum(float(x.split()[-1]) for x in metrics.splitlines() if x.startswith("qarvd_frames_dropped_total"))
        r["slow_reader"] = {
            "seconds": a.slow_seconds,
            "server_rss_mb_start": rss0,
            "server_rss_mb_end": rss_mb(server.proc.pid),
            "frames_dropped": dropped,
            "other_session_fps": other[0]["fps"],
        }
        slow.close()

        c = StreamClient(server.ws_url)
        c.start()
        samples, t0 = [], time.perf_counter()
        while time.perf_counter() - t0 < a.long_seconds:
            got = c.frames(30, timeout=30)
            samples.append(
                {
                    "t": time.perf_counter() - t0,
                    "rss_mb": rss_mb(server.proc.pid),
                    "latency_ms": sum(h["latency_ms"] for h, _ in got) / max(len(got), 1),
                }
            )
        c.close()
        q = max(1, len(samples) // 4)
        first, last = samples[:q], samples[-q:]
        r["long_run"] = {
            "seconds": a.long_seconds,
            "rss_mb_first_quarter": sum(s["rss_mb"] for s in first) / len(first),
            "rss_mb_last_quarter": sum(s["rss_mb"] for s in last) / len(last),
            "latency_ms_first_quarter": sum(s["latency_ms"] for s in first) / len(first),
            "latency_ms_last_quarter": sum(s["latency_ms"] for s in last) / len(last),
        }
    finally:
        server.stop()

    a.out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    rows = [
        ("qarvd bench (in-process) fps", f"{r['qarvd_bench']['fps']:.1f}"),
        (
            "time to first frame, mean (max) s",
            f"{r['time_to_first_frame_s']['mean']:.3f} ({r['time_to_first_frame_s']['max']:.3f})",
        ),
        ("one session fps (ratio to qarvd bench)", f"{r['one_session']['fps']:.1f} ({r['one_session_vs_bench']:.2f})"),
        (
            "four sessions: aggregate fps (x one), min/max per session",
            f"{r['four_sessions']['aggregate_fps']:.1f} ({r['four_vs_one']:.2f}x), "
            f"{r['four_sessions']['min_fps']:.1f}/{r['four_sessions']['max_fps']:.1f}",
        ),
        (
            f"slow reader {a.slow_seconds:g} s: server RSS MB start/end, dropped, other session fps",
            f"{r['slow_reader']['server_rss_mb_start']:.0f}/{r['slow_reader']['server_rss_mb_end']:.0f}, "
            f"{r['slow_reader']['frames_dropped']:.0f}, {r['slow_reader']['other_session_fps']:.1f}",
        ),
        (
            f"long run {a.long_seconds:g} s: RSS MB first/last quarter, latency ms first/last",
            f"{r['long_run']['rss_mb_first_quarter']:.0f}/{r['long_run']['rss_mb_last_quarter']:.0f}, "
            f"{r['long_run']['latency_ms_first_quarter']:.1f}/{r['long_run']['latency_ms_last_quarter']:.1f}",
        ),
    ]
    md = [f"# Streaming service, model {a.model} ({r['threads']} threads)", "", "| measure | value |", "|---|---|"]
    a.out.with_suffix(".md").write_text("\n".join(md + [f"| {k} | {v} |" for k, v in rows]) + "\n")
    print(a.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
