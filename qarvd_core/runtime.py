"""What `auto` means on this host: the dtype, compile and integer kernels a model runs with, and why.

Every CLI command that generates and the server resolve their `auto` settings here, log the
reasons, and honour any setting given explicitly. For quantized models, `speed_warning` then
measures the integer layers against FP32 ones of the same shapes on this host, so that a model
slower than its FP32 base says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qarvd_core.quant import kernels

AUTO = "auto"


@dataclass(frozen=True)
class Plan:
    dtype: str  # "fp32" or "bf16" (checkpoint.DTYPES)
    compile: bool  # torch.compile the transformer blocks (`WorldModel.compile_blocks`)
    kernels: str  # the CPU backend of deploy-mode integer GEMMs (kernels.BACKENDS)
    reasons: dict[str, str]  # why each, by name

    def describe(self) -> str:
        values = {"dtype": self.dtype, "compile": "on" if self.compile else "off", "kernels": self.kernels}
        return "; ".join(f"{name} {value} ({self.reasons[name]})" for name, value in values.items())

    def apply(self) -> Plan:
        """Make `kernels` the backend of layers switched to deploy mode from now on."""
        kernels.use_backend(self.kernels)
        return self


def plan(
    dtype: str = AUTO, compile: bool | None = None, backend: str = AUTO, host: kernels.Host | None = None
) -> Plan:
    """Resolve `auto` dtype and kernels, and compile=None, from `host` (default: this one)."""
    host = host or kernels.probe_host()
    if backend == AUTO:
        backend, why_kernels = kernels.choose_backend(host)
    elif backend not in kernels.BACKENDS:
        raise ValueError(f"unknown kernels {backend!r}; choose auto or one of {', '.join(kernels.BACKENDS)}")
    else:
        why_kernels = "forced"
    if dtype == AUTO:
        dtype = "bf16" if host.native_bf16 else "fp32"
        why_dtype = "native bf16 (AMX or AVX512-BF16)" if host.native_bf16 else "no native bf16: slower than fp32 here"
    elif dtype not in ("fp32", "bf16"):
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, fp32 or bf16")
    else:
        why_dtype = "forced" if dtype == "fp32" or host.native_bf16 else "forced; no native bf16 here, so it is slow"
    if compile is None:
        compile = backend == "onednn"
        why_compile = (
            "inductor fuses the quantize, rescale and elementwise work around oneDNN's kernels"
            if compile
            else f"the {backend} kernels run eagerly: FBGEMM's op stays outside compiled graphs"
        )
    else:
        why_compile = "forced"
    return Plan(dtype, compile, backend, {"dtype": why_dtype, "compile": why_compile, "kernels": why_kernels})


def integer_speedup(model: nn.Module, rows: int, rounds: int = 3, repeats: int = 5) -> float | None:
    """Time of the model's deploy-mode quantized layers as FP32 linears of the same shapes, over
    their time as they run (> 1: faster than FP32), on `rows` input rows; None if none are in
    deploy mode. Each distinct layer shape is timed once, weighted by how often it occurs,
    FP32 and integer interleaved over `rounds`."""
    from qarvd_core.quant.linear import QuantLinear

    layers: dict[tuple, list] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.mode == "deploy" and m.act_mode != "none":
            layers.setdefault((m.in_features, m.out_features, m.act_mode, m.w_spec.bits), []).append(m)
    if not layers:
        return None
    fp32_s = int_s = 0.0
    with torch.inference_mode():
        for same in layers.values():
            q = same[0]
            x = torch.randn(rows, q.in_features, generator=torch.Generator().manual_seed(0))
            w = q.dequantized_weight()
            best = {q: float("inf"), None: float("inf")}  # the layer, and (None) an FP32 linear
            for _ in range(rounds):
                for layer in best:
                    best[layer] = min(best[layer], _seconds(layer, x, w, repeats))
            fp32_s += best[None] * len(same)
            int_s += best[q] * len(same)
    return fp32_s / int_s


def _seconds(layer: nn.Module | None, x, w, repeats: int) -> float:
    run = (lambda: F.linear(x, w, None)) if layer is None else (lambda: layer(x))
    run()
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    return time.perf_counter() - t0


def speed_warning(model: nn.Module, rows: int) -> str | None:
    """A warning when the model's integer layers measure slower than FP32 ones on this host."""
    speedup = integer_speedup(model, rows)
    if speedup is None or speedup >= 1.0:
        return None
    host = kernels.probe_host()
    return (
        f"quantized layers run at {speedup:.2f}x the speed of FP32 ones on this host ({host.cpu}, "
        f"{host.capability}, kernels {kernels.active_backend()}): this model streams slower than its FP32 base"
    )
