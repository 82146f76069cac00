"""qarvd: a streaming, action-conditioned autoregressive video diffusion model, quantized with Q-ARVD."""

__version__ = "0.1.0"
