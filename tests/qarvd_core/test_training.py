import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from qarvd_core.checkpoint import load_model
from qarvd_core.model import ModelArgs
from qarvd_core.training import TrainConfig, make_batch, make_clip, train
from qarvd_core.world.simulator import ACTION_MOTION

ARGS = ModelArgs(dim=32, n_layers=1, n_heads=2, ffn_dim=64, text_dim=16, window_chunks=1, sink_chunks=1)


def test_clips_span_the_attention_window_and_come_from_training_worlds():
    rng = np.random.default_rng(0)
    frames, actions, biome, camera = make_clip(rng, ARGS, sink_gap_prob=1.0)
    assert frames.shape == (ARGS.context_chunks * 3, 64, 64, 3) and len(actions) == len(frames)
    # The camera path follows the clip's actions frame by frame, except across the sink gap.
    step = np.diff(camera, axis=0)
    motion = np.array([ACTION_MOTION[a] for a in actions])
    np.testing.assert_array_equal(step[:2], motion[1:3])
    np.testing.assert_array_equal(step[3:], motion[4:])
    x0, acts, prompts, t, camera = make_batch(rng, ARGS, TrainConfig(batch=3))
    assert x0.shape == (3, 9, 3, 64, 64) and -1 <= x0.min() and x0.max() <= 1
    assert t.shape == (3, 9) and (t[:, 0] == t[:, 2]).all()  # one flow time per chunk
    assert camera.shape == (3, 9, 2)


def test_train_checkpoints_resumes_and_exports_loadable_weights(tmp_path):
    cfg = TrainConfig(steps=2, batch=2, checkpoint_every=1, compile=False, bf16=False, warmup=1)
    train(cfg, tmp_path, args=ARGS, log=lambda *_: None)
    logs = []
    train(TrainConfig(**{**cfg.__dict__, "steps": 4}), tmp_path, args=ARGS, log=logs.append)
    assert logs == ["resumed at step 2"]
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and all(np.isfinite(x["loss"]) for x in lines)
    manifest = json.loads((tmp_path / "model.json").read_text())
    assert manifest["train_steps"] == 4 and manifest["command"].startswith("qarvd train")
    model = load_model(str(tmp_path / "model.safetensors"))
    assert model.args == ARGS and all(torch.isfinite(p).all() for p in model.parameters())


def test_stop_after_ends_early_and_the_manifest_says_so(tmp_path):
    cfg = TrainConfig(steps=10, stop_after=2, batch=2, compile=False, bf16=False, warmup=1)
    train(cfg, tmp_path, args=ARGS, log=lambda *_: None)
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 2
    manifest = json.loads((tmp_path / "model.json").read_text())
    assert (
        manifest["train_steps"] == 2 and "--steps 10" in manifest["command"] and "--stop-after 2" in manifest["command"]
    )


def test_a_resumed_run_matches_an_uninterrupted_one(tmp_path):
    cfg = TrainConfig(steps=4, batch=2, checkpoint_every=1, compile=False, bf16=False, warmup=1)
    train(cfg, tmp_path / "whole", args=ARGS, log=lambda *_: None)
    train(TrainConfig(**{**cfg.__dict__, "stop_after": 2}), tmp_path / "split", args=ARGS, log=lambda *_: None)
    train(cfg, tmp_path / "split", args=ARGS, log=lambda *_: None)

    def log(run):
        return [json.loads(x) for x in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]

    whole, split = log("whole"), log("split")
    assert [x["lr"] for x in split] == [x["lr"] for x in whole]
    assert [x["loss"] for x in split] == pytest.approx([x["loss"] for x in whole], rel=1e-4)


def test_init_from_starts_at_given_weights_and_records_them(tmp_path):
    base = TrainConfig(steps=2, batch=2, compile=False, bf16=False, warmup=1)
    start = train(base, tmp_path / "base", args=ARGS, log=lambda *_: None)
    tune = TrainConfig(steps=1, batch=2, compile=False, bf16=False, warmup=1, lr=0.0, init_from=str(start))
    # The fine-tune may switch the positions to follow the camera: that has no parameters.
    out = train(tune, tmp_path / "tune", args=replace(ARGS, camera_rope=True), log=lambda *_: None)
    a, b = load_model(str(start)), load_model(str(out))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert b.args.camera_rope and not a.args.camera_rope
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["init_from"]["sha256"] == json.loads(start.with_suffix(".json").read_text())["sha256"]
    assert f"--init-from {start}" in manifest["command"]
    with pytest.raises(ValueError, match="not ModelArgs"):
        train(tune, tmp_path / "wider", args=replace(ARGS, ffn_dim=128), log=lambda *_: None)


def test_clips_follow_the_configured_policies():
    with pytest.raises(ValueError, match="policies"):
        TrainConfig(policies=("zigzag",))
    rng = np.random.default_rng(0)
    _, actions, _, _ = make_clip(rng, ARGS, sink_gap_prob=0.0, policies=("patrol",))
    assert set(actions) <= {"left", "right"} or set(actions) <= {"up", "down"}
