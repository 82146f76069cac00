"""Calibration of a text model on prompts: one rollout per prompt, one prompt at a time, the
captured rows bounded and on the CPU; scenarios a model cannot take are refused."""

from __future__ import annotations

import pytest
import torch

from qarvd_core.checkpoint import load_model
from qarvd_core.model import WorldModel
from qarvd_core.quant import CalibrationSet
from qarvd_core.quant.calibration import collect_inputs
from tests.support.wan_card import TINY_WAN, write_wan_card


def test_prompt_files_give_one_rollout_per_prompt_and_the_wrong_kind_is_refused(mini):
    calib = CalibrationSet.from_prompts(["a cat", "  ", "a dog in snow\n"], chunks=2)
    assert (calib.prompts, calib.rollouts, calib.batch) == (("a cat", "a dog in snow"), 2, 1)
    assert [c.biome for c in calib.scenarios(3)] == ["a cat", "a dog in snow"]
    assert {len(c.actions) for c in calib.scenarios(3)} == {6}
    with pytest.raises(ValueError, match="no calibration prompts"):
        CalibrationSet.from_prompts(["", " "])
    with pytest.raises(ValueError, match="--prompts FILE"):
        CalibrationSet().check(WorldModel(TINY_WAN))
    with pytest.raises(ValueError, match="biomes"):
        calib.check(mini)


def test_captured_rows_are_bounded_float32_on_the_cpu(tmp_path):
    pytest.importorskip("diffusers")
    model = load_model(str(write_wan_card(tmp_path)))
    layer = "blocks.1.ffn.0"
    calib = CalibrationSet.from_prompts(["a cat", "a dog", "a red city"], chunks=2, tokens_per_pass=8)
    inputs = collect_inputs(model, {layer: model.get_submodule(layer)}, calib, progress=False)
    x, chunk, t = inputs[layer].stacked()
    passes = len(model.card.sampling.steps) + 1  # the denoising steps and the commit at t = 0
    assert x.shape == (3 * 2 * passes * 8, TINY_WAN.dim)
    assert x.device == torch.device("cpu") and x.dtype == torch.float32
    assert sorted(set(chunk.tolist())) == [0, 1]
    assert t.min() == 0 and t.max() == 1
