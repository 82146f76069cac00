"""The quantized KV cache on tiny-world: which chunks need bits, quality against the
full-precision cache, and speed.

    python benchmarks/kv_cache.py sensitivity [--json PATH]
    python benchmarks/kv_cache.py quality [--weights CHECKPOINT] [--json PATH]
    python benchmarks/kv_cache.py speed [--rounds 5] [--json PATH]

`sensitivity`: per committed chunk k, the stream is rolled out with only chunk k's cache at
4 bits (every other chunk's in full precision, the same noise), and the MSE of the final frame
against the full-precision rollout is averaged over held-out worlds (the KV analogue of S1's
chunk sensitivity), for unrotated and rotated codes.

`quality`: `qarvd eval`'s protocol (held-out worlds, the same noise) of the model with each
cache setting against the same model with a full-precision cache, with the 600-frame drift
streams; with `--weights`, a quantized checkpoint (e.g. W8A8 Q-ARVD) against itself.

`speed`: chunk time of one stream with each cache setting, interleaved rounds in one process
(the host may be loaded by other work: rounds interleave so load hits every setting alike).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from qarvd_core.checkpoint import load_model
from qarvd_core.eval.bench import bench_stream
from qarvd_core.eval.evaluate import EvalConfig, evaluate
from qarvd_core.model import KVCache
from qarvd_core.quant.kv import AUTO, KVQuantConfig, TokenStore
from qarvd_core.sampling import rollout, to_uint8
from qarvd_core.world.scripts import scenarios

SETTINGS = {
    "int8": KVQuantConfig(8, 8),
    "int4 (sink int8)": AUTO,
    "int4 (sink int8), unrotated": KVQuantConfig(8, 4, rotate=False),
    "int4": KVQuantConfig(4, 4),
}


class OneChunkAtLowBits(KVCache):
    """A full-precision cache except for one committed chunk (`chunk`), whose keys and values
    go through `bits`-bit codes (`TokenStore`) before they are kept."""

    chunk, bits, rotate = 0, 4, True

    def store(self, i, kv) -> None:
        if self.committed != self.chunk:
            return
        n, ct = self.length, self.args.chunk_tokens
        for t in kv[:2]:
            part = t[:, :, n : n + ct]
            one = TokenStore((1, *part.shape), self.bits, part.device, part.dtype, self.rotate)
            one.write(0, 0, part)
            part.copy_(one.read(0, ct))


def sensitivity(model, cases: int, chunks: int) -> dict:
    cs = scenarios("heldout", cases, chunks * model.args.frames_per_chunk)
    args = ([c.biome for c in cs], [list(c.actions) for c in cs], [c.noise_seed for c in cs])
    ref = to_uint8(rollout(model, *args))[:, -1].astype(np.float64)
    out = {}
    for rotate in (False, True):
        mse = []
        for k in range(chunks - 1):  # the last chunk's cache is never read
            OneChunkAtLowBits.chunk, OneChunkAtLowBits.rotate = k, rotate
            with mock.patch("qarvd_core.sampling.KVCache", OneChunkAtLowBits):
                last = to_uint8(rollout(model, *args))[:, -1].astype(np.float64)
            mse.append(float(((last - ref) ** 2).mean()))
            print(f"rotate={rotate} chunk {k}: final-frame MSE {mse[-1]:.3f}", file=sys.stderr)
        out["rotated" if rotate else "unrotated"] = mse
    return {"scenarios": cases, "chunks": chunks, "bits": 4, "final_frame_mse": out}


def quality(model, cfg: EvalConfig) -> dict:
    rows = {}
    for name, quant in SETTINGS.items():
        model.kv_quant = quant
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
    rows["full precision (drift reference)"] = {"drift": evaluate(model, None, cfg).get("drift")}
    return rows


def _fp_cache(model):
    """The same model (shared modules and weights) streaming with a full-precision cache."""
    twin = copy.copy(model)
    twin.kv_quant = None
    return twin


def speed(model, rounds: int, chunks: int) -> dict:
    names = ["full precision", *SETTINGS]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            model.kv_quant = SETTINGS.get(name)
            res = bench_stream(model, chunks=chunks, warmup=2)
            times[name].append(res["chunk_ms"]["p50"])
            print(f"round {r} {name}: p50 {res['chunk_ms_p50']:.1f} ms", file=sys.stderr)
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
    ap.add_argument("--scenarios", type=int, default=8)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--drift-frames", type=int, default=600)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.weights or a.model)
    t0 = time.time()
    if a.what == "sensitivity":
        result = sensitivity(model, a.scenarios, a.chunks)
    elif a.what == "quality":
        result = quality(model, EvalConfig(scenarios=a.scenarios, frames=a.frames, drift_frames=a.drift_frames))
    else:
        result = speed(model, a.rounds, a.chunks)
    result = {
        "what": a.what,
        "model": a.weights or a.model,
        "command": "python " + " ".join(sys.argv),
        "seconds": round(time.time() - t0),
        "torch": torch.__version__,
        **result,
    }
    text = json.dumps(result, indent=2)
    if a.json:
        a.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
