"""Integer GEMM kernels for deploy mode: quantize -> torch._int_mm -> rescale.

On these CPUs a bare `_int_mm` is several times an fp32 matmul, but the quantize and
rescale around it are elementwise passes over the activations that eager mode runs one
op at a time. Compiled with the rest of a block (`WorldModel.compile_blocks`), the quantize
fuses into the op that produced the activations and the rescale into the one that consumes
the result (static activation scales make that possible).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Below this many rows, when the layer has more outputs than rows, oneDNN's int8 GEMM runs up to
# 2x faster on the transposed problem (benchmarks/gemm_shapes.py, "transposed" column).
CPU_TRANSPOSE_MAX_ROWS = 384


def int_mm(a: Tensor, w: Tensor) -> Tensor:
    """a [M, K] int8 times w [N, K] int8, transposed: int32 [M, N]."""
    if a.device.type == "cuda":
        return int_mm_padded(a, w)
    if a.shape[0] <= CPU_TRANSPOSE_MAX_ROWS and w.shape[0] > a.shape[0]:
        return torch._int_mm(w, a.t()).t()  # (W a^T)^T; the rescale reads the transposed view
    return torch._int_mm(a, w.t())


def int_mm_padded(a: Tensor, w: Tensor, min_rows: int = 17, align: int = 8) -> Tensor:
    """`int_mm` for kernels with shape rules (CUDA's int8 GEMM: M > 16, K and N multiples of 8).

    Zero rows and columns add nothing to the integer sums, so pad, multiply, and slice back.
    """
    M, K = a.shape
    N = w.shape[0]
    pad_m, pad_k, pad_n = max(min_rows - M, 0), -K % align, -N % align
    if pad_m or pad_k or pad_n:
        a = F.pad(a, (0, pad_k, 0, pad_m))
        w = F.pad(w, (0, pad_k, 0, pad_n))
    return torch._int_mm(a, w.t())[:M, :N]


def _asym_fix(acc: Tensor, a: Tensor, w_zero: Tensor, colsum: Tensor, za: Tensor, k: int, asym_w: bool) -> Tensor:
    # (a - za)(w - zw)^T = a w^T - zw * rowsum(a) - za * colsum(w) + K * za * zw, in int32.
    acc = acc - za * colsum
    if asym_w:
        acc = acc - a.sum(1, keepdim=True, dtype=torch.int32) * w_zero + k * za * w_zero
    return acc


def int8_linear_static(
    x: Tensor,
    w: Tensor,
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
    """x [M, K] float, w [N, K] int8 (centred codes), per-tensor static activation scale/zero."""
    a = (torch.clamp(torch.round(x / a_scale) + a_zero, qmin, qmax) - offset).to(torch.int8)
    za = (a_zero - offset).to(torch.int32)
    acc = _asym_fix(int_mm(a, w), a, w_zero, colsum, za, x.shape[1], asym_w)
    y = acc.float() * (a_scale * w_scale)
    return y if bias is None else y + bias


def int8_linear_dynamic(
    x: Tensor, w: Tensor, colsum: Tensor, w_zero: Tensor, w_scale: Tensor, bias: Tensor | None, bits: int, asym_w: bool
) -> Tensor:
    """Per-token symmetric dynamic activations (ViDiT-Q style)."""
    qmax = 2 ** (bits - 1) - 1
    s = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-8)
    a = torch.clamp(torch.round(x / s), -qmax - 1, qmax).to(torch.int8)
    zero = torch.zeros((), dtype=torch.int32, device=x.device)
    acc = _asym_fix(int_mm(a, w), a, w_zero, colsum, zero, x.shape[1], asym_w)
    y = acc.float() * (s * w_scale)
    return y if bias is None else y + bias
