"""Integer GEMM kernels for deploy mode, one backend per class of hardware.

- "onednn" (CPUs with VNNI or AMX): quantize -> `torch._int_mm` -> rescale, and in frozen
  compiled blocks oneDNN's int8 linear, which inductor turns into an AMX GEMM with the rescale
  fused in. Compiled with the rest of a block (`WorldModel.compile_blocks`), the quantize fuses
  into the op that produced the activations and the rescale into the one that consumes the
  result (static activation scales make that possible).
- "fbgemm" (AVX2 CPUs without VNNI): FBGEMM's int8 linear, which quantizes, multiplies and
  rescales in one call. There `_int_mm` has no fast kernel (0.04-0.1x an fp32 matmul).
- "int_mm": `_int_mm` alone; exact everywhere, fast only where oneDNN is (VNNI/AMX).
- "cuda" (what CUDA tensors always take): 8-bit weights through `int_mm_padded` (cuBLAS's int8
  GEMM and its shape rules), 4-bit ones kept packed and unpacked inside a Triton kernel
  (`int4_triton`) that multiplies and rescales in the same pass.

`choose_backend` picks one from the host's capabilities (`probe_host`); `use_backend` forces one.
"""

from __future__ import annotations

import itertools
import os
import platform
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = {
    "onednn": "torch._int_mm; oneDNN's int8 linear in frozen compiled blocks",
    "fbgemm": "FBGEMM's int8 linear, with extra input columns where its 16-bit pair sums could saturate",
    "int_mm": "torch._int_mm alone",
    "cuda": "CUDA: torch._int_mm (cuBLAS int8) for 8-bit weights, a Triton int4-unpacking int8 GEMM for 4-bit ones",
}

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
    a, za = quantize_static(x, a_scale, a_zero, qmin, qmax, offset)
    acc = _asym_fix(int_mm(a, w), a, w_zero, colsum, za, x.shape[1], asym_w)
    y = acc.float() * (a_scale * w_scale)
    return y if bias is None else y + bias


def quantize_static(
    x: Tensor, a_scale: Tensor, a_zero: Tensor, qmin: int, qmax: int, offset: int
) -> tuple[Tensor, Tensor]:
    """x [M, K] -> int8 codes centred by `offset`, and their int32 zero point."""
    a = (torch.clamp(torch.round(x / a_scale) + a_zero, qmin, qmax) - offset).to(torch.int8)
    return a, (a_zero - offset).to(torch.int32)


def int4_linear_cuda(
    x: Tensor,
    packed: Tensor,
    colsum: Tensor,
    w_zero: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    act: tuple[Tensor, Tensor, int, int, int] | int,
    out_dtype: torch.dtype,
) -> Tensor:
    """x [M, K] float times 4-bit codes packed two per byte [N, ceil(K / 2)] -> [M, N] `out_dtype`.

    `act` is (scale, zero point, qmin, qmax, offset) of static per-tensor activations, or the
    bit-width of per-token symmetric ones. The quantize runs here (compiled, it fuses with the op
    that produced x); the unpack, GEMM and rescale run in one Triton kernel.
    """
    from qarvd_core.quant.int4_triton import int4_linear  # Triton ships with CUDA builds of torch

    if isinstance(act, tuple):
        a_scale, a_zero, qmin, qmax, offset = act
        a, za = quantize_static(x, a_scale, a_zero, qmin, qmax, offset)
        scale = a_scale
    else:
        a, scale = quantize_per_token(x, act)
        za = torch.zeros((), dtype=torch.int32, device=x.device)
    return int4_linear(a, packed, colsum, w_zero, w_scale, bias, scale, za, out_dtype)


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
    return probe_host().vnni


# Caps that make a process emulate a smaller host (`probe_host`).
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def _compile_cache_per_cap() -> None:
    """Give a process capped to a smaller instruction set its own inductor cache.

    Inductor's graph cache is not keyed by the vector width its C++ kernels were written for: a
    graph cached by a process capped at AVX2 and loaded by an uncapped AVX-512 one (or the
    reverse) runs loops written for 8 floats a vector with 16-float vectors, and corrupts the
    heap ("malloc(): unaligned tcache chunk detected"). An explicit TORCHINDUCTOR_CACHE_DIR wins.
    """
    caps = [f"{name.lower()}-{os.environ[name].lower()}" for name in ISA_CAPS if os.environ.get(name)]
    if caps and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = "_".join([default_cache_dir(), *caps])


_compile_cache_per_cap()


@dataclass(frozen=True)
class Host:
    """What this process's CPU can run, as torch sees it."""

    cpu: str  # the model name the OS reports
    capability: str  # torch's kernel level: "AVX2", "AVX512", "DEFAULT", ... (capped by ATEN_CPU_CAPABILITY)
    vnni: bool  # 8-bit dot products into 32-bit sums (AVX512-VNNI or AVX-VNNI)
    amx: bool
    native_bf16: bool  # oneDNN runs bf16 natively (AVX512-BF16 or AMX); elsewhere it emulates it, slowly
    fbgemm: bool


@cache  # fixed for a process: torch and oneDNN read their instruction-set caps at start
def probe_host() -> Host:
    # torch reports what the CPU has; oneDNN, which runs the int8 and bf16 kernels, may be capped
    # below that by ONEDNN_MAX_CPU_ISA (emulating a smaller host), and then the cap decides.
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    uncapped = isa in ("ALL", "DEFAULT")
    return Host(
        cpu=_cpu_model(),
        capability=torch.backends.cpu.get_cpu_capability(),
        # oneDNN's ISA names: every level from AVX512_CORE_BF16 up has VNNI; AMX and AVX10 levels have bf16.
        vnni=torch.cpu._is_vnni_supported() and (uncapped or _names(isa, "VNNI", "BF16", "FP16", "AMX", "AVX10")),
        amx=torch.cpu._is_amx_tile_supported() and (uncapped or "AMX" in isa),
        native_bf16=torch.ops.mkldnn._is_mkldnn_bf16_supported()
        and (uncapped or _names(isa, "BF16", "FP16", "AMX", "AVX10")),
        fbgemm="fbgemm" in torch.backends.quantized.supported_engines,
    )


def _names(isa: str, *parts: str) -> bool:
    return any(p in isa for p in parts)


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def choose_backend(host: Host) -> tuple[str, str]:
    """The CPU backend for `host` and why."""
    if host.vnni or host.amx:
        return "onednn", "VNNI/AMX: oneDNN's int8 GEMMs sum in 32 bits and are fast"
    if host.fbgemm:
        return "fbgemm", f"{host.capability} without VNNI: `_int_mm` has no fast kernel here, FBGEMM's int8 linear does"
    return "int_mm", f"{host.capability} without VNNI or FBGEMM: only `_int_mm`, which is exact but slow here"


# The backend of deploy-mode layers, resolved here once and not when first asked: compiled blocks
# read it as they trace, and tracing `probe_host` (a /proc read) would break their graph at
# every quantized layer.
_HOST_BACKEND = choose_backend(probe_host())[0]
_active = _HOST_BACKEND


def use_backend(name: str | None) -> None:
    """Force a CPU backend for layers switched to deploy mode from now on (None: choose by host)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernels {name!r}; choose one of {', '.join(BACKENDS)}")
    global _active
    _active = name or _HOST_BACKEND


def active_backend() -> str:
    return _active


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


# FBGEMM's AVX2 kernel multiplies unsigned 8-bit activations by signed 8-bit weights and adds
# neighbouring products, k = 2i and 2i+1, into a saturating 16-bit sum (vpmaddubsw) before it
# widens to 32 bits. With activation codes up to 255 that sum is exact when the pair's weights
# have opposite signs or sum to at most 128 in magnitude: always for weights of 7 bits or fewer,
# not for trained 8-bit ones (7-14% of tiny-world's and small-world's pairs exceed it in some
# output row, and every pair in some row, so no reordering of the inputs avoids it). Such weights
# get extra input columns (`fbgemm_columns`): about half as many again, where splitting every
# weight in two would double the GEMM.
FBGEMM_PAIR_LIMIT = 128


def fbgemm_columns(values: Tensor) -> tuple[Tensor, Tensor]:
    """Exact int8 weights for FBGEMM's AVX2 kernel: integer weights [N, K] (magnitudes up to 255)
    -> codes [N, K'] whose pairs all keep within `FBGEMM_PAIR_LIMIT`, and the input columns
    `extra` [K' - K] such that cat(x, x[:, extra]) @ codes^T == x @ values^T.

    Each pass keeps what fits (clamped to int8; a pair over the limit gives its excess up from the
    even column, which can always give it since the odd one is at most 128) and appends, as new
    columns, the columns where something was left; the rest is split the same way, pairing them
    anew. Appended columns are padded with zeros to a multiple of about K/8, so that layers of
    one shape mostly share one compiled graph.
    """
    k = values.shape[1]
    v, cols = values.to(torch.int32), torch.arange(k)
    blocks, taken = [], []
    for _ in range(16):  # each pass leaves at most the excess; a few passes empty it
        # A pass pairs its own columns, so it starts on an even column: odd ones get a zero column.
        v, cols = F.pad(v, (0, v.shape[1] % 2)), F.pad(cols, (0, cols.shape[0] % 2))
        a, b = v.clamp(-128, 127).unflatten(1, (-1, 2)).unbind(-1)
        over = ((a * b) > 0) * (a.abs() + b.abs() - FBGEMM_PAIR_LIMIT).clamp_min(0)
        r = torch.stack([a - over * a.sign(), b], -1).flatten(1)
        blocks.append(r)
        taken.append(cols)
        v = v - r
        left = v.ne(0).any(0)
        if not left.any():
            break
        v, cols = v[:, left], cols[left]
    else:
        raise AssertionError("FBGEMM column split did not converge")
    extra = torch.cat(taken)[k:]
    step = 2 * max(4, -(-k // 16))
    pad = -len(extra) % step if len(extra) else 0
    return F.pad(torch.cat(blocks, 1), (0, pad)).to(torch.int8), F.pad(extra, (0, pad))


def fbgemm_input(x: Tensor, extra: Tensor) -> Tensor:
    """x [M, K] with the input columns `fbgemm_columns` appended."""
    return torch.cat([x, x[:, extra]], 1) if len(extra) else x


class FbgemmWeight:
    """An int8 weight prepacked for FBGEMM (`fbgemm_pack`), named by a tensor handle.

    Custom ops and compiled graphs take tensors, not the TorchScript object FBGEMM packs into,
    so the packed weight is kept in a registry while this object lives, and `fbgemm_linear` is
    given its handle as a tensor: a graph input like any weight, so every block still shares
    one compiled graph. Frozen compiles (inductor's freezing) make it a constant of the graph,
    and inductor's on-disk graph cache keys the values of 1-d constants of up to 8 elements
    but only the shape of others: so the handle has shape [1], and a cached graph can never
    name a handle of another process (handles are never reused within one).
    """

    _registry: weakref.WeakValueDictionary[int, FbgemmWeight] = weakref.WeakValueDictionary()
    _next = itertools.count()

    def __init__(self, packed: object, extra: Tensor, n: int):
        key = next(self._next)
        self._registry[key] = self
        self.packed, self.extra, self.n, self.handle = packed, extra, n, torch.tensor([key])

    @classmethod
    def named(cls, handle: int) -> FbgemmWeight:
        return cls._registry[handle]


def fbgemm_pack(w: Tensor, w_zero: Tensor, w_scale: Tensor, bias: Tensor | None) -> FbgemmWeight:
    """Prepack centred codes w [N, K] with zero points and scales [N] (and bias) for `fbgemm_linear`.

    The zero points are applied to the codes here (FBGEMM's would also subtract them over the
    appended columns), so FBGEMM sees symmetric weights of up to 9 bits."""
    codes, extra = fbgemm_columns(w.to(torch.int32) - w_zero.to(torch.int32)[:, None])
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings(), _fbgemm_engine():
        # FBGEMM's prepack takes only a quantized tensor, an API torch has deprecated; its int8
        # linear has no other entry point (see `BACKENDS`, and `choose_backend`'s fallback).
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        q = torch._make_per_channel_quantized_tensor(codes, w_scale.double(), zero, 0)
        return FbgemmWeight(torch.ops.quantized.linear_prepack(q, bias), extra, w.shape[0])


@contextmanager
def _fbgemm_engine():
    # Prepacking picks its kernels by the process's quantized engine ("x86" may pick oneDNN).
    saved = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        yield
    finally:
        torch.backends.quantized.engine = saved


def int8_linear_fbgemm(
    x: Tensor, w: FbgemmWeight, act: tuple[float, int, int, int] | int, bias: Tensor | None
) -> Tensor:
    """x [M, K'] float (`fbgemm_input`) -> [M, N] float through FBGEMM's int8 linear on `w`
    (`fbgemm_pack`).

    `act` is (scale, zero point, qmin, qmax) of static per-tensor activations, whose quantize
    runs inside FBGEMM's op: it takes unsigned codes, so the zero point moves by -qmin, and
    ranges narrower than 8 bits are clamped first. Or the bit-width of per-token symmetric ones:
    each row divided by its scale, quantized in the op with scale 1 and zero point 128, rescaled
    after; `bias` is then added here (static activations: it is packed with the weight).
    """
    linear = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    if isinstance(act, tuple):
        s, z, qmin, qmax = act
        if qmax - qmin < 255:
            x = x.clamp((qmin - z) * s, (qmax - z) * s)
        y = linear(x, s, z - qmin, w.packed)
        return y if bias is None else y + bias
    qmax = 2 ** (act - 1) - 1
    s = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-8)
    y = linear(x / s, 1.0, 128, w.packed)
    return y * s if bias is None else torch.addcmul(bias, y, s)


# In compiled graphs: the same, as a custom op taking the weight's handle and `act` as tensors,
# and its input with the extra columns appended in the graph, where they fuse with its producer.
# (Eager code calls `int8_linear_fbgemm` directly: a custom op's dispatch costs more than the
# GEMM itself at the smallest layer shapes.)
@torch.library.custom_op("qarvd::fbgemm_linear", mutates_args=())
def fbgemm_linear(x: Tensor, handle: Tensor, act: Tensor, bias: Tensor | None, n: int) -> Tensor:
    w = FbgemmWeight.named(int(handle))
    s, z, qmin, qmax = act.tolist() if act.numel() == 4 else (None,) * 4
    return int8_linear_fbgemm(x, w, (s, int(z), int(qmin), int(qmax)) if s is not None else int(act), bias)


@fbgemm_linear.register_fake
def _(x: Tensor, handle: Tensor, act: Tensor, bias: Tensor | None, n: int) -> Tensor:
    return x.new_empty(x.shape[0], n)
