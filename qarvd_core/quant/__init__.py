"""Quantization framework: `quantize(model, config, calibration)` and the versioned checkpoint format."""

from qarvd_core.quant.api import METHODS, ConfigError, QuantConfig, config_from_dict, quantize
from qarvd_core.quant.calibration import CalibrationSet
from qarvd_core.quant.linear import DualScaleQuantLinear, QuantLinear, set_compute_dtype, set_mode
from qarvd_core.quant.methods import QArvdConfig, RTNConfig

__all__ = [
    "METHODS",
    "CalibrationSet",
    "ConfigError",
    "DualScaleQuantLinear",
    "QArvdConfig",
    "QuantConfig",
    "QuantLinear",
    "RTNConfig",
    "config_from_dict",
    "quantize",
    "set_compute_dtype",
    "set_mode",
]
