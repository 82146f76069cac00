import pytest
import torch

from qarvd_core.quant.linear import DualScaleQuantLinear, QuantLinear, pack_int4, set_mode, unpack_int4
from qarvd_core.quant.primitives import QuantSpec


def _layer(w, b, wb, ab, act_mode="static", sym=False, x=None):
    q = QuantLinear.from_float(w, b, QuantSpec(wb, sym), QuantSpec(ab, False), act_mode)
    if x is not None:
        q.init_activation(x.reshape(-1, x.shape[-1]))
    return q


@pytest.mark.parametrize(
    "wb, ab, act_mode, sym",
    [
        (8, 8, "static", False),
        (8, 8, "static", True),
        (4, 8, "static", False),
        (4, 8, "dynamic", False),
        (8, 6, "static", False),
        (3, 8, "static", True),
    ],
)
def test_simulate_and_deploy_agree_on_odd_shapes(wb, ab, act_mode, sym):
    g = torch.Generator().manual_seed(wb * 10 + ab)
    w, b = torch.randn(37, 53, generator=g), torch.randn(37, generator=g)
    x = torch.randn(3, 11, 53, generator=g) * 2 + 0.5
    q = _layer(w, b, wb, ab, act_mode, sym, x)
    sim = q(x)
    set_mode(q, "deploy")
    dep = q(x)
    # Stated tolerance: the integer path equals fake quant up to fp32 rounding of the rescale.
    torch.testing.assert_close(dep, sim, atol=1e-4 * sim.abs().max().item(), rtol=1e-4)


def test_int_mm_path_matches_a_float_reference_exactly_in_integers():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(17, 29, generator=g)
    x = torch.randn(1, 29, generator=g)  # a single row: _int_mm still runs
    q = _layer(w, None, 8, 8, x=x)
    set_mode(q, "deploy")
    a = torch.clamp(torch.round(x / q.a_scale) + q.a_zero, 0, 255) - q.a_zero
    ref = (a @ (q.weight_codes().float() - q.w_zero[:, None]).t()) * q.a_scale * q.w_scale
    torch.testing.assert_close(q(x), ref, atol=1e-5, rtol=1e-5)


def test_w8a8_output_sqnr_and_four_bit_weights_are_packed_small():
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(256, 256, generator=g), torch.randn(64, 256, generator=g)
    ref = x @ w.t()
    q8 = _layer(w, None, 8, 8, x=x)
    err = (q8(x) - ref).pow(2).mean() / ref.pow(2).mean()
    assert 10 * torch.log10(1 / err) > 30
    q4 = _layer(w, None, 4, 8, x=x)
    assert q4.qweight.dtype == torch.uint8 and q4.qweight.numel() == 256 * 128
    stored = sum(t.numel() * t.element_size() for t in q4.state_dict().values())
    assert w.numel() * 4 / stored >= 7


def test_int4_packing_round_trips_odd_widths():
    codes = torch.randint(-8, 8, (5, 13), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(codes), 13), codes)


def test_dual_scale_protects_normal_columns():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g)
    w[:, :4] *= 40  # planted outlier columns
    x = torch.randn(256, 128, generator=g)
    ref = x @ w.t()
    single = _layer(w, None, 4, 8, x=x)
    dual = DualScaleQuantLinear.from_float(w, None, torch.arange(32), QuantSpec(4, False), QuantSpec(8, False))
    dual.init_activation(x)
    e_single = (single(x) - ref).pow(2).mean()
    e_dual = (dual(x) - ref).pow(2).mean()
    assert e_dual < e_single / 2
    torch.testing.assert_close(dual.dequantized_weight()[:, 40:], w[:, 40:], atol=0.6, rtol=0)
    set_mode(dual, "deploy")
    torch.testing.assert_close(dual(x), dual.outlier(x[:, :32]) + dual.normal(x[:, 32:]))
