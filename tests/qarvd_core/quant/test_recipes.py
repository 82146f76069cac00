import json

import pytest
import torch

from qarvd_core.checkpoint import load_quantized, save_quantized
from qarvd_core.quant import (
    METHODS,
    RECIPES,
    CalibrationSet,
    QArvdConfig,
    config_from_dict,
    config_from_manifest,
    quantize,
)
from qarvd_core.sampling import rollout

CAL = CalibrationSet(rollouts=2, chunks=3, tokens_per_pass=32)
ARGS = (["islands"], [["right"] * 6], [4])

# What qarvd wrote into a manifest before recipes (format 1): Q-ARVD's quantizers, GPTQ's
# rounding on every layer, per-token activations.
OLD_QARVD = {
    "method": "qarvd",
    "w_bits": 8,
    "a_bits": 8,
    "keep_fp": ["patch_embedding", "time_embedding", "time_projection", "head"],
    "w_symmetric": False,
    "frame_weighting": False,
    "dual_scale": False,
    "weighting_on_dual_scale": False,
    "frame_weights": None,
    "rounding_init": "gptq",
    "reconstruct_prompt_layers": True,
    "act_mode": "dynamic",
    "sensitivity_rollouts": 8,
    "recon_iters": 0,
    "recon_rows": 256,
    "lr_rounding": 0.002,
    "lr_act_scale": 4e-05,
    "round_reg": 0.01,
    "outlier_z": 3.5,
    "outlier_ratio": 1.2,
    "outlier_align": 32,
}


def test_every_method_is_the_recipe_of_its_defaults_and_every_recipe_builds():
    assert {r.method for r in RECIPES.values()} == set(METHODS)
    for name, (cls, _) in METHODS.items():
        assert RECIPES[name].method == name and RECIPES[name].options == {}
        assert config_from_dict({"method": name}) == cls()
    for name, recipe in RECIPES.items():
        config = config_from_dict({"method": name, "w_bits": 8})
        assert config.name == recipe.method and config.w_bits == 8
        assert all(getattr(config, k) == v for k, v in recipe.options.items()) and recipe.about


def test_options_beside_a_recipe_override_its_own():
    assert config_from_dict({"method": "gptq-act-per-token"}).act_mode == "dynamic"
    config = config_from_dict({"method": "gptq-act-per-token", "act_mode": "static"})
    assert config.act_mode == "static" and config.act_aware


def test_gptq_act_per_token_is_qarvd_without_its_switches_on_that_rounding(mini):
    gptq = quantize(mini, config_from_dict({"method": "gptq-act-per-token", "w_bits": 4}), CAL, progress=False)
    qarvd = QArvdConfig(w_bits=4, frame_weighting=False, dual_scale=False, rounding="gptq-act-per-token")
    neither = quantize(mini, qarvd, CAL, progress=False)
    a, b = gptq.state_dict(), neither.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "old, rounding",
    [
        ({"rounding_init": "gptq", "recon_iters": 0, "act_mode": "dynamic"}, "gptq-per-token"),
        ({"rounding_init": "gptq-act", "recon_iters": 0, "act_mode": "static"}, "gptq-act"),
        ({"rounding_init": "gptq-act", "recon_iters": 0, "act_mode": "dynamic"}, "gptq-act-per-token"),
        ({"rounding_init": "nearest", "recon_iters": 2000, "act_mode": "static"}, "adaround"),
        ({"rounding_init": "gptq", "recon_iters": 500, "act_mode": "static"}, "adaround"),  # a GPTQ start
    ],
)
def test_manifests_from_before_recipes_map_to_the_rounding_that_made_them(old, rounding):
    config = config_from_manifest({**OLD_QARVD, **old})
    assert config.rounding == rounding and config.recon_iters == old["recon_iters"]
    assert (config.w_bits, config.a_bits, config.frame_weighting, config.dual_scale) == (8, 8, False, False)


def test_a_checkpoint_from_before_recipes_loads(mini_weights, tmp_path):
    base_path, mini = mini_weights
    q = quantize(mini, config_from_manifest(OLD_QARVD), CAL, progress=False)
    path = save_quantized(q, tmp_path / "q.safetensors", str(base_path))
    manifest = json.loads(path.with_suffix(".json").read_text())
    manifest["quantization"]["config"] = OLD_QARVD
    path.with_suffix(".json").write_text(json.dumps(manifest))
    loaded = load_quantized(path)
    assert loaded.quant_info["config"] == OLD_QARVD  # the manifest says what ran, in its own words
    assert loaded.get_submodule("blocks.0.ffn.0").act_mode == "dynamic"
    torch.testing.assert_close(rollout(loaded, *ARGS), rollout(q, *ARGS), atol=0, rtol=0)
