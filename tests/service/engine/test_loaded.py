import shutil

import numpy as np
import pytest
import torch

from qarvd_core.quant import QuantLinear
from qarvd_core.sampling import Stream, step_streams
from service.engine.loaded import LoadedModels
from service.store import ModelStore, UnknownModel


def test_loads_on_demand_and_unloads_the_least_recently_used(artifact_dir, tmp_path):
    arts = tmp_path / "a"
    shutil.copytree(artifact_dir, arts)
    for name in ("m2", "m3"):
        shutil.copy(arts / "mini.safetensors", arts / f"{name}.safetensors")
        shutil.copy(arts / "mini.json", arts / f"{name}.json")
    busy = {"mini"}
    models = LoadedModels(ModelStore(arts), max_loaded=2, in_use=lambda: busy)
    models.get("mini")
    models.get("m2")
    models.get("m3")  # over budget: m2 is the least recently used model not in use
    assert models.ids() == ["mini", "m3"]
    assert models.get("mini") is models.get("mini")
    models.unload("m3")
    assert models.ids() == ["mini"]
    with pytest.raises(UnknownModel):
        models.get("../mini")


def test_models_load_in_the_configured_dtype_and_compiled(artifact_dir):
    store = ModelStore(artifact_dir)
    models = LoadedModels(store, dtype=torch.bfloat16, compile_blocks=True)
    base, quant = models.get("mini"), models.get("mini-rtn-w8a8")
    assert base.patch_embedding.weight.dtype == quant.patch_embedding.weight.dtype == torch.bfloat16
    assert all(m.w_scale.dtype == torch.float32 for m in quant.modules() if isinstance(m, QuantLinear))
    eager = LoadedModels(store, dtype=torch.bfloat16).get("mini-rtn-w8a8")
    a, b = Stream(quant, "desert", 1), Stream(eager, "desert", 1)
    for act in ("left", "up"):
        x, y = a.step(act), b.step(act)
        assert np.abs(x.astype(int) - y.astype(int)).mean() < 1.0  # bf16 rounding, not a different model


def test_quantized_models_compile_by_their_own_setting(artifact_dir):
    """`auto` compile can differ for models with integer layers (runtime.plan(quantized=True))."""
    models = LoadedModels(ModelStore(artifact_dir), compile_blocks=False, compile_quantized=True)
    fp, q = models.get("mini"), models.get("mini-rtn-w8a8")
    assert not models.compiles(fp) and models.compiles(q)
    assert "_compiled_call_impl" not in vars(fp.blocks[0]) and "_compiled_call_impl" in vars(q.blocks[0])
    streams = [Stream(q, "forest", 0)]
    step_streams(streams, ["right"])  # the compiled quantized model streams


def test_unloading_a_model_frees_its_batch_buffers(artifact_dir):
    from qarvd_core.sampling import _BATCH_BUFFERS

    models = LoadedModels(ModelStore(artifact_dir), max_loaded=1)
    mini = models.get("mini")
    step_streams([Stream(mini, "forest", 0), Stream(mini, "snow", 1)], ["right", "left"])
    assert _BATCH_BUFFERS[mini][0].shape[1] == 2  # kept across chunks while the model is loaded
    quant = models.get("mini-rtn-w8a8")  # over budget: mini is unloaded, its buffers with it
    assert mini not in _BATCH_BUFFERS and models.ids() == ["mini-rtn-w8a8"]
    step_streams([Stream(quant, "forest", 0)], ["right"])
    models.unload("mini-rtn-w8a8")
    assert quant not in _BATCH_BUFFERS
