"""Uniform quantizers, clipping-range searches and learned rounding.

A quantizer maps x to integers q = clamp(round(x / scale) + zero, qmin, qmax) and back to
scale * (q - zero). Weights are per output channel, asymmetric as in the paper's code or
symmetric (zero = 0); activations are asymmetric per tensor (static) or symmetric per token
(dynamic). Everything here is plain tensor code shared by simulate mode (fake quant), the
calibration searches and deploy mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    symmetric: bool

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}; use e.g. 4 or 8")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def round_ste(x: Tensor) -> Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def quantize(x: Tensor, scale: Tensor, zero: Tensor | float, spec: QuantSpec) -> Tensor:
    """Integer codes (as float) of x."""
    return torch.clamp(torch.round(x / scale) + zero, spec.qmin, spec.qmax)


def fake_quant(x: Tensor, scale: Tensor, zero: Tensor | float, spec: QuantSpec) -> Tensor:
    """Quantize-dequantize with straight-through gradients to x and to scale (LSQ-style)."""
    q = torch.clamp(round_ste(x / scale) + zero, spec.qmin, spec.qmax)
    return (q - zero) * scale


def scale_zero_from_range(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and (integer) zero point that map [lo, hi] onto the code range."""
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs()).clamp_min(1e-8)
        return amax / spec.qmax, torch.zeros_like(amax)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(1e-8)
    zero = torch.round(spec.qmin - lo / scale)
    return scale, zero


def percentile_range(x: Tensor, pct: float) -> tuple[Tensor, Tensor]:
    """Per-tensor [pct-th lowest, pct-th highest] percentile, pct in (50, 100]."""
    flat = x.flatten().float()
    if flat.numel() > 1_000_000:  # quantile has a size limit; a strided sample keeps the tails well enough
        flat = flat[:: math.ceil(flat.numel() / 1_000_000)]
    return torch.quantile(flat, 1 - pct / 100), torch.quantile(flat, pct / 100)


# The official Q-ARVD code searches these clipping percentiles for weights and activations.
SEARCH_PERCENTILES = (99.9, 99.99, 99.999)


def minmax_weight(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per-output-channel (scale, zero) [out] from each row's min and max."""
    return scale_zero_from_range(w.amin(dim=1), w.amax(dim=1), spec)


def mse_search_weight(w: Tensor, spec: QuantSpec, pcts=SEARCH_PERCENTILES) -> tuple[Tensor, Tensor]:
    """Per-output-channel (scale, zero) [out]: the clipping percentile with the least squared error per row."""
    w = w.float()
    best_scale, best_zero, best_err = None, None, None
    for pct in pcts:
        lo = torch.quantile(w, 1 - pct / 100, dim=1)
        hi = torch.quantile(w, pct / 100, dim=1)
        scale, zero = scale_zero_from_range(lo, hi, spec)
        err = (fake_quant(w, scale[:, None], zero[:, None], spec) - w).pow(2).mean(dim=1)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
        else:
            better = err < best_err
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best_err = torch.where(better, err, best_err)
    return best_scale, best_zero


def weighted_mse_search_activation(
    x: Tensor, spec: QuantSpec, sample_weights: Tensor | None = None, pcts=SEARCH_PERCENTILES
) -> tuple[Tensor, Tensor]:
    """Per-tensor (scale, zero) for activations x [S, ..., C] chosen by (weighted) MSE.

    Candidates are percentile clipping ranges; the error of sample s is weighted by
    sample_weights[s] (Q-ARVD's frame weights: early chunks matter more).
    """
    w = torch.ones(x.shape[0]) if sample_weights is None else sample_weights.float()
    best, best_err = None, float("inf")
    for pct in pcts:
        lo, hi = percentile_range(x, pct)
        scale, zero = scale_zero_from_range(lo, hi, spec)
        err = (fake_quant(x, scale, zero, spec) - x).pow(2).flatten(1).mean(1)
        err = float((err * w).sum() / w.sum())
        if err < best_err:
            best, best_err = (scale, zero), err
    return best


class AdaRound(nn.Module):
    """Learned rounding of a weight (Nagel et al. 2020): codes = clamp(floor(w/s) + h(V) + z).

    h is a rectified sigmoid initialised at the fractional part of w/s (so training starts
    from w itself); a regulariser pushes h to 0 or 1 as its exponent beta anneals.
    """

    zeta, gamma = 1.1, -0.1

    def __init__(self, w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("scale", scale.reshape(-1, 1).float().clone())
        self.register_buffer("zero", zero.reshape(-1, 1).float().clone())
        self.register_buffer("w_floor", torch.floor(w.float() / self.scale))
        rest = (w.float() / self.scale - self.w_floor).clamp(0.01, 0.99)
        self.alpha = nn.Parameter(-torch.log((self.zeta - self.gamma) / (rest - self.gamma) - 1))

    def h(self) -> Tensor:
        return (torch.sigmoid(self.alpha) * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)

    def codes(self, hard: bool = True) -> Tensor:
        up = (self.alpha >= 0).float() if hard else self.h()
        return torch.clamp(self.w_floor + up + self.zero, self.spec.qmin, self.spec.qmax)

    def forward(self, hard: bool = False) -> Tensor:
        """The (soft or hard) quantized weight, dequantized."""
        return (self.codes(hard) - self.zero) * self.scale

    def regulariser(self, beta: float) -> Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()
