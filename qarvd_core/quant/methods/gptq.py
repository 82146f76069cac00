"""GPTQ (Frantar et al., ICLR 2023): quantize weight columns in order and compensate each column's
error on the remaining columns with the inverse Hessian H = 2 X^T X; activations as RTN.
`act_aware` is GPTQv2's asymmetric calibration (Li et al. 2025)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qarvd_core.quant.api import Progress, QuantConfig, check_act_mode, quantize_each_layer, register
from qarvd_core.quant.calibration import CalibrationSet
from qarvd_core.quant.linear import WEIGHT_INITS, DualScaleQuantLinear, QuantLinear
from qarvd_core.quant.primitives import QuantSpec, minmax_weight, quantize


@dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    """GPTQ: Hessian-based weight rounding (damping `percdamp`, block size `block`), RTN activations."""

    name = "gptq"
    percdamp: float = 0.01
    block: int = 128
    act_mode: str = "static"  # or "dynamic": per-token ranges at run time
    # Round against the inputs as the quantized layer sees them (activation-quantized), aiming
    # at the FP outputs, so the weights also absorb the activation error (GPTQv2).
    act_aware: bool = False
    weight_init: str = "minmax"  # per-channel scales: "minmax", or "mse" (searched clipping)

    def __post_init__(self):
        super().__post_init__()
        check_act_mode(self.act_mode)
        if not 0 < self.percdamp < 1 or self.block < 1:
            raise ValueError("percdamp must be in (0, 1) and block >= 1")
        if self.weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {tuple(WEIGHT_INITS)}, got {self.weight_init!r}")


def gptq_codes(
    w: torch.Tensor,
    x: torch.Tensor,
    spec: QuantSpec,
    percdamp: float,
    block: int,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    x_quant: torch.Tensor | None = None,
):
    """(codes, scale, zero) for w [out, in] given calibration rows x [S, in]; `scale`/`zero` [out]
    (or [out, in], one quantizer per weight, e.g. the two column groups of a dual-scale layer)
    default to per-channel min-max; `row_weights` [S] weight each row's error (Q-ARVD's S1).

    `x_quant` [S, in]: the same rows as the quantized layer sees them (activation-quantized).
    GPTQ then minimises ||x_quant Q(W)^T - x W^T|| rather than ||x Q(W)^T - x W^T||, so the
    weights also absorb the activation quantization error (the asymmetric calibration of
    GPTQv2, Li et al. 2025): it rounds W* = argmin_V ||x_quant V^T - x W^T||^2 + damping
    ||V - W||^2 with the Hessian of x_quant.
    """
    w = w.float().clone()
    x = x.double()
    r = torch.ones(len(x), dtype=x.dtype) if row_weights is None else row_weights.double()
    if x_quant is not None:
        xq = x_quant.double()
        H = 2 * (xq * r[:, None]).T @ xq / r.sum()
        damp = percdamp * torch.diag(H).mean() * torch.eye(len(H), dtype=H.dtype)
        cross = 2 * (xq * r[:, None]).T @ x / r.sum()
        w = torch.linalg.solve(H + damp, (cross + damp) @ w.double().T).T.float()
    else:
        H = 2 * (x * r[:, None]).T @ x / r.sum()
    if scale is None:
        scale, zero = minmax_weight(w, spec)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    w[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(len(H), dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    col_scale, col_zero = (t[:, None].expand_as(w) if t.dim() == 1 else t for t in (scale, zero))
    codes = torch.zeros_like(w)
    n = w.shape[1]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, Hinv1 = w[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col, d = W1[:, i], Hinv1[i, i]
            s, z = col_scale[:, i1 + i], col_zero[:, i1 + i]
            q = quantize(col, s, z, spec)
            codes[:, i1 + i] = q
            err = (col - (q - z) * s) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None]
            Err1[:, i] = err
        w[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, scale, zero


def gptq_round(layer: nn.Module, w: torch.Tensor, x: torch.Tensor, config: GPTQConfig, row_weights=None) -> None:
    """Replace the codes of a quantized `layer` (a QuantLinear, or a DualScaleQuantLinear whose
    two parts are rounded in one pass, so each part's error is compensated on the other's
    columns too) by GPTQ's, on its own scales; `x` [S, in] are its FP inputs, `w` its FP weight."""
    groups = [(part, slice(None) if idx is None else idx) for part, idx in parts(layer)]
    scale, zero = torch.empty_like(w), torch.empty_like(w)
    x_quant = torch.empty_like(x) if config.act_aware else None
    for part, cols in groups:
        scale[:, cols] = part.w_scale[:, None]
        zero[:, cols] = own_zero(part)[:, None]
        if config.act_aware:
            x_quant[:, cols] = part.quantize_input(x[:, cols])
    codes, _, _ = gptq_codes(w, x, config.w_spec, config.percdamp, config.block, scale, zero, row_weights, x_quant)
    for part, cols in groups:
        part.set_weight(codes[:, cols], part.w_scale, own_zero(part))


def parts(layer: nn.Module) -> list[tuple[QuantLinear, torch.Tensor | None]]:
    """A layer's quantizers and their input columns (None: all)."""
    return layer.parts() if isinstance(layer, DualScaleQuantLinear) else [(layer, None)]


def own_zero(part: QuantLinear) -> torch.Tensor:
    """Zero points [out] in the quantizer's own code range (QuantLinear stores them centred into int8)."""
    return part.w_zero + (0 if part.w_spec.symmetric else 2 ** (part.w_spec.bits - 1))


@register(GPTQConfig)
def run(model, config: GPTQConfig, calib: CalibrationSet, progress: Progress) -> dict:
    def build(lin, x):
        w = lin.weight.detach().float()
        q = QuantLinear.from_float(w, lin.bias, config.w_spec, config.a_spec, config.act_mode, config.weight_init)
        q.init_activation(x, pcts=(100.0,))  # static only; act-aware rounding sees these ranges
        gptq_round(q, w, x, config)
        return q

    return quantize_each_layer(model, config, calib, progress, build)
