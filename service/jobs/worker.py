"""`qarvd worker`: a separate process that runs quantization jobs from the Redis queue.

Any number of workers on any host share one queue. Each sweeps for jobs whose heartbeat
stopped (a killed worker) and retries them; on SIGTERM it stops taking jobs and its
running job is handed back the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time

import torch
from redis.exceptions import RedisError
from saq import Worker
from saq.job import Status

from qarvd_core import runtime
from service.jobs.constants import JOB_STATS, QUEUE_NAME, SWEEP_EVERY_S, WORKER_HEARTBEAT, make_queue
from service.jobs.tasks import quantize_job
from service.settings import Settings
from service.store import ModelStore

log = logging.getLogger("qarvd.worker")


async def _beat(queue, name: str, grace_s: float) -> None:
    """Heartbeat every 5 s; return once Redis has been unreachable for `grace_s`.

    A Redis restart (a deploy, a failover) is ridden out; a Redis that is gone for good
    ends the worker instead of leaving it spinning on connection errors forever.
    """
    lost_since = None
    while True:
        try:
            await queue.redis.set(WORKER_HEARTBEAT.format(name=name), time.time(), ex=60)
            if lost_since is not None:
                log.info("Redis is back after %.0f s", time.monotonic() - lost_since)
            lost_since = None
        except (RedisError, OSError) as e:
            if lost_since is None:
                lost_since = time.monotonic()
                log.warning("Redis unreachable (%s); giving up after %.0f s", e, grace_s)
            elif time.monotonic() - lost_since > grace_s:
                return
        await asyncio.sleep(5 if lost_since is None else 1)


async def run_worker(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT (exit status 0) or until Redis is lost (1)."""
    if not settings.redis_url:
        raise ValueError("set QARVD_REDIS_URL (e.g. redis://localhost:6379/0) for a worker")
    device = str(runtime.resolve_device(settings.device))  # a CUDA device this host lacks stops the start here
    settings.artifact_dir.mkdir(parents=True, exist_ok=True)
    if settings.worker_threads:
        torch.set_num_threads(settings.worker_threads)
    if settings.worker_nice:
        os.nice(settings.worker_nice)  # beside a server, its streams come first
    queue = make_queue(settings.redis_url)
    name = f"{socket.gethostname()}-{os.getpid()}"

    async def startup(ctx):
        ctx["store"] = ModelStore(settings.artifact_dir, settings.model_cards)
        ctx["device"] = device

    async def after_process(ctx):
        # Job outcomes and durations go to Redis, so the API exports them for every worker.
        job = ctx.get("job")
        if job is None:
            return
        if job.status == Status.COMPLETE:
            outcome = "cancelled" if (job.result or {}).get("cancelled") else "succeeded"
        elif job.status == Status.FAILED:
            outcome = "failed"
        else:
            outcome = "retried"
        method = ((job.meta or {}).get("request") or {}).get("method", "unknown")
        seconds = max(0.0, (time.time() * 1000 - (job.started or job.queued)) / 1000)
        await queue.redis.hincrby(JOB_STATS, f"{method}|{outcome}|count", 1)
        await queue.redis.hincrbyfloat(JOB_STATS, f"{method}|{outcome}|seconds", seconds)

    worker = Worker(
        queue,
        functions=[quantize_job],
        concurrency=1,
        startup=startup,
        after_process=after_process,
        timers={"sweep": SWEEP_EVERY_S, "schedule": 1, "abort": 1},
    )
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    beat = asyncio.create_task(_beat(queue, name, settings.worker_redis_grace_s))
    run = asyncio.create_task(worker.start())
    log.info("worker %s on %s, jobs run on %s", name, QUEUE_NAME, device)
    await asyncio.wait([run, beat, asyncio.create_task(stopping.wait())], return_when=asyncio.FIRST_COMPLETED)
    lost = beat.done()
    if lost:
        log.error("Redis unreachable for %.0f s; worker exits", settings.worker_redis_grace_s)
    beat.cancel()
    with contextlib.suppress(RedisError, OSError):
        await worker.stop()
        await queue.disconnect()
    return 1 if lost else 0
