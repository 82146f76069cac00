import pytest
import torch

from qarvd_core.quant.primitives import (
    AdaRound,
    QuantSpec,
    fake_quant,
    minmax_weight,
    mse_search_weight,
    quantize,
    weighted_mse_search_activation,
)


def sqnr(approx, ref):
    return float(10 * torch.log10(ref.pow(2).mean() / (approx - ref).pow(2).mean()))


@pytest.mark.parametrize(
    "bits, symmetric, floor_db",
    [(8, True, 38), (8, False, 40), (6, False, 28), (4, False, 16), (4, True, 14), (3, False, 10), (2, False, 4)],
)
def test_weight_quantizer_sqnr_per_bit_width(bits, symmetric, floor_db):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits, symmetric)
    scale, zero = mse_search_weight(w, spec)
    wq = fake_quant(w, scale[:, None], zero[:, None], spec)
    assert sqnr(wq, w) > floor_db
    # Roughly 6 dB per bit: one bit fewer must cost at least 4 dB.
    if bits > 2:
        lower = QuantSpec(bits - 1, symmetric)
        s2, z2 = mse_search_weight(w, lower)
        assert sqnr(wq, w) - sqnr(fake_quant(w, s2[:, None], z2[:, None], lower), w) > 4


def test_codes_stay_in_range_and_minmax_covers_the_row():
    w = torch.randn(8, 32) * 3
    for spec in (QuantSpec(4, True), QuantSpec(4, False), QuantSpec(8, False)):
        scale, zero = minmax_weight(w, spec)
        q = quantize(w, scale[:, None], zero[:, None], spec)
        assert q.min() >= spec.qmin and q.max() <= spec.qmax
        if spec.symmetric:
            assert (q.abs() == spec.qmax).any(1).all()
        else:
            assert ((q == spec.qmax).any(1) & (q == spec.qmin).any(1)).all()


def test_weighted_activation_search_follows_the_weights():
    g = torch.Generator().manual_seed(0)
    calm = torch.randn(50, 64, generator=g)
    wild = torch.randn(50, 64, generator=g)
    wild[:5, 0] = 200  # a rare outlier, only in the second half of the samples
    x = torch.cat([calm, wild])
    spec = QuantSpec(8, False)
    w_calm = torch.cat([torch.full((50,), 100.0), torch.full((50,), 0.01)])
    s_calm, _ = weighted_mse_search_activation(x, spec, w_calm)
    s_all, _ = weighted_mse_search_activation(x, spec, None)
    assert s_calm < s_all  # weighting the calm samples clips the outlier away


def test_adaround_starts_at_the_weight_and_hardens_to_valid_codes():
    w = torch.randn(16, 32)
    spec = QuantSpec(4, False)
    scale, zero = minmax_weight(w, spec)
    r = AdaRound(w, scale, zero, spec)
    err = (r(hard=False) - w).abs() / scale[:, None]
    # Rounding starts at w: off by the clamp of h to [0.01, 0.99] inside the range, and by at
    # most half a step at the range's ends (the zero point is an integer).
    assert err.max() <= 0.5 + 1e-4 and (err <= 0.011).float().mean() > 0.95
    codes = r.codes(hard=True)
    assert codes.min() >= 0 and codes.max() <= 15 and torch.equal(codes, codes.round())
    assert r.regulariser(2.0) > 0


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bad_bit_widths_raise_naming_the_fix(bits):
    with pytest.raises(ValueError, match="between 2 and 8"):
        QuantSpec(bits, True)
