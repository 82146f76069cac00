"""ViDiT-Q-style (Zhao et al., ICLR 2025): channel balancing of activations into weights plus
fine-grained dynamic (per-token) activation quantization, per-channel weights."""

from __future__ import annotations

from dataclasses import dataclass

from qarvd_core.quant.api import Progress, QuantConfig, quantize_each_layer, register
from qarvd_core.quant.calibration import CalibrationSet
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
    return quantize_each_layer(
        model, config, calib, progress, lambda lin, x: smoothed_layer(lin, x, config, config.balance, "dynamic")
    )
