"""The quantized KV cache on tiny-world: which chunks need bits, quality against the
full-precision cache, and speed.

    python benchmarks/kv_cache.py sensitivity [--scenarios 4] [--chunks 7] [--json PATH]
    python benchmarks/kv_cache.py quality [--weights CHECKPOINT] [--settings NAME ...] [--json PATH]
    python benchmarks/kv_cache.py speed [--rounds 5] [--json PATH]

`sensitivity`: `kv_chunk_sensitivity` (the KV analogue of S1's chunk sensitivity): per
committed chunk k, the final-frame MSE when only chunk k's cache is at 4 bits, on calibration
worlds (the default is chosen on them, not on the held-out ones).

`quality`: `qarvd eval`'s protocol (held-out worlds, the same noise) of the model with each
cache setting against the same model with a full-precision cache, with drift streams (also of
the full-precision cache, their reference); with `--weights`, a quantized checkpoint (e.g. W8A8
Q-ARVD) against itself.

`speed`: chunk time of one stream with each cache setting, interleaved rounds in one process
(the host may be loaded by other work: rounds interleave so load hits every setting alike).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from qarvd_core.checkpoint import load_model
from qarvd_core.eval.bench import bench_stream
from qarvd_core.eval.evaluate import EvalConfig, evaluate
from qarvd_core.quant import kernels
from qarvd_core.quant.analysis import kv_chunk_sensitivity
from qarvd_core.quant.calibration import CalibrationSet
from qarvd_core.quant.kv import AUTO, KVQuantConfig

SETTINGS = {
    "int8": KVQuantConfig(8, 8),
    "int4 (sink int8)": AUTO,
    "int4 (sink int8), unrotated": KVQuantConfig(8, 4, rotate=False),
    "int4": KVQuantConfig(4, 4),
}
SPEED_SETTINGS = ["int8", "int4 (sink int8)"]


def quality(model, cfg: EvalConfig, settings: list[str]) -> dict:
    rows = {}
    for name in settings:
        model.kv_quant = quant = SETTINGS[name]
        r = evaluate(model, _fp_cache(model), cfg)
        rows[name] = {
            "kv_cache": quant.to_dict(),
            "psnr_db_mean": r["psnr_db_mean"],
            "psnr_db_min_scenario": min(r["psnr_db_per_scenario"]),
            "psnr_db_per_chunk": r["psnr_db_per_chunk"],
            "action_accuracy": r["action_accuracy"],
            "reference_action_accuracy": r["reference_action_accuracy"],
            "drift": r.get("drift"),
        }
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "psnr_db_per_chunk"}), file=sys.stderr)
    model.kv_quant = None
    if cfg.drift_frames:  # only its drift streams are wanted: one short held-out world
        short = replace(cfg, scenarios=1, frames=model.args.frames_per_chunk)
        rows["full precision (drift reference)"] = {"drift": evaluate(model, None, short)["drift"]}
    return rows


def _fp_cache(model):
    """The same model (shared modules and weights) streaming with a full-precision cache."""
    twin = copy.copy(model)
    twin.kv_quant = None
    return twin


def speed(model, rounds: int, chunks: int) -> dict:
    names = ["full precision", *SPEED_SETTINGS]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            model.kv_quant = SETTINGS.get(name)
            res = bench_stream(model, chunks=chunks, warmup=2)
            times[name].append(res["chunk_ms"]["p50"])
            print(f"round {r} {name}: p50 {res['chunk_ms']['p50']:.1f} ms", file=sys.stderr)
    model.kv_quant = None
    fp = np.median(times["full precision"])
    return {
        "rounds": rounds,
        "chunks_per_round": chunks,
        "threads": torch.get_num_threads(),
        "chunk_ms_p50_median": {n: float(np.median(t)) for n, t in times.items()},
        "speed_vs_full_precision": {n: float(fp / np.median(t)) for n, t in times.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["sensitivity", "quality", "speed"])
    ap.add_argument("--model", default="tiny-world")
    ap.add_argument("--weights", help="a quantized checkpoint to measure instead of --model")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["int8", "int4 (sink int8)"])
    ap.add_argument(
        "--scenarios", type=int, default=4, help="worlds (held-out for quality, calibration for sensitivity)"
    )
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--drift-frames", type=int, default=600)
    ap.add_argument("--chunks", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.weights or a.model)
    t0 = time.time()
    if a.what == "sensitivity":
        result = kv_chunk_sensitivity(model, 4, CalibrationSet(rollouts=a.scenarios, chunks=a.chunks))
    elif a.what == "quality":
        cfg = EvalConfig(scenarios=a.scenarios, frames=a.frames, drift_frames=a.drift_frames)
        result = quality(model, cfg, a.settings)
    else:
        result = speed(model, a.rounds, a.chunks)
    result = {
        "what": a.what,
        "model": a.weights or a.model,
        "command": "python " + shlex.join(sys.argv),
        "seconds": round(time.time() - t0),
        "torch": torch.__version__,
        "host": asdict(kernels.probe_host()),
        **result,
    }
    text = json.dumps(result, indent=2)
    if a.json:
        a.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
