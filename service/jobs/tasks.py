"""The quantization job: what a worker runs for one REST submission.

The heavy work runs on a thread; the job's coroutine meanwhile heartbeats (so a killed
worker is noticed and the job retried), publishes stage and progress, and watches for a
cancel request, which the work sees at its next step. The checkpoint is written and
verified in a private temporary directory and only then moved into the artifact
directory, manifest last: the registry never sees a partial or corrupt model. A retried
job writes the same model id, so a job registers exactly one model however often it runs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from qarvd_core.config import load_model
from qarvd_core.eval.evaluate import EvalConfig, evaluate
from qarvd_core.quant import CalibrationSet, config_from_dict, quantize
from qarvd_core.quant.api import Progress
from qarvd_core.quant.serialization import load_quantized, save_quantized
from service.engine.registry import ModelRegistry
from service.jobs.constants import CANCEL_KEY, HEARTBEAT_EVERY_S

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


def result_model_id(request: dict, job_id: str) -> str:
    return f"{request['base_model']}:{request['method']}-w{request['w_bits']}a{request['a_bits']}-{job_id[:8]}"


def run_quantization(request: dict, job_id: str, artifact_dir: Path, report) -> dict:
    """Synchronous: quantize, evaluate, save, verify, publish. `report(stage, fraction)` may raise Cancelled."""
    registry = ModelRegistry(artifact_dir)
    base_id = request["base_model"]
    base_path = registry.path_of(base_id)
    if registry.base_of(base_id) is not None:
        raise ValueError(f"{base_id!r} is already quantized; submit its base model")
    base = load_model(str(base_path))
    config = config_from_dict(
        {
            "method": request["method"],
            "w_bits": request["w_bits"],
            "a_bits": request["a_bits"],
            **request.get("options", {}),
        }
    )
    calib = CalibrationSet(
        rollouts=request["calibration_rollouts"], chunks=request["calibration_chunks"], seed=request["seed"]
    )
    qmodel = quantize(base, config, calib, Progress(bars=False, callback=report))
    metrics = None
    if request.get("evaluate", True):
        report("evaluating", 0.0)
        r = evaluate(qmodel, base, EvalConfig(scenarios=4, frames=24, drift_frames=0))
        metrics = {k: r[k] for k in ("psnr_db_mean", "ssim_mean", "action_accuracy", "reference_action_accuracy")}
    report("saving", 0.0)
    model_id = result_model_id(request, job_id)
    tmp = artifact_dir / f".job-{job_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        path = save_quantized(qmodel, tmp / f"{model_id}.safetensors", base_id, metrics, base_path=base_path)
        load_quantized(path)  # refuse to publish what cannot be loaded back
        report("saving", 0.5)
        os.replace(path, artifact_dir / path.name)
        os.replace(path.with_suffix(".json"), artifact_dir / f"{model_id}.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"model_id": model_id, "metrics": metrics}


async def quantize_job(ctx: dict, *, request: dict) -> dict:
    """SAQ task: run_quantization on a thread, with heartbeats, progress and cancellation."""
    job = ctx["job"]
    redis = job.queue.redis
    state = {"stage": "collecting", "fraction": 0.0, "cancel": False}

    def report(stage: str, fraction: float) -> None:  # called from the compute thread
        if state["cancel"]:
            raise Cancelled()
        state["stage"], state["fraction"] = stage, fraction

    async def heartbeat() -> None:
        while True:
            state["cancel"] = bool(await redis.exists(CANCEL_KEY.format(job=job.key)))
            lo, hi = _SPAN.get(state["stage"], (0.0, 1.0))
            await job.update(
                progress=round(lo + (hi - lo) * state["fraction"], 4),
                meta={**(job.meta or {}), "stage": state["stage"]},
            )
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    beat = asyncio.create_task(heartbeat())
    try:
        await asyncio.sleep(0)  # first beat: cancel flag and 'running' stage before work starts
        result = await asyncio.get_running_loop().run_in_executor(
            None, run_quantization, request, job.key, Path(ctx["artifact_dir"]), report
        )
    except Cancelled:
        return {"cancelled": True}
    finally:
        beat.cancel()
    await job.update(progress=1.0, meta={**(job.meta or {}), "stage": "done"})
    return result
