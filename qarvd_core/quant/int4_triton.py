"""The CUDA kernel of 4-bit weights: int4 unpack, int8 dot and rescale in one Triton kernel.

Deploy mode stores 4-bit weights two per byte (`linear.pack_int4`); on CUDA they stay packed in
memory and are unpacked tile by tile in registers, so the GEMM reads half the bytes of an int8
weight and no unpacked copy exists. One fixed tile shape, no autotuning: a compile per dtype,
not a search per shape. Tested on the CPU with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M, BLOCK_N, BLOCK_KP = 32, 64, 32  # BLOCK_KP packed bytes: 64 input columns per step


@triton.jit
def _int4_linear_kernel(
    a_ptr, w_ptr, colsum_ptr, w_zero_ptr, w_scale_ptr, bias_ptr, row_scale_ptr, a_zero_ptr, out_ptr,
    M, N, K, KP, stride_am, stride_wn, stride_om, row_scale_stride,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKP: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    rowsum = tl.zeros((BM,), dtype=tl.int32)
    for j0 in range(0, KP, BKP):
        j = j0 + tl.arange(0, BKP)  # packed byte j holds input columns 2j (low nibble) and 2j + 1
        rows, even = rm[:, None] < M, 2 * j[None, :]
        a_even = tl.load(a_ptr + rm[:, None] * stride_am + even, mask=rows & (even < K), other=0)
        a_odd = tl.load(a_ptr + rm[:, None] * stride_am + even + 1, mask=rows & (even + 1 < K), other=0)
        p = tl.load(w_ptr + rn[None, :] * stride_wn + j[:, None], mask=(rn[None, :] < N) & (j[:, None] < KP), other=0)
        lo = (p & 0xF).to(tl.int8)
        hi = (p >> 4).to(tl.int8)
        lo = tl.where(lo > 7, lo - 16, lo).to(tl.int8)  # two's complement nibbles: codes -8..7
        hi = tl.where(hi > 7, hi - 16, hi).to(tl.int8)
        acc += tl.dot(a_even, lo, out_dtype=tl.int32)
        acc += tl.dot(a_odd, hi, out_dtype=tl.int32)
        rowsum += tl.sum(a_even.to(tl.int32), 1) + tl.sum(a_odd.to(tl.int32), 1)
    cols = rn < N
    za = tl.load(a_zero_ptr)
    colsum = tl.load(colsum_ptr + rn, mask=cols, other=0)
    zw = tl.load(w_zero_ptr + rn, mask=cols, other=0)
    # (a - za)(w - zw) summed over k, from the integer product and the row and column sums.
    acc = acc - za * colsum[None, :] - rowsum[:, None] * zw[None, :] + K * za * zw[None, :]
    row_scale = tl.load(row_scale_ptr + rm * row_scale_stride, mask=rm < M, other=0.0)
    y = acc.to(tl.float32) * row_scale[:, None] * tl.load(w_scale_ptr + rn, mask=cols, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=cols, other=0.0)[None, :]
    out_mask = (rm[:, None] < M) & cols[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=out_mask)


@torch.library.custom_op("qarvd::int4_linear", mutates_args=())
def int4_linear(
    a: Tensor,
    packed: Tensor,
    colsum: Tensor,
    w_zero: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    row_scale: Tensor,
    a_zero: Tensor,
    out_dtype: torch.dtype,
) -> Tensor:
    """int8 activation codes a [M, K] times packed 4-bit codes [N, ceil(K / 2)] -> [M, N] in `out_dtype`:
    sum_k (a - a_zero)(w - w_zero) * row_scale * w_scale (+ bias). `row_scale` has M elements
    (per-token scales) or one (a per-tensor scale); `colsum` [N] is sum_k w, `w_zero` [N] int32."""
    m, k = a.shape
    n = packed.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    row_scale = row_scale.reshape(-1).float()
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _int4_linear_kernel[grid](
        a, packed, colsum, w_zero, w_scale, bias if bias is not None else w_scale, row_scale,
        a_zero.to(torch.int32).reshape(1), out,
        m, n, k, packed.shape[1], a.stride(0), packed.stride(0), out.stride(0), int(row_scale.numel() > 1),
        HAS_BIAS=bias is not None, BM=BLOCK_M, BN=BLOCK_N, BKP=BLOCK_KP,
    )  # fmt: skip
    return out


@int4_linear.register_fake
def _(a, packed, colsum, w_zero, w_scale, bias, row_scale, a_zero, out_dtype):
    return a.new_empty(a.shape[0], packed.shape[0], dtype=out_dtype)
