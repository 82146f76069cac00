"""Where weights come from and go: shipped names, manifests, and quantized checkpoints that
load to the same outputs and refuse other versions, other bases and damaged files."""

import json

import pytest
import torch

from qarvd_core.checkpoint import (
    load_model,
    load_quantized,
    read_manifest,
    resolve_weights,
    save_quantized,
    save_weights,
    sha256_of,
    shipped_models,
)
from qarvd_core.model import ModelArgs
from qarvd_core.quant import CalibrationSet, QArvdConfig, quantize
from qarvd_core.sampling import rollout
from tests.conftest import mini_model

ARGS = (["forest"], [["left"] * 6], [3])


def make_checkpoint(directory):
    """A W4 Q-ARVD checkpoint of a mini model with planted outliers; (path, model, base path)."""
    base_path = save_weights(mini_model(), directory / "mini.safetensors", preset=None)
    base = load_model(str(base_path))  # as saved: quantized from the weights the checkpoint names
    with torch.no_grad():
        base.blocks[0].ffn[0].weight[:, :2] *= 30
    save_weights(base, base_path, preset=None)
    q = quantize(
        base,
        QArvdConfig(w_bits=4, recon_iters=5, sensitivity_rollouts=1),
        CalibrationSet(rollouts=1, chunks=2, tokens_per_pass=16),
        progress=False,
    )
    path = save_quantized(q, directory / "q.safetensors", str(base_path), {"psnr_db_mean": 40.0})
    return path, q, base_path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Shared by the tests that only read it (quantizing and compiling once is most of their time)."""
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint"))


def test_save_load_gives_identical_outputs_and_a_full_manifest(checkpoint):
    path, q, _ = checkpoint
    loaded = load_quantized(path)
    torch.testing.assert_close(rollout(loaded, *ARGS), rollout(q, *ARGS), atol=0, rtol=0)
    m = json.loads(path.with_suffix(".json").read_text())
    assert m["format_version"] == 1 and len(m["base_model"]["sha256"]) == 64
    qi = m["quantization"]
    assert qi["config"]["method"] == "qarvd" and qi["frame_weights"] and qi["calibration"]["rollouts"] == 1
    assert qi["layers"]["blocks.0.ffn.0"]["outliers"] == 16 and m["evaluation"]["psnr_db_mean"] == 40.0
    # Through the model-name path too, in deploy mode.
    assert load_model(str(path)).blocks[0].ffn[2].mode == "deploy"


def test_refuses_unknown_version_other_base_and_truncated_file(make_mini, tmp_path):
    path, _, base_path = make_checkpoint(tmp_path)  # its own: this test damages it
    manifest_path = path.with_suffix(".json")
    original = manifest_path.read_text()
    manifest_path.write_text(original.replace('"format_version": 1', '"format_version": 7'))
    with pytest.raises(ValueError, match="format_version 7.*upgrade"):
        load_quantized(path)
    manifest_path.write_text(original)
    save_weights(make_mini(seed=9), base_path, preset=None)  # the base changed underneath
    with pytest.raises(ValueError, match="different .*re-run `qarvd quantize`"):
        load_quantized(path)
    manifest_path.write_text(original.replace(str(base_path), "not-installed-base"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_quantized(path)


def test_bf16_compute_keeps_fp32_scales_and_the_quantized_output(checkpoint):
    from qarvd_core.eval.metrics import psnr
    from qarvd_core.quant import QuantLinear
    from qarvd_core.sampling import to_uint8

    path, _, _ = checkpoint
    fp32 = load_model(str(path))
    bf16 = load_model(str(path), dtype=torch.bfloat16)
    assert bf16.patch_embedding.weight.dtype == torch.bfloat16 and bf16.blocks[0].norm3.weight.dtype == torch.bfloat16
    layers = [m for m in bf16.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.w_scale.dtype == m.a_scale.dtype == torch.float32 for m in layers)
    assert all(m.mode == "deploy" for m in layers)
    ref = to_uint8(rollout(fp32, *ARGS))
    assert psnr(to_uint8(rollout(bf16, *ARGS)), ref).mean() > 35
    compiled = load_model(str(path), dtype=torch.bfloat16).compile_blocks()
    assert psnr(to_uint8(rollout(compiled, *ARGS)), ref).mean() > 35


def test_frozen_compile_runs_deploy_layers_on_onednn_and_keeps_the_output(checkpoint):
    # compile_blocks(max_autotune=True): frozen weights, every deploy layer (dual-scale parts too)
    # on oneDNN's int8 linear where it is exact (else `_int_mm`), the stream as the eager deploy model makes it.
    from qarvd_core.eval.metrics import psnr
    from qarvd_core.quant import DualScaleQuantLinear, QuantLinear
    from qarvd_core.quant.kernels import onednn_int8_is_exact
    from qarvd_core.sampling import to_uint8

    path, _, _ = checkpoint
    eager = to_uint8(rollout(load_model(str(path), dtype=torch.bfloat16), *ARGS))
    model = load_model(str(path), dtype=torch.bfloat16).compile_blocks(max_autotune=True)
    assert any(isinstance(m, DualScaleQuantLinear) for m in model.modules())
    layers = [m for m in model.blocks.modules() if isinstance(m, QuantLinear)]
    assert layers and all(("packed" in m._deploy_tensors()) == onednn_int8_is_exact() for m in layers)
    assert psnr(to_uint8(rollout(model, *ARGS)), eager).mean() > 35
    model.compile_blocks()  # back to `_int_mm`: an unfrozen compile cannot take prepacked weights
    assert not any("packed" in m._deploy_tensors() for m in layers)
    assert psnr(to_uint8(rollout(model, *ARGS)), eager).mean() > 35


def test_shipped_tiny_world_matches_its_manifest_and_loads():
    assert "tiny-world" in shipped_models()
    path = resolve_weights("tiny-world")
    manifest = read_manifest(path)
    assert sha256_of(path) == manifest["sha256"]
    assert manifest["command"].startswith("qarvd train --preset tiny-world")
    model = load_model("tiny-world")
    assert model.args == ModelArgs.from_name("tiny-world") and model.args.camera_rope and not model.training


def test_unknown_names_and_paths_say_what_exists(tmp_path):
    with pytest.raises(ValueError, match="tiny-world"):
        resolve_weights("tiny-wrld")
    with pytest.raises(ValueError, match="no weights file"):
        resolve_weights(str(tmp_path / "x.safetensors"))
