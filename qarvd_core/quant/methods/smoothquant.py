"""SmoothQuant (Xiao et al., ICML 2023): migrate activation outliers into weights per input channel,
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), then W8A8-style per-channel weights and per-tensor activations."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qarvd_core.quant.api import Progress, QuantConfig, quantize_each_layer, register
from qarvd_core.quant.calibration import CalibrationSet
from qarvd_core.quant.linear import QuantLinear


@dataclass(frozen=True)
class SmoothQuantConfig(QuantConfig):
    """SmoothQuant: per-input-channel smoothing with migration strength alpha."""

    name = "smoothquant"
    alpha: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def smoothing_factors(x: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [in] from calibration rows x [S, in] and weight w [out, in]."""
    ax = x.abs().amax(0).clamp_min(1e-5)
    aw = w.abs().amax(0).clamp_min(1e-5)
    return (ax.pow(alpha) / aw.pow(1 - alpha)).clamp_min(1e-5)


def smoothed_layer(lin, x: torch.Tensor, config: QuantConfig, alpha: float, act_mode: str) -> QuantLinear:
    """A QuantLinear whose weight absorbs the smoothing factors and whose input is divided by them."""
    s = smoothing_factors(x, lin.weight.detach().float(), alpha)
    q = QuantLinear.from_float(
        lin.weight.detach().float() * s, lin.bias, config.w_spec, config.a_spec, act_mode, "minmax"
    )
    q.set_smoothing(s)
    q.init_activation(x, pcts=(100.0,))
    return q


@register(SmoothQuantConfig)
def run(model, config: SmoothQuantConfig, calib: CalibrationSet, progress: Progress) -> dict:
    return quantize_each_layer(
        model, config, calib, progress, lambda lin, x: smoothed_layer(lin, x, config, config.alpha, "static")
    )
