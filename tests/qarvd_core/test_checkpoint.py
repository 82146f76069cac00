import pytest

from qarvd_core.checkpoint import load_model, read_manifest, resolve_weights, sha256_of, shipped_models
from qarvd_core.model import ModelArgs


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
