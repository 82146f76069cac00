"""RTN: round-to-nearest weights and static activation ranges from calibration (min-max or percentile)."""

from __future__ import annotations

from dataclasses import dataclass

from qarvd_core.quant.api import Progress, QuantConfig, quantize_each_layer, register
from qarvd_core.quant.calibration import CalibrationSet
from qarvd_core.quant.linear import QuantLinear


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Round to nearest; per-channel min-max weights; per-tensor activations clipped at `percentile`."""

    name = "rtn"
    percentile: float = 100.0  # 100: min-max; e.g. 99.99 clips the tails

    def __post_init__(self):
        super().__post_init__()
        if not 50 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")


@register(RTNConfig)
def run(model, config: RTNConfig, calib: CalibrationSet, progress: Progress) -> dict:
    def build(lin, x):
        q = QuantLinear.from_float(lin.weight, lin.bias, config.w_spec, config.a_spec, "static", "minmax")
        q.init_activation(x, pcts=(config.percentile,))
        return q

    return quantize_each_layer(model, config, calib, progress, build)
