import pytest
import torch

from qarvd_core.quant.kernels import (
    CPU_TRANSPOSE_MAX_ROWS,
    int8_linear_dynamic,
    int8_linear_onednn,
    int8_linear_static,
    int_mm,
    int_mm_padded,
    onednn_int8_is_exact,
    onednn_pack,
)


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
