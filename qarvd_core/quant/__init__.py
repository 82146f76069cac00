"""Quantization framework: `quantize(model, config, calibration)`, its methods and their named recipes."""

from qarvd_core.quant.api import METHODS, ConfigError, QuantConfig, config_from_dict, config_from_manifest, quantize
from qarvd_core.quant.calibration import CalibrationSet
from qarvd_core.quant.linear import DualScaleQuantLinear, QuantLinear, set_compute_dtype, set_mode
from qarvd_core.quant.methods import GPTQConfig, QArvdConfig, RTNConfig
from qarvd_core.recipes import RECIPES

__all__ = [
    "METHODS",
    "CalibrationSet",
    "ConfigError",
    "DualScaleQuantLinear",
    "GPTQConfig",
    "QArvdConfig",
    "QuantConfig",
    "QuantLinear",
    "RECIPES",
    "RTNConfig",
    "config_from_dict",
    "config_from_manifest",
    "quantize",
    "set_compute_dtype",
    "set_mode",
]
