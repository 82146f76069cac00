"""RTN: round-to-nearest weights and static activation ranges from calibration (min-max or percentile)."""

from __future__ import annotations

from dataclasses import dataclass

from qarvd_core.quant.api import Progress, QuantConfig, register, swap_module, target_linears
from qarvd_core.quant.calibration import CalibrationSet, collect_inputs
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
    layers = target_linears(model, config.keep_fp)
    progress("collecting", 0.0)
    inputs = collect_inputs(model, layers, calib, progress.bars)
    summary = {}
    for i, (name, lin) in enumerate(layers.items()):
        progress("calibrating", i / len(layers))
        q = QuantLinear.from_float(lin.weight, lin.bias, config.w_spec, config.a_spec, "static", "minmax")
        q.init_activation(inputs[name].stacked()[0], pcts=(config.percentile,))
        swap_module(model, name, q)
        summary[name] = {"kind": "linear", "in": q.in_features, "out": q.out_features}
    return {"layers": summary}
