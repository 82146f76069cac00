"""ViDiT-Q-style (Zhao et al., ICLR 2025): channel balancing of activations into weights plus
fine-grained dynamic (per-token) activation quantization, per-channel weights."""

from __future__ import annotations

from dataclasses import dataclass

from qarvd_core.quant.api import Progress, QuantConfig, register, swap_module, target_linears
from qarvd_core.quant.calibration import CalibrationSet, collect_inputs
from qarvd_core.quant.methods.smoothquant import smoothed_layer


@dataclass(frozen=True)
class ViDiTQConfig(QuantConfig):
    """ViDiT-Q core rules: channel balancing (strength `balance`) + per-token dynamic activations."""

    name = "vidit-q"
    balance: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.balance <= 1:
            raise ValueError(f"balance must be in [0, 1], got {self.balance}")


@register(ViDiTQConfig)
def run(model, config: ViDiTQConfig, calib: CalibrationSet, progress: Progress) -> dict:
    layers = target_linears(model, config.keep_fp)
    progress("collecting", 0.0)
    inputs = collect_inputs(model, layers, calib, progress.bars)
    summary = {}
    for i, (name, lin) in enumerate(layers.items()):
        progress("calibrating", i / len(layers))
        q = smoothed_layer(lin, inputs[name].stacked()[0], config, config.balance, "dynamic")
        swap_module(model, name, q)
        summary[name] = {"kind": "linear", "in": q.in_features, "out": q.out_features, "act_mode": "dynamic"}
    return {"layers": summary}
