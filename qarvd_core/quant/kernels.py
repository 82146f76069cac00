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


def quantize_per_token(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """x [M, K] -> int8 codes and scales [M, 1]: one symmetric range per token (row)."""
    qmax = 2 ** (bits - 1) - 1
    s = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-8)
    return torch.clamp(torch.round(x / s), -qmax - 1, qmax).to(torch.int8), s


def onednn_int8_is_exact() -> bool:
    """Whether oneDNN's int8 linear gives exact integer sums on this CPU.

    Without VNNI (AVX2-only hosts) x86 int8 GEMMs multiply-add byte pairs into saturating
    16-bit sums (vpmaddubsw), so full-range 8-bit codes overflow: measured on an AVX2 EPYC,
    65% of a layer's outputs were wrong, by up to 1,700x. VNNI and AMX accumulate in 32 bits.
    """
    return torch.cpu._is_vnni_supported()


def onednn_pack(w: Tensor) -> Tensor:
    """int8 weight [N, K] prepacked for oneDNN's int8 linear (`int8_linear_onednn`)."""
    return torch.ops.onednn.qlinear_prepack(w, None)


def int8_linear_onednn(
    x: Tensor,
    packed: Tensor,
    w_scale: Tensor,
    zeros: Tensor,
    w_zero_scaled: Tensor | None,
    bias: Tensor | None,
    act: tuple[float, int, int, int] | int,
) -> Tensor:
    """x [M, K] float -> [M, N] float through oneDNN's int8 linear, for frozen compiled blocks.

    Under `torch.compile` with inductor's freezing and max-autotune (`WorldModel.compile_blocks(
    max_autotune=True)`), this op becomes an AMX GEMM template whose epilogue does the whole rescale,
    so the int32 product never goes to memory (with `_int_mm`, a separate pass reads it back to
    rescale it). `act` is (scale, zero point, qmin, qmax) of static per-tensor activations, or the bit-width
    of per-token symmetric ones. `zeros` is an int32 zero per output channel, passed in so that
    freezing sees a constant: the template takes symmetric weights only. For asymmetric ones
    (`w_zero_scaled` = w_scale * w_zero) the zero point's term, w_zero_n * sum_k (a_mk - z_a), is
    subtracted afterwards, and inductor fuses that into the same epilogue.
    """
    if isinstance(act, tuple):
        s, z, qmin, qmax = act
        a = torch.clamp(torch.round(x / s) + z, qmin, qmax).to(torch.uint8 if qmin >= 0 else torch.int8)
        tok_scale = None
    else:
        a, tok_scale = quantize_per_token(x, act)
        s, z = 1.0, 0
    y = torch.ops.onednn.qlinear_pointwise(a, s, z, packed, w_scale, zeros, None, 1.0, 0, torch.float32, "none", [], "")
    if w_zero_scaled is not None:
        rows = a.sum(-1, keepdim=True, dtype=torch.int32) - x.shape[1] * z
        y = y - (s * rows) * w_zero_scaled
    if tok_scale is not None:
        y = y * tok_scale
    return y if bias is None else y + bias


def int8_linear_dynamic(
    x: Tensor, w: Tensor, colsum: Tensor, w_zero: Tensor, w_scale: Tensor, bias: Tensor | None, bits: int, asym_w: bool
) -> Tensor:
    """Per-token symmetric dynamic activations (ViDiT-Q style)."""
    a, s = quantize_per_token(x, bits)
    zero = torch.zeros((), dtype=torch.int32, device=x.device)
    acc = _asym_fix(int_mm(a, w), a, w_zero, colsum, zero, x.shape[1], asym_w)
    y = acc.float() * (s * w_scale)
    return y if bias is None else y + bias
