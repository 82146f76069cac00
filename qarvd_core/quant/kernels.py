"""Integer GEMM kernels for deploy mode: quantize -> torch._int_mm -> rescale.

On these CPUs a bare `_int_mm` is several times an fp32 matmul, but the quantize and
rescale around it are elementwise passes over the activations that eager mode runs one
op at a time. Compiled with the rest of a block (`WorldModel.compile_blocks`), the quantize
fuses into the op that produced the activations and the rescale into the one that consumes
the result (static activation scales make that possible).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _asym_fix(acc: Tensor, a: Tensor, w_zero: Tensor, colsum: Tensor, za: Tensor, k: int, asym_w: bool) -> Tensor:
    # (a - za)(w - zw)^T = a w^T - zw * rowsum(a) - za * colsum(w) + K * za * zw, in int32.
    acc = acc - za * colsum
    if asym_w:
        acc = acc - a.sum(1, keepdim=True, dtype=torch.int32) * w_zero + k * za * w_zero
    return acc


def int8_linear_static(
    x: Tensor,
    wt: Tensor,
    colsum: Tensor,
    w_zero: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    a_scale: Tensor,
    a_zero: Tensor,
    qmin: int,
    qmax: int,
    offset: int,
    asym_w: bool,
) -> Tensor:
    """x [M, K] float, wt [K, N] int8 (centred codes), per-tensor static activation scale/zero."""
    a = (torch.clamp(torch.round(x / a_scale) + a_zero, qmin, qmax) - offset).to(torch.int8)
    za = (a_zero - offset).to(torch.int32)
    acc = _asym_fix(torch._int_mm(a, wt), a, w_zero, colsum, za, x.shape[1], asym_w)
    y = acc.float() * (a_scale * w_scale)
    return y if bias is None else y + bias


def int8_linear_dynamic(
    x: Tensor, wt: Tensor, colsum: Tensor, w_zero: Tensor, w_scale: Tensor, bias: Tensor | None, bits: int, asym_w: bool
) -> Tensor:
    """Per-token symmetric dynamic activations (ViDiT-Q style)."""
    qmax = 2 ** (bits - 1) - 1
    s = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-8)
    a = torch.clamp(torch.round(x / s), -qmax - 1, qmax).to(torch.int8)
    zero = torch.zeros((), dtype=torch.int32, device=x.device)
    acc = _asym_fix(torch._int_mm(a, wt), a, w_zero, colsum, zero, x.shape[1], asym_w)
    y = acc.float() * (s * w_scale)
    return y if bias is None else y + bias
