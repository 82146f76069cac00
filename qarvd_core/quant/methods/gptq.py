"""GPTQ (Frantar et al., ICLR 2023): quantize weight columns in order and compensate each column's
error on the remaining columns with the inverse Hessian H = 2 X^T X; activations as RTN."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qarvd_core.quant.api import Progress, QuantConfig, check_act_mode, quantize_each_layer, register
from qarvd_core.quant.calibration import CalibrationSet
from qarvd_core.quant.linear import QuantLinear
from qarvd_core.quant.primitives import QuantSpec, minmax_weight, quantize


@dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    """GPTQ: Hessian-based weight rounding (damping `percdamp`, block size `block`), RTN activations."""

    name = "gptq"
    percdamp: float = 0.01
    block: int = 128
    act_mode: str = "static"  # or "dynamic": per-token ranges at run time

    def __post_init__(self):
        super().__post_init__()
        check_act_mode(self.act_mode)
        if not 0 < self.percdamp < 1 or self.block < 1:
            raise ValueError("percdamp must be in (0, 1) and block >= 1")


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


@register(GPTQConfig)
def run(model, config: GPTQConfig, calib: CalibrationSet, progress: Progress) -> dict:
    def build(lin, x):
        q = QuantLinear(
            lin.in_features, lin.out_features, config.w_spec, config.a_spec, config.act_mode, bias=lin.bias is not None
        )
        q.set_weight(*gptq_codes(lin.weight.detach(), x, config.w_spec, config.percdamp, config.block))
        if lin.bias is not None:
            q.bias = lin.bias.detach().float().clone()
        q.init_activation(x, pcts=(100.0,))  # static only
        return q

    return quantize_each_layer(model, config, calib, progress, build)
