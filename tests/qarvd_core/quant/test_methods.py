from dataclasses import replace

import pytest
import torch

from qarvd_core.checkpoint import load_quantized, save_quantized
from qarvd_core.quant import CalibrationSet, QArvdConfig, RTNConfig, config_from_dict, quantize, set_mode
from qarvd_core.quant.calibration import collect_inputs
from qarvd_core.quant.kernels import onednn_int8_is_exact
from qarvd_core.quant.linear import DualScaleQuantLinear, QuantLinear
from qarvd_core.quant.methods import GPTQConfig, SmoothQuantConfig, ViDiTQConfig
from qarvd_core.quant.methods.gptq import gptq_codes
from qarvd_core.quant.methods.qarvd import find_outlier_columns, frame_weights_from
from qarvd_core.quant.primitives import QuantSpec, fake_quant, minmax_weight, scale_zero_from_range
from qarvd_core.sampling import rollout

CAL = CalibrationSet(rollouts=2, chunks=3, tokens_per_pass=32)
ARGS = (["islands", "snow"], [["right"] * 9, ["up"] * 9], [4, 5])


def sqnr(a, ref):
    return float(10 * torch.log10(ref.pow(2).mean() / (a - ref).pow(2).mean()))


def test_outlier_detection_finds_planted_columns_rounded_and_capped():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    planted = torch.tensor([3, 50, 77, 200, 201])
    w[:, planted] *= 10
    idx = find_outlier_columns(w)
    assert len(idx) == 32 and set(planted.tolist()) <= set(idx.tolist())  # 5 rounded up to 32
    w2 = torch.randn(64, 64, generator=g)
    w2[:, :40] *= 10 ** torch.linspace(0.5, 2, 40)[None]  # many outliers: capped at half the columns
    assert len(find_outlier_columns(w2)) == 32
    assert len(find_outlier_columns(torch.randn(64, 256, generator=g))) == 0  # Gaussian: none


def test_frame_weights_match_a_hand_computed_example():
    # The official 7-chunk example: e = 0.546 ... 0.010 -> w_k = 7 e_k / sum(e)
    e = [0.546, 0.167, 0.119, 0.079, 0.053, 0.026, 0.010]
    w = frame_weights_from(e)
    assert sum(w) == pytest.approx(7)
    assert w[0] == pytest.approx(7 * 0.546 / 1.0) and w[-1] == pytest.approx(0.07)
    assert frame_weights_from([0, 0]) == [1.0, 1.0]


def test_calibration_rows_are_tagged_by_chunk_and_time(mini):
    store = collect_inputs(mini, {"blocks.0.ffn.0": mini.blocks[0].ffn[0]}, CAL, progress=False)
    x, chunk, t = store["blocks.0.ffn.0"].stacked()
    assert x.shape[1] == mini.args.dim and len(x) == len(chunk) == len(t)
    assert set(chunk.tolist()) == {0, 1, 2}
    assert 0.0 in set(t.tolist()) and 1.0 in set(t.tolist())  # commit passes and first steps
    # streams x chunks x passes (4 steps and the commit; action guidance is off) x kept tokens
    assert len(x) == 2 * 3 * 5 * 32


@pytest.mark.parametrize(
    "config, floor_db, act_mode",
    [
        (RTNConfig(w_bits=8, a_bits=8), 30, "static"),
        (RTNConfig(w_bits=8, a_bits=8, w_symmetric=True), 30, "static"),
        (RTNConfig(w_bits=4, a_bits=8, percentile=99.99), 10, "static"),
        (QArvdConfig(w_bits=8, a_bits=8, recon_iters=20, sensitivity_rollouts=2), 30, "static"),
        (QArvdConfig(w_bits=4, a_bits=8, recon_iters=20, frame_weighting=False), 10, "static"),
        (QArvdConfig(w_bits=8, a_bits=8, sensitivity_rollouts=2, rounding="gptq-act-per-token"), 30, "dynamic"),
        (SmoothQuantConfig(w_bits=8, a_bits=8, alpha=0.5), 20, "static"),
        (GPTQConfig(w_bits=4, a_bits=8), 10, "static"),
        (GPTQConfig(w_bits=8, a_bits=8, act_mode="dynamic"), 30, "dynamic"),
        (GPTQConfig(w_bits=4, a_bits=8, act_aware=True, weight_init="mse"), 10, "static"),
        (ViDiTQConfig(w_bits=8, a_bits=8), 30, "dynamic"),
    ],
)
def test_each_method_runs_end_to_end(mini, config, floor_db, act_mode):
    ref = rollout(mini, *ARGS)
    q = quantize(mini, config, CAL, progress=False)
    assert sqnr(rollout(q, *ARGS), ref) > floor_db
    assert not any(isinstance(m, QuantLinear) for m in mini.modules())  # the original is untouched
    kinds = {type(m) for m in q.modules()}
    assert QuantLinear in kinds
    assert isinstance(q.head.head, torch.nn.Linear) and isinstance(q.time_projection[1], torch.nn.Linear)
    info = q.quant_info
    assert info["config"]["method"] == config.name and info["calibration"]["split"] == "calibration"
    assert {m.act_mode for m in q.modules() if isinstance(m, QuantLinear)} == {act_mode}
    set_mode(q, "deploy")
    assert sqnr(rollout(q, *ARGS), ref) > floor_db


def test_gptq_beats_round_to_nearest_on_the_calibration_outputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    w = torch.randn(32, 64, generator=g)
    spec = QuantSpec(4, False)
    codes, scale, zero = gptq_codes(w, x, spec, 0.01, 16)
    w_gptq = (codes - zero[:, None]) * scale[:, None]
    s, z = minmax_weight(w, spec)
    w_rtn = fake_quant(w, s[:, None], z[:, None], spec)
    err = {k: (x @ (v - w).T).pow(2).mean() for k, v in (("gptq", w_gptq), ("rtn", w_rtn))}
    assert err["gptq"] < 0.7 * err["rtn"]


def test_gptq_row_weights_trade_error_towards_the_heavy_rows():
    # S1 on GPTQ's Hessian: rows of one "chunk" weighted 20x end with less error than unweighted.
    g = torch.Generator().manual_seed(6)
    x = torch.cat([torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g) for _ in range(2)])
    w = torch.randn(32, 64, generator=g)
    spec = QuantSpec(3, False)
    heavy = torch.arange(len(x)) < 256
    weights = torch.where(heavy, 20.0, 1.0)

    def heavy_error(row_weights):
        codes, scale, zero = gptq_codes(w, x, spec, 0.01, 16, row_weights=row_weights)
        return (x[heavy] @ ((codes - zero[:, None]) * scale[:, None] - w).T).pow(2).mean()

    assert heavy_error(weights) < 0.9 * heavy_error(None)


def test_gptq_rounds_two_column_groups_jointly():
    # A dual-scale layer's two parts with their own scales: one pass over all columns
    # compensates each part's error on the other's columns, which two separate passes cannot.
    g = torch.Generator().manual_seed(8)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated columns
    w = torch.randn(16, 64, generator=g)
    spec = QuantSpec(3, False)
    groups = (torch.arange(0, 64, 2), torch.arange(1, 64, 2))
    scale, zero = torch.empty_like(w), torch.empty_like(w)
    for cols in groups:
        s, z = minmax_weight(w[:, cols], spec)
        scale[:, cols], zero[:, cols] = s[:, None], z[:, None]
    codes, _, _ = gptq_codes(w, x, spec, 0.01, 16, scale, zero)
    joint = (codes - zero) * scale
    apart = torch.empty_like(w)
    for cols in groups:
        c, s, z = gptq_codes(w[:, cols], x[:, cols], spec, 0.01, 16, scale[:, cols[0]], zero[:, cols[0]])
        apart[:, cols] = (c - z[:, None]) * s[:, None]

    def err(v):
        return (x @ (v - w).T).pow(2).mean()

    assert err(joint) < 0.8 * err(apart)  # 0.71x when written


def test_act_aware_gptq_absorbs_the_activation_error():
    # Activations clipped hard (4 bits, 40% of their range): rounding against the quantized
    # inputs, aiming at the FP outputs, leaves less output error than GPTQ on the FP inputs,
    # also on rows it never saw (the clipping error follows the signal, so it generalises).
    g = torch.Generator().manual_seed(7)
    mix = torch.randn(64, 64, generator=g)
    x, x_new = (torch.randn(n, 64, generator=g) @ mix for n in (1024, 512))
    w = torch.randn(32, 64, generator=g)
    a_spec = QuantSpec(4, False)
    scale, zero = scale_zero_from_range(0.4 * x.min(), 0.4 * x.max(), a_spec)

    def error(x_quant, rows):
        codes, s, z = gptq_codes(w, x, QuantSpec(4, False), 0.01, 16, x_quant=x_quant)
        wq = (codes - z[:, None]) * s[:, None]
        return (fake_quant(rows, scale, zero, a_spec) @ wq.T - rows @ w.T).pow(2).mean()

    x_quant = fake_quant(x, scale, zero, a_spec)
    assert error(x_quant, x) < 0.85 * error(None, x)
    assert error(x_quant, x_new) < 0.95 * error(None, x_new)


def test_qarvd_uses_sensitivity_weights_and_dual_scale(make_mini):
    model = make_mini(seed=2)
    with torch.no_grad():
        model.blocks[1].ffn[2].weight[:, :3] *= 30  # plant outlier input columns
    q = quantize(model, QArvdConfig(w_bits=4, recon_iters=10, sensitivity_rollouts=2), CAL, progress=False)
    info = q.quant_info
    assert len(info["chunk_sensitivity"]) == 3 and sum(info["frame_weights"]) == pytest.approx(3)
    assert isinstance(q.blocks[1].ffn[2], DualScaleQuantLinear)
    assert info["layers"]["blocks.1.ffn.2"]["outliers"] == 32
    off = quantize(
        model, QArvdConfig(w_bits=4, recon_iters=0, dual_scale=False, frame_weighting=False), CAL, progress=False
    )
    assert not any(isinstance(m, DualScaleQuantLinear) for m in off.modules())
    assert off.quant_info["frame_weights"] is None


def test_qarvd_leaves_prompt_layers_at_nearest_and_gptq_rounding_rounds_them(mini):
    prompt_layer = "blocks.0.cross_attn.k"

    def run(**options):
        cfg = QArvdConfig(w_bits=4, frame_weighting=False, dual_scale=False, **options)
        q = quantize(mini, cfg, CAL, progress=False)
        return q.quant_info["layers"], q.get_submodule(prompt_layer).weight_codes()

    official, codes_official = run(recon_iters=30)
    assert "recon_loss" not in official[prompt_layer] and "recon_loss" in official["blocks.0.self_attn.k"]
    _, codes_nearest = run(recon_iters=0)
    assert torch.equal(codes_official, codes_nearest)
    _, codes_gptq = run(rounding="gptq")
    assert not torch.equal(codes_gptq, codes_nearest)


def test_qarvd_gptq_rounding_beats_nearest_on_the_same_scales(mini):
    layer = "blocks.0.ffn.0"
    x = collect_inputs(mini, {layer: mini.blocks[0].ffn[0]}, CAL, progress=False)[layer].stacked()[0]
    lin = mini.get_submodule(layer)
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)

    def error(**options):
        cfg = QArvdConfig(w_bits=4, frame_weighting=False, dual_scale=False, **options)
        q = quantize(mini, cfg, CAL, progress=False).get_submodule(layer)
        w = q.dequantized_weight()
        return (torch.nn.functional.linear(x, w, q.bias) - ref).pow(2).mean() / ref.pow(2).mean()

    assert error(rounding="gptq") < 0.9 * error(recon_iters=0)  # 0.82x when written


def test_qarvd_act_aware_rounding_lowers_the_layer_error_with_quantized_inputs(mini):
    # Fine weights, coarse activations: the activation error dominates and the weights absorb part.
    layer = "blocks.0.ffn.2"
    x = collect_inputs(mini, {layer: mini.get_submodule(layer)}, CAL, progress=False)[layer].stacked()[0]
    lin = mini.get_submodule(layer)
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)

    def error(rounding):
        cfg = QArvdConfig(w_bits=8, a_bits=4, frame_weighting=False, dual_scale=False)
        q = quantize(mini, replace(cfg, rounding=rounding), CAL, progress=False).get_submodule(layer)
        with torch.no_grad():  # simulate mode: the inputs are quantized too
            return float((q(x) - ref).pow(2).mean() / ref.pow(2).mean())

    assert error("gptq-act") < 0.97 * error("gptq")  # 0.935x when written


def test_qarvd_dynamic_activations_are_per_token_and_saved(mini_weights, tmp_path):
    base_path, mini = mini_weights
    # Coarse activations on tokens of very different scales: one range per token beats one per layer.
    layer = "blocks.0.ffn.2"
    x = collect_inputs(mini, {layer: mini.get_submodule(layer)}, CAL, progress=False)[layer].stacked()[0]
    x = x * torch.logspace(-1, 1, len(x))[:, None]
    lin = mini.get_submodule(layer)
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    cfg = QArvdConfig(w_bits=8, a_bits=4, dual_scale=False, sensitivity_rollouts=1)
    static = quantize(mini, replace(cfg, rounding="gptq"), CAL, progress=False)
    dynamic = quantize(mini, replace(cfg, rounding="gptq-per-token"), CAL, progress=False)
    assert {m.act_mode for m in dynamic.modules() if isinstance(m, QuantLinear)} == {"dynamic"}
    assert dynamic.quant_info["layers"][layer]["act_mode"] == "dynamic" and dynamic.quant_info["frame_weights"]
    with torch.no_grad():
        err = {k: sqnr(m.get_submodule(layer)(x), ref) for k, m in (("static", static), ("dynamic", dynamic))}
    assert err["dynamic"] > err["static"] + 3  # dB; 15.7 vs 3.5 when written

    path = save_quantized(dynamic, tmp_path / "q.safetensors", str(base_path))
    loaded = load_quantized(path)
    assert loaded.get_submodule(layer).act_mode == "dynamic"
    torch.testing.assert_close(rollout(loaded, *ARGS), rollout(dynamic, *ARGS), atol=0, rtol=0)


def test_symmetric_weights_have_no_zero_point_term_and_are_saved(mini_weights, tmp_path):
    base_path, mini = mini_weights
    q = quantize(mini, RTNConfig(w_symmetric=True), CAL, progress=False)
    loaded = set_mode(load_quantized(save_quantized(q, tmp_path / "q.safetensors", str(base_path))), "deploy")
    assert loaded.quant_info["config"]["w_symmetric"] is True
    layers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.prepare_compile(frozen=True)
    # No zero point, so no row sum of the quantized input: the quantize stays pointwise when compiled.
    assert all(m.w_zero.abs().max() == 0 and m._deploy_cache.get("w_zero_scaled") is None for m in layers)
    # Frozen compiles take oneDNN's int8 linear only where it is exact (VNNI/AMX), else `_int_mm`.
    assert all(("packed" in m._deploy_cache) == onednn_int8_is_exact() for m in layers)
    asym = quantize(mini, RTNConfig(), CAL, progress=False)
    assert any(m.w_zero.abs().max() > 0 for m in asym.modules() if isinstance(m, QuantLinear))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"method": "awq"}, "unknown method"),
        ({"method": ["qarvd"]}, "unknown method"),
        ({"method": "qarvd", "w_bits": 1}, "w_bits must be an integer from 2 to 8"),
        ({"method": "rtn", "a_bits": 9}, "a_bits"),
        ({"method": "rtn", "alpha": 0.5}, "unknown option"),
        ({"method": "rtn", "percentile": 20}, "percentile"),
        ({"method": "qarvd", "rounding": "floor"}, "rounding must be 'adaround' or one of"),
        ({"method": "qarvd", "rounding": "rtn"}, "rounding must be 'adaround' or one of"),
        ({"method": "qarvd", "act_mode": "dynamic"}, "unknown option"),
        ({"method": "qarvd-s1", "alpha": 0.5}, "unknown option.*'qarvd'"),
        ({"method": "gptq", "act_mode": "none"}, "act_mode must be 'static'"),
        ({"method": "gptq-per-token", "weight_init": "max"}, "weight_init"),
        ({"method": "rtn", "w_symmetric": "yes"}, "w_symmetric must be true or false"),
    ],
)
def test_bad_configs_raise_value_errors_naming_the_fix(bad, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(bad)
