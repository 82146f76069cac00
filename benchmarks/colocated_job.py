"""A live stream beside a quantization job in `qarvd serve`'s embedded worker, on the same cores.

Starts `qarvd serve` with default settings (its own Redis and worker), measures one stream's
frames/s alone, then submits a real quantization job and measures the same stream while the
job runs, until it finishes. The target: the stream keeps >= 0.5x its rate alone, and the job
still succeeds. Writes JSON with the thread budgets and the host's load average (the ratio
means little on a box busy with other work).

    python benchmarks/colocated_job.py --out benchmarks/results/colocated_job.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from harness import ServerProcess, StreamClient

from service.jobs.embedded import thread_budgets
from service.settings import Settings


class FrameCounter(threading.Thread):
    """Reads one stream, noting when each frame arrives; steers once a second, as a player would."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.client = StreamClient(url)
        self.client.start(prompt="islands", seed=0)
        self.arrivals: list[float] = []
        self.running = True

    def run(self) -> None:
        last_action = 0.0
        while self.running:
            self.arrivals += [time.monotonic() for _ in self.client.frames(1, timeout=5)]
            if time.monotonic() - last_action > 1:
                self.client.send({"type": "action", "action": "right" if int(last_action) % 4 < 2 else "up"})
                last_action = time.monotonic()
        self.client.close()

    def rate(self, t0: float, t1: float) -> float:
        return sum(t0 <= t < t1 for t in self.arrivals) / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-world")
    ap.add_argument("--alone-seconds", type=float, default=20)
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--w-bits", type=int, default=8)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--calibration-rollouts", type=int, default=4)
    ap.add_argument("--calibration-chunks", type=int, default=7)
    ap.add_argument("--job-timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/colocated_job.json"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qarvd-colocated-"))
    engine_threads, worker_threads = thread_budgets(Settings())
    r: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": a.model,
        "cores": len(os.sched_getaffinity(0)),
        "engine_threads": engine_threads,
        "worker_threads": worker_threads,
        "load_average_before": os.getloadavg(),
    }
    server = ServerProcess(default_model=a.model, artifact_dir=work / "artifacts", data_dir=work / "data")
    try:
        stream = FrameCounter(server.ws_url)
        stream.start()
        time.sleep(3)  # past the first frames
        t0 = time.monotonic()
        time.sleep(a.alone_seconds)
        r["fps_alone"] = stream.rate(t0, time.monotonic())

        body = {
            "base_model": a.model,
            "method": a.method,
            "w_bits": a.w_bits,
            "a_bits": a.a_bits,
            "calibration_rollouts": a.calibration_rollouts,
            "calibration_chunks": a.calibration_chunks,
        }
        r["job_request"] = body
        job = httpx.post(server.url + "/v1/quantization-jobs", json=body, timeout=30).json()
        t_submit = time.monotonic()
        started = None
        while time.monotonic() - t_submit < a.job_timeout:
            view = httpx.get(f"{server.url}/v1/quantization-jobs/{job['id']}", timeout=30).json()
            if started is None and view["status"] == "running":
                started = time.monotonic()
            if view["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.5)
        t_end = time.monotonic()
        stream.running = False
        stream.join()
        r["job_status"], r["job_attempts"] = view["status"], view["attempts"]
        r["job_seconds"] = round(t_end - (started or t_submit), 1)
        r["job_result_model"] = view["result_model"]
        r["fps_during_job"] = stream.rate(started or t_submit, t_end)
        r["ratio"] = round(r["fps_during_job"] / r["fps_alone"], 3)
        r["target_ratio"] = 0.5
        r["load_average_after"] = os.getloadavg()
    finally:
        server.stop()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2) + "\n")
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
