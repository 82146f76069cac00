"""The paper's two observations, measured on any model: the per-chunk sensitivity curve (C1)
and the per-layer outlier map (C2), each written as JSON and a PNG; and C1's analogue for the
KV cache (`kv_chunk_sensitivity`), which picks the chunks whose cache keeps more bits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qarvd_core.model import WorldModel
from qarvd_core.quant.api import quantize, target_linears
from qarvd_core.quant.calibration import CalibrationSet
from qarvd_core.quant.kv import KVQuantConfig
from qarvd_core.quant.methods.qarvd import QArvdConfig, chunk_sensitivity, find_outlier_columns, frame_weights_from
from qarvd_core.sampling import rollout


def sensitivity(
    model: WorldModel, w_bits: int, a_bits: int, calib: CalibrationSet, rollouts: int, progress: bool = True
) -> dict:
    """C1: e_k with quantizers initialised but not optimised (as the official measurement)."""
    init_only = QArvdConfig(w_bits=w_bits, a_bits=a_bits, frame_weighting=False, recon_iters=0)
    qmodel = quantize(model, init_only, calib, progress=progress)
    errors = chunk_sensitivity(model, qmodel, calib, rollouts, progress)
    return {
        "w_bits": w_bits,
        "a_bits": a_bits,
        "rollouts": rollouts,
        "calibration": calib.describe(),
        "chunk_mse": errors,
        "frame_weights": frame_weights_from(errors),
        "first_last_ratio": errors[0] / errors[-1] if errors[-1] > 0 else None,
    }


def kv_chunk_sensitivity(
    model: WorldModel, bits: int, calib: CalibrationSet, rotate: bool = True, progress: bool = True
) -> dict:
    """Per committed chunk k: the MSE of the final frame when only chunk k's cached keys and values
    are stored at `bits` (`KVQuantConfig.chunk_bits`, every other chunk in full precision),
    against the full-precision cache; same scenarios, noise and actions. The last chunk's cache
    is never read, so it is left out."""
    from tqdm import tqdm

    cases = calib.scenarios(model.args.frames_per_chunk)
    scripts = [c.biome for c in cases], [list(c.actions) for c in cases], [c.noise_seed for c in cases]
    saved = model.kv_quant
    try:
        model.kv_quant = None
        ref = rollout(model, *scripts)[:, -1]
        mse = []
        for k in tqdm(range(calib.chunks - 1), desc="KV chunk sensitivity", disable=not progress):
            model.kv_quant = KVQuantConfig(None, None, rotate, chunk_bits={k: bits})
            mse.append(float((rollout(model, *scripts)[:, -1] - ref).pow(2).mean()))
    finally:
        model.kv_quant = saved
    return {
        "bits": bits,
        "rotate": rotate,
        "calibration": calib.describe(),
        "sink_chunks": model.args.sink_chunks,
        "window_chunks": model.args.window_chunks,
        "final_frame_mse": mse,
    }


def outlier_map(model: WorldModel, config: QArvdConfig = QArvdConfig()) -> dict:
    """C2: the input columns S2 isolates per block layer (count rounded up to a multiple of 32)."""
    rows = []
    for name, lin in target_linears(model, config.keep_fp).items():
        m = re.match(r"blocks\.(\d+)\.(.+)", name)
        if not m:
            continue
        idx = find_outlier_columns(lin.weight.detach(), config.outlier_z, config.outlier_ratio, config.outlier_align)
        rows.append(
            {"layer": name, "depth": int(m.group(1)), "type": m.group(2), "in": lin.in_features, "outliers": len(idx)}
        )
    return {"layers": rows, "dual_scale_layers": sum(r["outliers"] > 0 for r in rows), "total_layers": len(rows)}


def write_json_and_plot(result: dict, json_path: Path, kind: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    json_path.write_text(json.dumps(result, indent=2) + "\n")
    png = json_path.with_suffix(".png")
    if kind == "sensitivity":
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        ax[0].semilogy(range(len(result["chunk_mse"])), result["chunk_mse"], marker="o")
        ax[0].set(
            xlabel="quantized chunk k",
            ylabel="MSE of final video vs FP",
            title=f"C1: chunk sensitivity (W{result['w_bits']}A{result['a_bits']})",
        )
        ax[1].bar(range(len(result["frame_weights"])), result["frame_weights"])
        ax[1].set(xlabel="chunk", ylabel="frame weight (mean 1)", title="S1 weights")
    else:
        types = sorted({r["type"] for r in result["layers"]})
        depth = max(r["depth"] for r in result["layers"]) + 1
        grid = np.zeros((len(types), depth))
        for r in result["layers"]:
            grid[types.index(r["type"]), r["depth"]] = r["outliers"]
        fig, ax = plt.subplots(figsize=(1.2 + 0.7 * depth, 0.5 + 0.45 * len(types)))
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set(yticks=range(len(types)), yticklabels=types, xlabel="block", title="C2: outlier input columns")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, int(v), ha="center", va="center", color="k" if v > grid.max() / 2 else "w", fontsize=8)
        fig.colorbar(im)
    fig.tight_layout()
    if result.get("command"):
        fig.text(0.0, 1.0, result["command"], fontsize=7, family="monospace", va="bottom")
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [json_path, png]
