"""Quantization methods; importing this package registers each one by name."""

from qarvd_core.quant.methods.gptq import GPTQConfig
from qarvd_core.quant.methods.qarvd import QArvdConfig
from qarvd_core.quant.methods.rtn import RTNConfig
from qarvd_core.quant.methods.smoothquant import SmoothQuantConfig
from qarvd_core.quant.methods.viditq import ViDiTQConfig

__all__ = ["GPTQConfig", "QArvdConfig", "RTNConfig", "SmoothQuantConfig", "ViDiTQConfig"]
