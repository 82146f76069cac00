"""Queue name and Redis keys: the one place they are spelled (job states: `service.schemas.JobState`).

Why SAQ: jobs carry a heartbeat, and SAQ's sweeper retries an active job only when its
heartbeat stops (a killed worker), never because it runs long; it has aborts (cancel),
retries with backoff, progress and metadata on the job, and asyncio workers. arq re-runs
by a fixed timeout, which would run a long healthy calibration twice; Celery's visibility
timeout has the same problem on Redis.
"""

from __future__ import annotations

import time

from redis.asyncio import Redis
from saq.queue.redis import RedisQueue

QUEUE_NAME = "qarvd-quantization"
HEARTBEAT_EVERY_S = 1  # how often a running job heartbeats (its allowed silence is a setting)
SWEEP_EVERY_S = 5  # SAQ also holds its sweep lock this long: a dead worker's job moves within seconds

IDEMPOTENCY_KEY = "qarvd:idempotency:{key}"  # -> {"job": id, "body": sha256}
CANCEL_KEY = "qarvd:cancel:{job}"  # set by DELETE; the worker stops at its next step
# Incremented by each attempt as it starts: only the attempt holding the latest number owns the
# job (may heartbeat it, publish its model, finish it); an older one stops at its next step.
LEASE_KEY = "qarvd:lease:{job}"
JOB_INDEX = "qarvd:jobs"  # sorted set: job id by submission time
WORKER_HEARTBEAT = "qarvd:worker:{name}"  # seconds-since-epoch of the worker's last beat
JOB_STATS = "qarvd:stats:jobs"  # hash: "method|outcome|count" and "method|outcome|seconds", from workers


class _Queue(RedisQueue):
    """SAQ's queue with a grace period before a new process's first sweep.

    A job enters the active list a moment before its worker marks it active, and SAQ's
    sweep takes such a job for a dead one. A worker sweeps as it starts, just when it
    dequeues the jobs that waited for it; the grace keeps those from being run twice.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._born = time.monotonic()

    async def sweep(self, lock: int = 60, abort: float = 5.0) -> list[str]:
        if time.monotonic() - self._born < 2 * SWEEP_EVERY_S:
            return []
        return await super().sweep(lock, abort)


def make_queue(redis_url: str, **redis_options) -> RedisQueue:
    """The jobs queue on `redis_url` (redis://, rediss:// or unix:// for the embedded server).

    redis-py retries a command on a fresh connection when a pooled one turns out dead, so the
    first request after a Redis restart succeeds.
    """
    return _Queue(Redis.from_url(redis_url, **redis_options), name=QUEUE_NAME)
