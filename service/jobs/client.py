"""The API's side of jobs: submit (idempotent), read, list, cancel. It never runs a job."""

from __future__ import annotations

import hashlib
import json
import time
import uuid

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from saq.job import Status

from service.jobs.constants import (
    CANCEL_KEY,
    IDEMPOTENCY_KEY,
    JOB_INDEX,
    JOB_STATS,
    WORKER_HEARTBEAT,
    make_queue,
)
from service.jobs.tasks import result_model_id
from service.schemas import JobState

_TERMINAL = {JobState.succeeded, JobState.failed, JobState.cancelled}

# Takes a job no worker holds out of the queue, atomically: one still queued, or one waiting
# for a retry (scheduled, and not in the active list). Returns 1 if it did: the job is then
# the caller's to finish; 0 if a worker has it (or it has ended).
_UNQUEUE = """
if redis.call('LREM', KEYS[1], 0, ARGV[1]) > 0 then
    redis.call('ZREM', KEYS[2], ARGV[1])
    return 1
end
local at = redis.call('ZSCORE', KEYS[2], ARGV[1])
if at and tonumber(at) > 0 and not redis.call('LPOS', KEYS[3], ARGV[1]) then
    redis.call('ZREM', KEYS[2], ARGV[1])
    return 1
end
return 0
"""


class IdempotencyConflict(Exception):
    pass


def _state(job, cancel_requested: bool) -> JobState:
    if job.status in (Status.NEW, Status.QUEUED):
        return JobState.queued
    if job.status in (Status.ACTIVE, Status.ABORTING):
        return JobState.running
    if job.status == Status.COMPLETE:
        return JobState.cancelled if (job.result or {}).get("cancelled") else JobState.succeeded
    if job.status == Status.ABORTED:
        return JobState.cancelled if cancel_requested else JobState.failed
    return JobState.failed


class JobClient:
    def __init__(self, redis_url: str, attempts: int = 3, retry_delay_s: float = 1.0, heartbeat_s: int = 10):
        # Bounded waits: a Redis that stops answering gives a 503 within seconds, not a request
        # hanging; retries on a fresh connection carry the first request after a Redis restart.
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1)
        self.queue = make_queue(redis_url, socket_connect_timeout=2, socket_timeout=3, retry=retry)
        self.redis = self.queue.redis
        self._unqueue = self.redis.register_script(_UNQUEUE)
        self.attempts, self.retry_delay_s, self.heartbeat_s = attempts, retry_delay_s, heartbeat_s

    async def connect(self) -> None:
        await self.queue.connect()

    async def close(self) -> None:
        await self.queue.disconnect()

    async def submit(self, request: dict, idempotency_key: str | None = None) -> tuple[dict, bool]:
        """(job view, created). The same key with the same body gives the same job; another body conflicts."""
        job_id = uuid.uuid4().hex
        if idempotency_key is not None:
            body = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
            key = IDEMPOTENCY_KEY.format(key=idempotency_key)
            if not await self.redis.set(key, json.dumps({"job": job_id, "body": body}), nx=True, ex=7 * 86400):
                existing = json.loads(await self.redis.get(key))
                if existing["body"] != body:
                    raise IdempotencyConflict(f"Idempotency-Key {idempotency_key!r} was used with another request")
                return await self.get(existing["job"], request), False
        await self.redis.zadd(JOB_INDEX, {job_id: time.time()})
        await self.queue.enqueue(
            "quantize_job",
            key=job_id,
            kwargs={"request": request},
            timeout=0,
            heartbeat=self.heartbeat_s,
            retries=self.attempts,
            retry_delay=self.retry_delay_s,
            retry_backoff=True,
            ttl=0,
            meta={"stage": "queued", "request": request},
        )
        return await self.get(job_id, request), True

    async def get(self, job_id: str, pending_request: dict | None = None) -> dict | None:
        job = await self.queue.job(job_id)
        if job is None:
            if pending_request is None:
                return None
            # Reserved by an idempotent submit that has not enqueued yet: it is queued.
            return self._view(job_id, JobState.queued, pending_request)
        cancel = bool(await self.redis.exists(CANCEL_KEY.format(job=job_id)))
        if cancel and job.stuck:
            # Cancelled, and no attempt has beaten for longer than it may: nothing else will end it.
            await self.queue.finish(job, Status.ABORTED, error="cancelled")
        return self._view(job_id, _state(job, cancel), (job.meta or {}).get("request", {}), job)

    def _view(self, job_id: str, state: JobState, request: dict, job=None) -> dict:
        result = (job.result if job is not None else None) or {}
        error = job.error if job is not None and state == JobState.failed else None
        return {
            "id": job_id,
            "status": state.value,
            "stage": (job.meta or {}).get("stage", "queued") if job is not None else "queued",
            "progress": 1.0 if state == JobState.succeeded else (job.progress if job is not None else 0.0),
            "attempts": job.attempts if job is not None else 0,
            "error": _summary(error),
            "request": request,
            "result_model": result.get("model_id") if state == JobState.succeeded else None,
            "metrics": result.get("metrics") if state == JobState.succeeded else None,
            "expected_model": result_model_id(request, job_id) if request else None,
            "created": job.queued / 1000 if job is not None and job.queued else None,
            "started": job.started / 1000 if job is not None and job.started else None,
            "finished": job.completed / 1000 if job is not None and job.completed else None,
        }

    async def list(self, status: JobState | None, limit: int, offset: int) -> list[dict]:
        ids = await self.redis.zrevrange(JOB_INDEX, 0, -1)
        out = []
        for raw in ids:
            view = await self.get(raw.decode() if isinstance(raw, bytes) else raw)
            if view is not None and (status is None or view["status"] == status):
                out.append(view)
        return out[offset : offset + limit]

    async def cancel(self, job_id: str) -> dict | None:
        """A queued job never runs; a running one stops at its next progress step."""
        job = await self.queue.job(job_id)
        if job is None:
            return None
        await self.redis.set(CANCEL_KEY.format(job=job_id), 1, ex=7 * 86400)
        # Only a job taken out of the queue here is finished here: one a worker took a moment ago
        # belongs to that worker, which sees the cancel key before it starts work.
        keys = [self.queue.namespace(k) for k in ("queued", "incomplete", "active")]
        if await self._unqueue(keys=keys, args=[job.id]):
            await self.queue.finish(await self.queue.job(job_id), Status.ABORTED, error="cancelled")
        return await self.get(job_id)

    async def snapshot(self) -> dict:
        """Numbers for /metrics: queue depth, jobs by state, outcomes and durations, worker beats."""
        by_state = {s.value: 0 for s in JobState}
        for raw in await self.redis.zrevrange(JOB_INDEX, 0, 999):
            view = await self.get(raw.decode() if isinstance(raw, bytes) else raw)
            if view is not None:
                by_state[view["status"]] += 1
        stats: dict[tuple[str, str], dict] = {}
        for k, v in (await self.redis.hgetall(JOB_STATS)).items():
            method, outcome, what = (k.decode() if isinstance(k, bytes) else k).split("|")
            stats.setdefault((method, outcome), {})[what] = float(v)
        workers = {}
        async for key in self.redis.scan_iter(WORKER_HEARTBEAT.format(name="*")):
            beat = await self.redis.get(key)
            if beat is not None:
                name = (key.decode() if isinstance(key, bytes) else key).rsplit(":", 1)[-1]
                workers[name] = max(0.0, time.time() - float(beat))
        return {
            "queue_depth": int(await self.queue.count("queued") or 0),
            "by_state": by_state,
            "outcomes": stats,
            "worker_heartbeat_age": workers,
        }


def is_terminal(view: dict) -> bool:
    return JobState(view["status"]) in _TERMINAL


def _summary(error: str | None) -> str | None:
    """The exception line and the last frames of a traceback, not the whole thing."""
    if not error:
        return None
    lines = [x for x in error.strip().splitlines() if x.strip()]
    return "\n".join(lines[-6:])
