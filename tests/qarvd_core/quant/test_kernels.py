import os
import subprocess
import sys

import pytest
import torch

from qarvd_core.quant.kernels import (
    CPU_TRANSPOSE_MAX_ROWS,
    FBGEMM_PAIR_LIMIT,
    Host,
    fbgemm_columns,
    fbgemm_input,
    fbgemm_linear,
    fbgemm_pack,
    int8_linear_dynamic,
    int8_linear_onednn,
    int8_linear_static,
    int_mm,
    int_mm_padded,
    onednn_int8_is_exact,
    onednn_pack,
)
from qarvd_core.runtime import plan


def _exact(a, w):
    return a.long() @ w.long().t()


@pytest.mark.parametrize(
    "m, k, n",
    [
        (1, 29, 17),  # fewer rows than outputs: the transposed problem
        (33, 53, 37),
        (64, 48, 16),  # more rows than outputs: the direct one
        (CPU_TRANSPOSE_MAX_ROWS + 8, 40, 1024),  # many rows: direct, however wide
    ],
)
def test_int_mm_equals_the_exact_integer_product_on_both_layouts(m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    out = int_mm(a, w)
    assert out.shape == (m, n) and out.dtype == torch.int32
    assert torch.equal(out.long(), _exact(a, w))


def test_padded_int_mm_meets_shape_rules_and_slices_back_exactly():
    # The CUDA path's padding, checked on CPU: 3 rows, K and N not multiples of 8.
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (3, 29), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (13, 29), dtype=torch.int8, generator=g)
    out = int_mm_padded(a, w)
    assert out.shape == (3, 13)
    assert torch.equal(out.long(), _exact(a, w))


@pytest.mark.skipif(not onednn_int8_is_exact(), reason="oneDNN's int8 GEMM saturates without VNNI; it is not used here")
@pytest.mark.parametrize("act", ["static", "dynamic"])
@pytest.mark.parametrize("asym_w", [False, True])
def test_onednn_int8_linear_equals_the_int_mm_path(act, asym_w):
    # The frozen-compile kernel (oneDNN's int8 linear, zero-point term added afterwards) against
    # `_int_mm` plus rescale, on odd shapes, with asymmetric activations and weights.
    g = torch.Generator().manual_seed(1)
    m, k, n = 37, 70, 45
    x = torch.randn(m, k, generator=g) * 3
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    w_zero = torch.randint(-9, 10, (n,), generator=g).int() if asym_w else torch.zeros(n, dtype=torch.int32)
    w_scale, bias = torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g)
    colsum = w.sum(1, dtype=torch.int32)
    if act == "static":
        s, z = torch.tensor(0.05), torch.tensor(131.0)
        ref = int8_linear_static(x, w, colsum, w_zero, w_scale, bias, s, z, 0, 255, 128, asym_w)
        spec = (float(s), int(z), 0, 255)
    else:
        ref = int8_linear_dynamic(x, w, colsum, w_zero, w_scale, bias, 8, asym_w)
        spec = 8
    zeros = torch.zeros(n, dtype=torch.int32)
    out = int8_linear_onednn(x, onednn_pack(w), w_scale, zeros, w_scale * w_zero if asym_w else None, bias, spec)
    assert out.shape == (m, n)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def _host(capability="AVX2", vnni=False, amx=False, native_bf16=False, fbgemm=True) -> Host:
    return Host("a test CPU", capability, vnni, amx, native_bf16, fbgemm)


@pytest.mark.parametrize(
    "host, backend, dtype, compiled",
    [
        (_host("AVX512", vnni=True, amx=True, native_bf16=True), "onednn", "bf16", True),  # Sapphire Rapids
        (_host("AVX512", vnni=True), "onednn", "fp32", True),  # Cascade Lake: VNNI, no bf16
        (_host("AVX2"), "fbgemm", "fp32", False),  # EPYC Zen 2/3, or any host capped to AVX2
        (_host("DEFAULT", fbgemm=False), "int_mm", "fp32", False),  # no FBGEMM (e.g. ARM)
    ],
)
def test_auto_picks_the_kernels_dtype_and_compile_the_host_has(host, backend, dtype, compiled):
    p = plan(host=host)
    assert (p.kernels, p.dtype, p.compile) == (backend, dtype, compiled)
    assert all(p.reasons[k] for k in ("kernels", "dtype", "compile"))
    # A quantized model compiles on every host: the graphs fuse its quantize and rescale.
    assert plan(host=host, quantized=True).compile


def test_forced_choices_are_honoured_on_any_host():
    p = plan("bf16", True, "int_mm", host=_host("AVX2"))
    assert (p.kernels, p.dtype, p.compile) == ("int_mm", "bf16", True)
    assert "slow" in p.reasons["dtype"] and p.reasons["kernels"] == "forced"
    with pytest.raises(ValueError, match="unknown kernels"):
        plan(backend="mkl")
    with pytest.raises(ValueError, match="CUDA device"):
        plan(backend="cuda", host=_host("AVX2"))


def test_an_instruction_set_cap_is_what_the_probe_sees():
    # ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY emulate an AVX2-only host on a bigger one, so the
    # choice for that host class is checked whatever CPU runs the tests.
    code = (
        "from qarvd_core.runtime import plan; from qarvd_core.quant.kernels import probe_host; "
        "h = probe_host(); p = plan(); print(h.capability, h.vnni, h.amx, h.native_bf16, p.kernels, p.dtype); "
        "from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir; "
        "print(cache_dir() != default_cache_dir(), 'avx2' in cache_dir())"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    fbgemm = "fbgemm" in torch.backends.quantized.supported_engines
    probe, cache = out.splitlines()
    assert probe.split() == ["AVX2", "False", "False", "False", "fbgemm" if fbgemm else "int_mm", "fp32"]
    # Graphs compiled capped stay apart from uncapped ones (their kernels' vector width differs).
    assert cache == "True True"


needs_fbgemm = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines, reason="FBGEMM is built for x86 only"
)


@pytest.mark.parametrize("k", [64, 71])  # odd K: the last code has no pair
def test_fbgemm_columns_keep_every_pair_within_the_limit_and_the_product_exact(k):
    # Weights minus zero points span 9 bits; the worst rows pair -255 with -255 and 255 with 254.
    g = torch.Generator().manual_seed(k)
    values = torch.randint(-255, 256, (40, k), generator=g)
    values[0], values[1] = -255, torch.where(torch.arange(k) % 2 == 0, 255, 254)
    codes, extra = fbgemm_columns(values)
    assert codes.dtype == torch.int8 and codes.shape == (40, k + len(extra))
    pairs = torch.nn.functional.pad(codes.long(), (0, codes.shape[1] % 2)).unflatten(1, (-1, 2))
    same_sign = pairs[..., 0] * pairs[..., 1] > 0
    assert not (same_sign & (pairs.abs().sum(-1) > FBGEMM_PAIR_LIMIT)).any()
    x = torch.randint(0, 256, (9, k), generator=g)  # unsigned activation codes, as FBGEMM takes them
    assert torch.equal(fbgemm_input(x, extra) @ codes.long().t(), x @ values.t())


@needs_fbgemm
@pytest.mark.parametrize("k", [64, 71])  # odd K: the last code has no pair
def test_fbgemm_int8_linear_is_exact_where_16_bit_pair_sums_would_saturate(k):
    # Worst case for vpmaddubsw: activation codes of 255 against weight pairs of -128/+127, which
    # overflow a 16-bit sum as they are; the extra columns keep every pair within it.
    g = torch.Generator().manual_seed(k)
    m, n = 33, 40
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    w[:4] = torch.where(torch.arange(k) % 2 == 0, -128, 127).to(torch.int8)
    w_zero = torch.randint(-3, 4, (n,), generator=g).int()
    w_scale, bias = torch.rand(n, generator=g) * 0.01 + 1e-3, torch.randn(n, generator=g)
    s, z = 0.05, 131
    x = (torch.randint(0, 256, (m, k), generator=g) - z) * s
    x[:4] = (255 - z) * s
    ref = int8_linear_static(
        x,
        w,
        w.sum(1, dtype=torch.int32),
        w_zero,
        w_scale,
        bias,
        torch.tensor(s),
        torch.tensor(float(z)),
        0,
        255,
        128,
        True,
    )
    packed = fbgemm_pack(w, w_zero, w_scale, bias)
    out = fbgemm_linear(fbgemm_input(x, packed.extra), packed.handle, torch.tensor([s, z, 0, 255]), None, n)
    assert len(packed.extra) > 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_the_load_time_measurement_covers_quantized_layers_only(mini):
    from qarvd_core.quant import CalibrationSet, RTNConfig, quantize, set_mode
    from qarvd_core.runtime import integer_speedup

    assert integer_speedup(mini, rows=16) is None  # nothing quantized: nothing to warn about
    q = set_mode(quantize(mini, RTNConfig(), CalibrationSet(rollouts=1, chunks=2), progress=False), "deploy")
    assert integer_speedup(q, rows=16) > 0
