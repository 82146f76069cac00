"""Streaming speed on this host of FP32 and W8A8/W4A8 deploy mode, per kernel backend, and what `auto` picks.

`qarvd bench`'s measurement (`bench_stream`) for each variant, every variant timed once per
round and the rounds interleaved, so that each "x FP32" is the median of per-round ratios
against FP32 eager in the same round (other load on the machine then cancels out). The
quantized models are RTN with static per-tensor activations and symmetric weights (speed does
not depend on the rounding method); `small-world` has no shipped weights, so it runs with random ones.
The results name the host (CPU model, torch's capability), the date and the commit.

    python benchmarks/host_speed.py --models tiny-world small-world --out benchmarks/results/host_speed_avx2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from quant_speed import model_named  # benchmarks run as scripts: this folder is on the path

from qarvd_core import runtime
from qarvd_core.checkpoint import DTYPES
from qarvd_core.eval.bench import bench_stream
from qarvd_core.model import WorldModel
from qarvd_core.quant import CalibrationSet, RTNConfig, kernels, quantize, set_compute_dtype, set_mode


def rtn(fp32: WorldModel, w_bits: int = 8) -> WorldModel:
    config = RTNConfig(w_bits=w_bits, w_symmetric=True)
    return set_mode(quantize(fp32, config, CalibrationSet(rollouts=2, chunks=2)), "deploy")


def variants(name: str, compiled: bool, backends: list[str]) -> dict:
    """label -> (model, kernels backend or None, compiled)."""
    fp32 = model_named(name)
    out = {"fp32 eager": (fp32, None, False)}
    for backend in backends:
        kernels.use_backend(backend)
        out[f"W8A8 {backend} eager"] = (rtn(fp32), backend, False)
        # Weights of 7 bits or fewer need no extra columns on FBGEMM's AVX2 kernel (`kernels.fbgemm_columns`).
        out[f"W4A8 {backend} eager"] = (rtn(fp32, 4), backend, False)
    if compiled:
        out["fp32 compiled"] = (model_named(name).compile_blocks(), None, True)
        for backend in backends:
            kernels.use_backend(backend)
            out[f"W8A8 {backend} compiled"] = (rtn(fp32).compile_blocks(), backend, True)
            out[f"W4A8 {backend} compiled"] = (rtn(fp32, 4).compile_blocks(), backend, True)
    if compiled:  # what `auto` serves here, as `qarvd serve` loads it
        for label, quantized in (("auto, FP32 model", False), ("auto, W8A8", True)):
            p = runtime.plan(quantized=quantized)
            kernels.use_backend(p.kernels)
            dtype = DTYPES[p.dtype]
            model = set_compute_dtype(rtn(fp32), dtype) if quantized else model_named(name).to(dtype)
            out[label] = (model.compile_blocks() if p.compile else model, p.kernels, p.compile)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-world"])
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compiled", action="store_true", help="also compiled variants (compiles take minutes)")
    ap.add_argument("--backends", nargs="+", default=["fbgemm"], choices=list(kernels.BACKENDS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/host_speed"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "host": asdict(kernels.probe_host()),
        "auto": {"fp32": asdict(runtime.plan()), "quantized": asdict(runtime.plan(quantized=True))},
        # FBGEMM picks its own kernels (VNNI where the CPU has it) unless this caps them, as
        # ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA cap torch's and oneDNN's.
        "fbgemm_isa": os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "uncapped"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "chunks": a.chunks,
        "rounds": a.rounds,
        "models": {},
    }
    for name in a.models:
        runs = variants(name, a.compiled, a.backends)
        fps: dict[str, list[float]] = {label: [] for label in runs}
        for r in range(a.rounds):
            for label, (model, backend, _) in runs.items():
                kernels.use_backend(backend)
                fps[label].append(bench_stream(model, chunks=a.chunks, warmup=2 if r else 3)["fps"])
                print(f"{name} round {r} {label}: {fps[label][-1]:.2f} frames/s", flush=True)
        base = np.array(fps["fp32 eager"])
        result["models"][name] = {
            label: {
                "fps": float(np.median(v)),
                "x_fp32": float(np.median(np.array(v) / base)),
                "x_fp32_range": [float(min(np.array(v) / base)), float(max(np.array(v) / base))],
                "kernels": runs[label][1],
                "compiled": runs[label][2],
            }
            for label, v in fps.items()
        }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    h = result["host"]
    lines = [
        f"# Streaming speed: {h['cpu']}, torch capability {h['capability']} (VNNI {h['vnni']}, AMX {h['amx']}, "
        f"native bf16 {h['native_bf16']}, FBGEMM {result['fbgemm_isa']}), {result['threads']} threads, "
        f"torch {result['torch']}, "
        f"{result['date']}, commit {commit}",
        "",
        f"`python benchmarks/host_speed.py --models {' '.join(a.models)} --chunks {a.chunks} --rounds {a.rounds}"
        + (f" --threads {a.threads}" if a.threads else "")
        + f" --backends {' '.join(a.backends)}"
        + (" --compiled" if a.compiled else "")
        + "`; x FP32: median over rounds of the per-round ratio to FP32 eager (range in brackets).",
        "",
        f"`auto` here, FP32 models: {runtime.plan().describe()}.",
        "",
        f"`auto` here, quantized models: {runtime.plan(quantized=True).describe()}.",
        "",
        "| model | variant | frames/s | x FP32 |",
        "|---|---|---|---|",
    ]
    for name, rows in result["models"].items():
        for label, r in rows.items():
            lo, hi = r["x_fp32_range"]
            lines.append(f"| {name} | {label} | {r['fps']:.2f} | {r['x_fp32']:.2f} [{lo:.2f}, {hi:.2f}] |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
