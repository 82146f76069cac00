"""What `auto` means on this host: the device, dtype, compile and integer kernels a model runs
with, and why.

Every CLI command that runs a model, the server and the job worker resolve their `auto` settings
here (`QARVD_DEVICE` / `--device`, `QARVD_DTYPE` / `--dtype`, ...), log the reasons, and honour
any setting given explicitly. For quantized models, `speed_warning` then measures the integer
layers against FP32 ones of the same shapes on the model's device, so that a model slower than
its FP32 base says so.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qarvd_core.quant import kernels

AUTO = "auto"
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"  # the values QARVD_DEVICE and --device take


def resolve_device(device: str = AUTO) -> torch.device:
    """`auto`: the first CUDA device when one is available, else the CPU; `cpu`, `cuda` or
    `cuda:N` as asked. Raises ValueError for any other value, or a CUDA device this host lacks."""
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise ValueError(f"unknown device {device!r}; choose auto, cpu, cuda or cuda:N")
    if device == AUTO:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA device here")
        index = resolved.index or 0
        if index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ValueError(f"device {device!r} asked for, but this host has {count} CUDA device(s)")
        return torch.device("cuda", index)
    return resolved


@dataclass(frozen=True)
class Plan:
    dtype: str  # "fp32" or "bf16" (checkpoint.DTYPES)
    compile: bool  # torch.compile the transformer blocks (`WorldModel.compile_blocks`)
    kernels: str  # the backend of deploy-mode integer GEMMs (kernels.BACKENDS); CUDA tensors take "cuda"
    reasons: dict[str, str]  # why each, by name
    device: str = "cpu"  # where models, caches, noise and stream state live ("cpu", "cuda:N")

    def describe(self) -> str:
        values = {"dtype": self.dtype, "compile": "on" if self.compile else "off", "kernels": self.kernels}
        reasons = "; ".join(f"{name} {value} ({self.reasons[name]})" for name, value in values.items())
        return f"device {self.device}; {reasons}"

    def apply(self) -> Plan:
        """Make `kernels` the backend of layers switched to deploy mode from now on."""
        kernels.use_backend(self.kernels)
        return self


def plan(
    dtype: str = AUTO,
    compile: bool | None = None,
    backend: str = AUTO,
    host: kernels.Host | None = None,
    device: torch.device | str = "cpu",
    quantized: bool = False,
) -> Plan:
    """Resolve `auto` dtype and kernels, and compile=None, for `device` (a resolved one, see
    `resolve_device`) and, on the CPU, `host` (default: this one); `quantized`: for a model
    with integer layers, which compiled graphs fuse with their quantize and rescale."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_plan(dtype, compile, backend, device)
    host = host or kernels.probe_host()
    if backend == AUTO:
        backend, why_kernels = kernels.choose_backend(host)
    elif backend not in kernels.BACKENDS:
        raise ValueError(f"unknown kernels {backend!r}; choose auto or one of {', '.join(kernels.BACKENDS)}")
    elif backend == "cuda":
        raise ValueError("kernels 'cuda' run on a CUDA device; this plan is for the CPU")
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
        # Measured on an AVX2 host (benchmarks/results/host_speed_avx2): compiling a quantized
        # model is worth its start-up there too, an FP32 one's gain does not repay it.
        compile = backend == "onednn" or quantized
        why_compile = (
            "inductor fuses the quantize, rescale and elementwise work around the integer GEMMs"
            if compile
            else f"an FP32 model on {host.capability} without VNNI gains little from compiling"
        )
    else:
        why_compile = "forced"
    reasons = {"dtype": why_dtype, "compile": why_compile, "kernels": why_kernels}
    return Plan(dtype, compile, backend, reasons, str(device))


def _cuda_plan(dtype: str, compile: bool | None, backend: str, device: torch.device) -> Plan:
    # CUDA tensors take the "cuda" kernels whatever the CPU backend (cuBLAS's int8 GEMM, padded
    # to its shape rules, and the Triton int4 kernel), so `kernels` only names that path here.
    if backend != AUTO and backend not in kernels.BACKENDS:
        raise ValueError(f"unknown kernels {backend!r}; choose auto or one of {', '.join(kernels.BACKENDS)}")
    if dtype not in (AUTO, "fp32", "bf16"):
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, fp32 or bf16")
    reasons = {
        "dtype": "CUDA: bf16 tensor cores" if dtype == AUTO else "forced",
        "compile": "eager on CUDA unless asked; benchmarks/device_check.sh measures both"
        if compile is None
        else "forced",
        "kernels": "CUDA tensors take torch._int_mm (cuBLAS int8 GEMM) and a Triton int4 kernel",
    }
    return Plan("bf16" if dtype == AUTO else dtype, bool(compile), "cuda", reasons, str(device))


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
            w = q.dequantized_weight()
            x = torch.randn(rows, q.in_features, generator=torch.Generator().manual_seed(0)).to(w.device)
            best = {q: float("inf"), None: float("inf")}  # the layer, and (None) an FP32 linear
            for _ in range(rounds):
                for layer in best:
                    best[layer] = min(best[layer], _seconds(layer, x, w, repeats))
            fp32_s += best[None] * len(same)
            int_s += best[q] * len(same)
    return fp32_s / int_s


def _seconds(layer: nn.Module | None, x, w, repeats: int) -> float:
    run = (lambda: F.linear(x, w, None)) if layer is None else (lambda: layer(x))
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)  # CUDA runs asynchronously
    run()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    sync()
    return time.perf_counter() - t0


def speed_warning(model: nn.Module, rows: int) -> str | None:
    """A warning when the model's integer layers measure slower than FP32 ones on this host."""
    speedup = integer_speedup(model, rows)
    if speedup is None or speedup >= 1.0:
        return None
    device = next(model.parameters()).device
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, kernels cuda"
    else:
        host = kernels.probe_host()
        where = f"{host.cpu}, {host.capability}, kernels {kernels.active_backend()}"
    return (
        f"quantized layers run at {speedup:.2f}x the speed of FP32 ones on this host ({where}): "
        "this model streams slower than its FP32 base"
    )
