"""Quantized linear layers, swapped in for nn.Linear (gpt-fast style: integers as buffers).

Two modes share the same integer weights and scales:
- simulate: dequantize and run a float matmul (fake quant; any bit-width; calibration);
- deploy: integer GEMMs on CPU and CUDA through the backend `kernels.active_backend` picks
  for the host (oneDNN's, FBGEMM's or `_int_mm`; on CUDA cuBLAS's int8 GEMM), with 4-bit
  weights stored two per byte and unpacked to int8 for the GEMM (on CUDA inside a Triton
  kernel). On other devices deploy falls back to the simulate path.
Both modes compute the same function up to float rounding (tested, per backend).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qarvd_core.quant import kernels
from qarvd_core.quant.primitives import (
    QuantSpec,
    fake_quant,
    minmax_weight,
    mse_search_weight,
    quantize,
    weighted_mse_search_activation,
)

WEIGHT_INITS = {"mse": mse_search_weight, "minmax": minmax_weight}

# Activation schemes: what each is, as `qarvd inspect` says it.
ACT_MODES = {"static": "per-tensor static", "dynamic": "per-token dynamic", "none": "float"}


def pack_int4(codes: Tensor) -> Tensor:
    """int8 codes in [-8, 7], shape [out, in] -> uint8 [out, ceil(in / 2)], two per byte."""
    u = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    if u.shape[1] % 2:
        u = F.pad(u, (0, 1))
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of pack_int4: int8 codes [out, in_features]."""
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    codes = torch.stack([lo, hi], dim=-1).flatten(1)[:, :in_features]
    return torch.where(codes > 7, codes - 16, codes)


class QuantLinear(nn.Module):
    """y = Q(x) Q(W)^T + b with W per output channel (zero points unless symmetric), x per tensor or per token."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        w_spec: QuantSpec,
        a_spec: QuantSpec | None,
        act_mode: str = "static",
        bias: bool = True,
    ):
        super().__init__()
        if act_mode not in ACT_MODES:
            raise ValueError(f"act_mode must be one of {tuple(ACT_MODES)}, got {act_mode!r}")
        self.in_features, self.out_features = in_features, out_features
        self.w_spec, self.a_spec, self.act_mode = w_spec, a_spec, act_mode
        self.mode = "simulate"
        packed = w_spec.bits <= 4
        shape = (out_features, (in_features + 1) // 2) if packed else (out_features, in_features)
        self.register_buffer("qweight", torch.zeros(shape, dtype=torch.uint8 if packed else torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features))
        self.register_buffer("w_zero", torch.zeros(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("a_scale", torch.tensor(1.0))
        self.register_buffer("a_zero", torch.tensor(0.0))
        # SmoothQuant-style migration: inputs are divided per channel by `smooth` (None: off).
        self.register_buffer("smooth", None)
        self._deploy_cache: dict | None = None

    @classmethod
    def from_float(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        w_spec: QuantSpec,
        a_spec: QuantSpec | None,
        act_mode: str = "static",
        weight_init: str = "mse",
    ) -> QuantLinear:
        """Round-to-nearest weights with per-output-channel scales from `weight_init`."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, w_spec, a_spec, act_mode, bias=bias is not None)
        scale, zero = WEIGHT_INITS[weight_init](weight.float(), w_spec)
        layer.set_weight(quantize(weight.float(), scale[:, None], zero[:, None], w_spec), scale, zero)
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    def init_activation(self, x: Tensor, sample_weights: Tensor | None = None, pcts=None) -> None:
        """Static per-tensor range from calibration rows x [S, in] by (weighted) MSE search."""
        if self.act_mode == "static":
            if self.smooth is not None:
                x = x / self.smooth
            kw = {} if pcts is None else {"pcts": pcts}
            self.set_activation(*weighted_mse_search_activation(x, self.a_spec, sample_weights, **kw))

    # Weights ---------------------------------------------------------------------
    # Codes are stored centred into int8: code - offset, offset = 2^(b-1) for asymmetric
    # quantizers (codes 0..2^b-1) and 0 for symmetric ones; zero points are centred alike.

    def set_weight(self, codes: Tensor, scale: Tensor, zero: Tensor | None = None) -> None:
        """Store weight codes [out, in] (in the quantizer's own range), scales and zero points [out]."""
        off = _offset(self.w_spec)
        centred = (codes.round() - off).to(torch.int8)
        self.qweight = pack_int4(centred) if self.w_spec.bits <= 4 else centred
        self.w_scale = scale.reshape(-1).float().clone()
        zero = torch.zeros(self.out_features) if zero is None else zero.reshape(-1).float()
        self.w_zero = zero - off
        self._deploy_cache = None

    def weight_codes(self) -> Tensor:
        """Centred int8 codes [out, in]."""
        if self.w_spec.bits <= 4:
            return unpack_int4(self.qweight, self.in_features)
        return self.qweight

    def dequantized_weight(self) -> Tensor:
        return (self.weight_codes().float() - self.w_zero[:, None]) * self.w_scale[:, None]

    def set_activation(self, scale: Tensor, zero: Tensor) -> None:
        self.a_scale = scale.detach().float().reshape(()).clone()
        self.a_zero = zero.detach().float().reshape(()).clone()
        self._deploy_cache = None

    # Forward ---------------------------------------------------------------------

    def set_smoothing(self, smooth: Tensor) -> None:
        self.smooth = smooth.detach().float().clone()

    def quantize_input(self, x: Tensor) -> Tensor:
        """Fake-quantized input (simulate mode)."""
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if self.act_mode == "static":
            return fake_quant(x, self.a_scale, self.a_zero, self.a_spec)
        if self.act_mode == "dynamic":
            spec = QuantSpec(self.a_spec.bits, symmetric=True)  # per-token dynamic ranges are symmetric
            scale = (x.abs().amax(-1, keepdim=True) / spec.qmax).clamp_min(1e-8)
            return fake_quant(x, scale, 0.0, spec)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "deploy" and self.act_mode != "none" and x.device.type in ("cpu", "cuda"):
            return self._forward_int(x)
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(self.quantize_input(x), w, None if self.bias is None else self.bias.to(x.dtype))

    def __getstate__(self) -> dict:
        # The deploy cache is derived from the buffers, and FBGEMM's packed weights in it are found
        # by handle through a registry of live objects: a copy or pickle rebuilds its own.
        return {**super().__getstate__(), "_deploy_cache": None}

    def _deploy_tensors(self) -> dict:
        # Unpacked int8 weights, their row sums and integer zero points, and what the backend
        # prepacks: once per weight change, device or backend.
        backend = kernels.active_backend() if self.qweight.device.type == "cpu" else "cuda"
        d = self._deploy_cache
        if d is None or d["w"].device != self.qweight.device or d["backend"] != backend:
            codes = self.weight_codes()
            int4_cuda = backend == "cuda" and self.w_spec.bits <= 4  # unpacked inside the kernel
            d = self._deploy_cache = {
                "backend": backend,
                "int4_cuda": int4_cuda,
                "w": self.qweight if int4_cuda else codes.contiguous(),
                "colsum": codes.sum(1, dtype=torch.int32),
                "w_zero": self.w_zero.round().to(torch.int32),
                "asym_w": bool(self.w_zero.abs().max() > 0),
            }
            if backend == "fbgemm" and self.act_mode != "none":
                bias = self.bias if self.act_mode == "static" else None  # per-token: added after the rescale
                d["fbgemm"] = kernels.fbgemm_pack(d["w"], d["w_zero"], self.w_scale, bias)
                d["fbgemm_act"] = self._act()
                # What compiled graphs take instead, as tensors: inputs like the weights, not constants.
                d["fbgemm_handle"], d["fbgemm_extra"] = d["fbgemm"].handle, d["fbgemm"].extra
                d["fbgemm_act_t"] = torch.tensor(d["fbgemm_act"] if self.act_mode == "static" else [self.a_spec.bits])
        return d

    def _act(self) -> tuple[float, int, int, int] | int:
        """Static activations' (scale, zero point, qmin, qmax), or per-token ones' bit-width."""
        s = self.a_spec
        return (float(self.a_scale), int(self.a_zero), s.qmin, s.qmax) if self.act_mode == "static" else s.bits

    def prepare_compile(self, frozen: bool) -> None:
        """Called by `WorldModel.compile_blocks` before compiling. `frozen` (inductor's freezing and
        max-autotune): with the "onednn" backend, deploy mode on CPU then runs oneDNN's int8 linear on
        a prepacked weight, which inductor turns into an AMX GEMM with the rescale fused in, where
        that kernel is exact (`kernels.onednn_int8_is_exact`); otherwise `_int_mm`."""
        d = self._deploy_tensors()
        for key in ("packed", "zeros", "w_zero_scaled", "act"):
            d.pop(key, None)
        onednn = d["backend"] == "onednn" and kernels.onednn_int8_is_exact()
        if not (frozen and self.mode == "deploy" and self.act_mode != "none" and onednn):
            return
        d["packed"] = kernels.onednn_pack(d["w"])
        d["zeros"] = torch.zeros(self.out_features, dtype=torch.int32)
        d["w_zero_scaled"] = self.w_scale * self.w_zero.round() if d["asym_w"] else None
        d["act"] = self._act()

    def _forward_int(self, x: Tensor) -> Tensor:
        d = self._deploy_tensors()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if self.smooth is not None:
            x2 = x2 / self.smooth
        if "packed" in d and torch.compiler.is_compiling():
            y = kernels.int8_linear_onednn(
                x2, d["packed"], self.w_scale, d["zeros"], d["w_zero_scaled"], self.bias, d["act"]
            )
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        if "fbgemm" in d:
            w, act = d["fbgemm"], d["fbgemm_act"]
            bias = None if self.act_mode == "static" else self.bias
            if torch.compiler.is_compiling():
                x2 = kernels.fbgemm_input(x2, d["fbgemm_extra"])
                y = kernels.fbgemm_linear(x2, d["fbgemm_handle"], d["fbgemm_act_t"], bias, w.n)
            else:
                y = kernels.int8_linear_fbgemm(kernels.fbgemm_input(x2, w.extra), w, act, bias)
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        common = (d["w"], d["colsum"], d["w_zero"], self.w_scale, self.bias)
        if d["int4_cuda"]:
            s = self.a_spec
            act = (self.a_scale, self.a_zero, s.qmin, s.qmax, _offset(s)) if self.act_mode == "static" else s.bits
            y = kernels.int4_linear_cuda(x2, *common, act, x.dtype)
            return y.reshape(*shape[:-1], self.out_features)
        if self.act_mode == "static":
            s = self.a_spec
            y = kernels.int8_linear_static(
                x2, *common, self.a_scale, self.a_zero, s.qmin, s.qmax, _offset(s), d["asym_w"]
            )
        else:
            y = kernels.int8_linear_dynamic(x2, *common, self.a_spec.bits, d["asym_w"])
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        a = f"A{self.a_spec.bits}-{self.act_mode}" if self.a_spec else "A-float"
        return f"{self.in_features}, {self.out_features}, W{self.w_spec.bits} {a}, mode={self.mode}"


class DualScaleQuantLinear(nn.Module):
    """Q-ARVD's outlier-aware dual-scale layer: y = Q(x_o) Q(W_o)^T + Q(x_n) Q(W_n)^T + b.

    The outlier input columns and the normal ones each get their own weight and activation
    quantizers at the same bit-width, so outliers no longer stretch the normal columns'
    scales. Only the column indices are stored; each part runs its own integer GEMM.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        outlier_idx: Tensor,
        w_spec: QuantSpec,
        a_spec: QuantSpec | None,
        act_mode: str = "static",
        bias: bool = True,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        mask = torch.zeros(in_features, dtype=torch.bool)
        mask[outlier_idx] = True
        self.register_buffer("outlier_idx", torch.nonzero(mask).flatten())
        self.register_buffer("normal_idx", torch.nonzero(~mask).flatten())
        self.outlier = QuantLinear(len(self.outlier_idx), out_features, w_spec, a_spec, act_mode, bias=False)
        self.normal = QuantLinear(len(self.normal_idx), out_features, w_spec, a_spec, act_mode, bias=False)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        outlier_idx: Tensor,
        w_spec: QuantSpec,
        a_spec: QuantSpec | None,
        act_mode: str = "static",
        weight_init: str = "mse",
    ):
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, outlier_idx, w_spec, a_spec, act_mode, bias=bias is not None)
        layer.outlier, layer.normal = (
            QuantLinear.from_float(weight[:, idx], None, w_spec, a_spec, act_mode, weight_init)
            for idx in (layer.outlier_idx, layer.normal_idx)
        )
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    def parts(self) -> list[tuple[QuantLinear, Tensor]]:
        return [(self.outlier, self.outlier_idx), (self.normal, self.normal_idx)]

    def init_activation(self, x: Tensor, sample_weights: Tensor | None = None, pcts=None) -> None:
        for part, idx in self.parts():
            part.init_activation(x[:, idx], sample_weights, pcts)

    def forward(self, x: Tensor) -> Tensor:
        # In 2-D: fusing a 3-D sum of two GEMM templates into an epilogue trips an assertion in inductor.
        x2 = x.reshape(-1, self.in_features)
        y = self.outlier(x2[:, self.outlier_idx]) + self.normal(x2[:, self.normal_idx])
        y = y if self.bias is None else y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> Tensor:
        w = torch.empty(self.out_features, self.in_features)
        w[:, self.outlier_idx] = self.outlier.dequantized_weight()
        w[:, self.normal_idx] = self.normal.dequantized_weight()
        return w


def _offset(spec: QuantSpec) -> int:
    return 0 if spec.symmetric else 2 ** (spec.bits - 1)


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch every quantized layer to 'simulate' or 'deploy'."""
    if mode not in ("simulate", "deploy"):
        raise ValueError(f"mode must be 'simulate' or 'deploy', got {mode!r}")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.mode = mode
            if mode == "deploy":
                m._deploy_tensors()  # built now, not inside a compiled forward
    return model


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast everything but the quantized layers' own tensors to `dtype` (e.g. bf16).

    Norms, attention, embeddings and the kept full-precision layers then run in `dtype`,
    while scales, zero points and biases stay fp32: they define the quantizer, and the integer
    GEMM's rescale is done in fp32 before the result is handed back in `dtype`.
    """
    quantized = (QuantLinear, DualScaleQuantLinear)
    inside = {id(sub) for m in model.modules() if isinstance(m, quantized) for sub in m.modules()}
    for m in model.modules():
        if id(m) in inside:
            continue
        for p in m.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                setattr(m, name, b.to(dtype))
    return model
