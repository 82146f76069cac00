import json
import shutil

import pytest

from qarvd_core.checkpoint import shipped_models
from service.store import DeleteRefused, ModelStore, UnknownModel


@pytest.fixture
def store(artifact_dir, tmp_path):
    arts = tmp_path / "a"
    shutil.copytree(artifact_dir, arts)
    return ModelStore(arts)


def test_ids_name_shipped_and_artifact_models_and_never_paths(store):
    assert set(store.ids()) == {"mini", "mini-rtn-w8a8", *shipped_models()}
    assert store.path_of("mini") == store.artifact_dir / "mini.safetensors"
    for bad in ("../mini", ".hidden", "a/b", "", "nope"):
        with pytest.raises(UnknownModel):
            store.path_of(bad)
    (store.artifact_dir / "half.safetensors").write_bytes(b"")  # no manifest: not a model yet
    assert "half" not in store.ids()
    with pytest.raises(UnknownModel):
        store.record("half")


def test_records_summarise_the_manifests(store):
    base, q = store.record("mini"), store.record("mini-rtn-w8a8")
    assert (base.kind, base.base, base.method) == ("base", None, None)
    assert (q.kind, q.base, q.method, q.w_bits, q.a_bits) == ("quantized", "mini", "rtn", 8, 8)
    assert q.size_bytes == q.path.stat().st_size and len(q.sha256) == 64 and q.created


def test_publish_moves_a_checkpoint_in_and_delete_takes_only_unused_quantized_models(store, tmp_path):
    staged = tmp_path / "staged"
    staged.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.move(store.artifact_dir / f"mini-rtn-w8a8{suffix}", staged / f"q{suffix}")
    assert "q" not in store.ids()
    assert store.publish(staged / "q.safetensors") == "q"
    assert store.record("q").kind == "quantized" and not list(staged.iterdir())
    with pytest.raises(DeleteRefused, match="base model"):
        store.delete("mini")
    with pytest.raises(DeleteRefused, match="in use"):
        store.delete("q", in_use={"q"})
    store.delete("q", in_use={"mini"})
    assert "q" not in store.ids() and not list(store.artifact_dir.glob("q.*"))
    with pytest.raises(UnknownModel):
        store.delete("q")


def test_model_cards_in_the_artifact_dir_or_named_by_path_are_base_models(store, tmp_path):
    card = {"format": "qarvd-wan-card", "preset": "wan2.1-1.3b-causal", "recipe": "self-forcing"}
    card |= {"transformer": "sf.pt", "vae": "vae", "text_encoder": "text_encoder", "tokenizer": "tokenizer"}
    (tmp_path / "cards").mkdir()
    for folder, name in ((store.artifact_dir, "here"), (tmp_path / "cards", "there")):
        (folder / f"{name}.json").write_text(json.dumps(card))
        (folder / "sf.pt").write_bytes(b"x" * 10)
    (tmp_path / "cards/not-a-card.json").write_text("{}")
    named = ModelStore(store.artifact_dir, [tmp_path / "cards/there.json", tmp_path / "cards/not-a-card.json"])
    assert {"here", "there"} <= set(named.ids()) and "not-a-card" not in named.ids()
    assert "there" not in store.ids()
    r = named.record("there")
    assert (r.path, r.kind, r.size_bytes, r.base) == (tmp_path / "cards/there.json", "base", 10, None)
    with pytest.raises(DeleteRefused):
        named.delete("here")
