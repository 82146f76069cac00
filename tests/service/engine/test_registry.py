import shutil

import pytest

from service.engine.registry import ModelInUse, ModelRegistry, UnknownModel


def test_loads_on_demand_and_unloads_the_least_recently_used(artifact_dir, tmp_path):
    arts = tmp_path / "a"
    shutil.copytree(artifact_dir, arts)
    for name in ("m2", "m3"):
        shutil.copy(arts / "mini.safetensors", arts / f"{name}.safetensors")
        shutil.copy(arts / "mini.json", arts / f"{name}.json")
    busy = {"mini"}
    reg = ModelRegistry(arts, max_loaded=2, in_use=lambda: busy)
    reg.get("mini")
    reg.get("m2")
    reg.get("m3")  # over budget: m2 is the least recently used model not in use
    assert reg.loaded() == ["mini", "m3"]
    assert reg.get("mini") is reg.get("mini")
    with pytest.raises(UnknownModel):
        reg.path_of("../mini")


def test_delete_refuses_base_and_busy_models(artifact_dir, tmp_path):
    arts = tmp_path / "a"
    shutil.copytree(artifact_dir, arts)
    busy: set[str] = {"mini-rtn-w8a8"}
    reg = ModelRegistry(arts, in_use=lambda: busy)
    with pytest.raises(ModelInUse, match="base model"):
        reg.delete("mini")
    with pytest.raises(ModelInUse, match="in use"):
        reg.delete("mini-rtn-w8a8")
    busy.clear()
    reg.delete("mini-rtn-w8a8")
    assert "mini-rtn-w8a8" not in reg.ids() and "mini" in reg.ids() and not list(arts.glob("mini-rtn*"))


def test_models_load_in_the_configured_dtype_and_compiled(artifact_dir):
    import numpy as np
    import torch

    from qarvd_core.quant import QuantLinear
    from qarvd_core.sampling import Stream

    reg = ModelRegistry(artifact_dir, dtype=torch.bfloat16, compile_blocks=True)
    base, quant = reg.get("mini"), reg.get("mini-rtn-w8a8")
    assert base.patch_embedding.weight.dtype == quant.patch_embedding.weight.dtype == torch.bfloat16
    assert all(m.w_scale.dtype == torch.float32 for m in quant.modules() if isinstance(m, QuantLinear))
    eager = ModelRegistry(artifact_dir, dtype=torch.bfloat16).get("mini-rtn-w8a8")
    a, b = Stream(quant, "desert", 1), Stream(eager, "desert", 1)
    for act in ("left", "up"):
        x, y = a.step(act), b.step(act)
        assert np.abs(x.astype(int) - y.astype(int)).mean() < 1.0  # bf16 rounding, not a different model
