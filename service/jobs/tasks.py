"""The quantization job: what a worker runs for one REST submission.

The heavy work runs on a thread; the job's coroutine meanwhile heartbeats (so a killed
worker is noticed and the job retried), publishes stage and progress, and watches for a
cancel request, which the work sees at its next step.

Each run of a job is an attempt that takes a lease (a counter in Redis): only the attempt
holding the latest number owns the job. One that lost it (its worker is stopping, or Redis
restarted and the job was re-queued or taken by another worker) stops at its next step and
never writes to the job again. The checkpoint is written and verified in the attempt's own
temporary directory and moved into the artifact directory, manifest last, only after
checking the lease once more: the model store never lists a partial or corrupt model, and a
retried job registers exactly one model however often it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil

from redis.exceptions import RedisError, WatchError
from saq.job import Status
from saq.utils import now

from qarvd_core.checkpoint import load_model, load_quantized, save_quantized
from qarvd_core.eval.evaluate import EvalConfig, evaluate, quantization_metrics_on_prompts
from qarvd_core.quant import CalibrationSet, config_from_dict, quantize
from qarvd_core.quant.api import Progress
from qarvd_core.quant.kv import KVQuantConfig
from service.jobs.constants import CANCEL_KEY, HEARTBEAT_EVERY_S, LEASE_KEY
from service.store import ModelStore

log = logging.getLogger("qarvd.worker")

# Share of the whole job per stage, for one progress number.
_SPAN = {
    "collecting": (0.0, 0.15),
    "sensitivity": (0.15, 0.25),
    "calibrating": (0.25, 0.85),
    "evaluating": (0.85, 0.95),
    "saving": (0.95, 1.0),
}


class Cancelled(Exception):
    pass


class LeaseLost(Exception):
    pass


class Attempt:
    """One run of a job on this worker: its lease, the stage and stop flag the compute thread
    shares with the job's coroutine, and the checks that fence every write to the job."""

    def __init__(self, job, loop: asyncio.AbstractEventLoop):
        self.job, self.loop = job, loop
        self.redis = job.queue.redis
        self.keys = (job.id, LEASE_KEY.format(job=job.key), CANCEL_KEY.format(job=job.key))
        self.token = 0
        self.stage, self.fraction = "collecting", 0.0
        self.stop: str | None = None  # why the work must stop: "cancelled", "lost", "handed back"

    async def claim(self) -> None:
        self.token = await self.redis.incr(self.keys[1])

    def _why_not(self, raw, lease, cancel) -> str | None:
        stored = self.job.queue.deserialize(raw)
        if int(lease or 0) != self.token or stored is None or stored.status != Status.ACTIVE:
            return "lost"
        return "cancelled" if cancel else None

    async def check(self) -> str | None:
        """None while this attempt owns the job and it is not cancelled; else why not."""
        async with self.redis.pipeline(transaction=True) as pipe:
            return self._why_not(*await pipe.get(self.keys[0]).get(self.keys[1]).exists(self.keys[2]).execute())

    async def beat(self) -> str | None:
        """Heartbeat with stage and progress, written only while the job is still this attempt's."""
        lo, hi = _SPAN.get(self.stage, (0.0, 1.0))
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(*self.keys)
            why = self._why_not(*[await pipe.get(k) for k in self.keys[:2]], await pipe.exists(self.keys[2]))
            if why is not None:
                return why
            self.job.progress = round(lo + (hi - lo) * self.fraction, 4)
            self.job.meta = {**(self.job.meta or {}), "stage": self.stage}
            self.job.touched = now()
            pipe.multi()
            pipe.set(self.job.id, self.job.queue.serialize(self.job))
            with contextlib.suppress(WatchError):  # the job changed meanwhile: the next beat looks again
                await pipe.execute()
        return None

    # Called from the compute thread ------------------------------------------------------

    def report(self, stage: str, fraction: float) -> None:
        self._raise_if_stopped()
        self.stage, self.fraction = stage, fraction

    def guard(self) -> None:
        """Ask Redis, right now, whether this attempt may still publish; raise if not."""
        self.stop = self.stop or asyncio.run_coroutine_threadsafe(self.check(), self.loop).result(30)
        self._raise_if_stopped()

    def _raise_if_stopped(self) -> None:
        if self.stop == "cancelled":
            raise Cancelled()
        if self.stop is not None:
            log.info("job %s attempt %d stopped its work: %s", self.job.key, self.token, self.stop)
            raise LeaseLost(self.stop)


def result_model_id(request: dict, job_id: str) -> str:
    return f"{request['base_model']}:{request['method']}-w{request['w_bits']}a{request['a_bits']}-{job_id[:8]}"


def run_quantization(request: dict, job_id: str, store: ModelStore, attempt: Attempt, device: str = "cpu") -> dict:
    """Synchronous: quantize, evaluate, save, verify, publish. Raises Cancelled or LeaseLost at a step.

    The base model, its calibration rollouts and the evaluation run on `device` (the worker's
    QARVD_DEVICE); the calibration's captured activations wait on the CPU."""
    base_id = request["base_model"]
    base_record = store.record(base_id)
    if base_record.kind == "quantized":
        raise ValueError(f"{base_id!r} is already quantized; submit its base model")
    base = load_model(str(base_record.path), device=device)
    config = config_from_dict(
        {
            **request.get("options", {}),
            "method": request["method"],
            "w_bits": request["w_bits"],
            "a_bits": request["a_bits"],
        }
    )
    if request.get("calibration_prompts"):  # a text model: one rollout per prompt
        calib = CalibrationSet.from_prompts(
            request["calibration_prompts"], chunks=request["calibration_chunks"], seed=request["seed"]
        )
    else:
        calib = CalibrationSet(
            rollouts=request["calibration_rollouts"], chunks=request["calibration_chunks"], seed=request["seed"]
        )
    qmodel = quantize(base, config, calib, Progress(bars=False, callback=attempt.report))
    if request.get("kv_bits"):  # measured below and saved with the model: its streams use it when served
        kv_quant = KVQuantConfig.parse(request["kv_bits"])
        qmodel.kv_quant = kv_quant if kv_quant.enabled else None
    metrics = None
    if request.get("evaluate", True) and not base.args.n_prompts:  # a text model
        attempt.report("evaluating", 0.0)
        metrics = quantization_metrics_on_prompts(qmodel, base, list(calib.prompts))
    elif request.get("evaluate", True):
        attempt.report("evaluating", 0.0)
        r = evaluate(qmodel, base, EvalConfig(scenarios=4, frames=24, drift_frames=0))
        metrics = {k: r[k] for k in ("psnr_db_mean", "ssim_mean", "action_accuracy", "reference_action_accuracy")}
    attempt.report("saving", 0.0)
    attempt.guard()
    model_id = result_model_id(request, job_id)
    tmp = store.artifact_dir / f".job-{job_id}-{attempt.token}"
    for stale in store.artifact_dir.glob(f".job-{job_id}-*"):  # left by earlier attempts whose worker was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        path = save_quantized(qmodel, tmp / f"{model_id}.safetensors", base_id, metrics, base_path=base_record.path)
        load_quantized(path)  # refuse to publish what cannot be loaded back
        attempt.report("saving", 0.5)
        attempt.guard()
        store.publish(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"model_id": model_id, "metrics": metrics}


async def quantize_job(ctx: dict, *, request: dict) -> dict:
    """SAQ task: run_quantization on a thread, with heartbeats, progress, cancellation and the lease.

    An attempt that lost its lease ends by raising CancelledError from this task: SAQ then
    writes nothing to the job, which belongs to a newer attempt (or waits for one).
    """
    job = ctx["job"]
    attempt = Attempt(job, asyncio.get_running_loop())
    await attempt.claim()
    attempt.stop = await attempt.beat()  # cancelled before it started, or already handed on

    async def heartbeat() -> None:
        while attempt.stop is None:
            await asyncio.sleep(HEARTBEAT_EVERY_S)
            with contextlib.suppress(RedisError, OSError):  # Redis away for a moment: the lease decides later
                attempt.stop = await attempt.beat()

    beat = asyncio.create_task(heartbeat())
    try:
        attempt.report(attempt.stage, 0.0)
        result = await asyncio.get_running_loop().run_in_executor(
            None, run_quantization, request, job.key, ctx["store"], attempt, ctx["device"]
        )
    except asyncio.CancelledError:  # the worker is stopping (SAQ hands the job back) or SAQ aborts it
        attempt.stop = attempt.stop or "handed back"
        raise
    except Cancelled:
        return {"cancelled": True}
    except LeaseLost:
        raise asyncio.CancelledError from None
    except Exception:
        if await attempt.check() == "lost":
            raise asyncio.CancelledError from None
        raise
    finally:
        beat.cancel()
    job.meta = {**(job.meta or {}), "stage": "done"}
    return result
