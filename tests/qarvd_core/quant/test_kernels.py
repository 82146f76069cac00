import pytest
import torch

from qarvd_core.quant.kernels import CPU_TRANSPOSE_MAX_ROWS, int_mm, int_mm_padded


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
