"""The paper's two observations, measured on any model: the per-chunk sensitivity curve (C1)
and the per-layer outlier map (C2). Each writes JSON and a PNG.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qarvd_core.model import WorldModel
from qarvd_core.quant.api import quantize, target_linears
from qarvd_core.quant.calibration import CalibrationSet
from qarvd_core.quant.methods.qarvd import QArvdConfig, chunk_sensitivity, find_outlier_columns, frame_weights_from


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
