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
