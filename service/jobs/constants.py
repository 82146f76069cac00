"""Job states, stages, queue name and Redis keys: the one place they are spelled.

Why SAQ: jobs carry a heartbeat, and SAQ's sweeper retries an active job only when its
heartbeat stops (a killed worker), never because it runs long; it has aborts (cancel),
retries with backoff, progress and metadata on the job, and asyncio workers. arq re-runs
by a fixed timeout, which would run a long healthy calibration twice; Celery's visibility
timeout has the same problem on Redis.
"""

from __future__ import annotations

from enum import StrEnum

from redis.asyncio import Redis
from saq.queue.redis import RedisQueue

QUEUE_NAME = "qarvd-quantization"
HEARTBEAT_EVERY_S = 1  # how often a running job heartbeats (its allowed silence is a setting)
SWEEP_EVERY_S = 5  # SAQ also holds its sweep lock this long: a dead worker's job moves within seconds

IDEMPOTENCY_KEY = "qarvd:idempotency:{key}"  # -> {"job": id, "body": sha256}
CANCEL_KEY = "qarvd:cancel:{job}"  # set by DELETE; the worker stops at its next step
JOB_INDEX = "qarvd:jobs"  # sorted set: job id by submission time
WORKER_HEARTBEAT = "qarvd:worker:{name}"  # seconds-since-epoch of the worker's last beat
JOB_STATS = "qarvd:stats:jobs"  # hash: "method|outcome|count" and "method|outcome|seconds", from workers


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


STAGES = ("queued", "collecting", "sensitivity", "calibrating", "evaluating", "saving", "done")


def make_queue(redis_url: str) -> RedisQueue:
    """The jobs queue on `redis_url` (redis://, rediss:// or unix:// for the embedded server)."""
    return RedisQueue(Redis.from_url(redis_url), name=QUEUE_NAME)
