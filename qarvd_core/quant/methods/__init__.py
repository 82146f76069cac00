"""Quantization methods; importing this package registers each one by name."""

from qarvd_core.quant.methods.qarvd import QArvdConfig
from qarvd_core.quant.methods.rtn import RTNConfig

__all__ = ["QArvdConfig", "RTNConfig"]
