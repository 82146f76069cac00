import numpy as np

from qarvd_core.eval import metrics
from qarvd_core.world import BIOME_NAMES, rollout, scenarios


def test_psnr_and_ssim_of_identical_and_noisy_frames():
    f = rollout("desert", 4, ["right"] * 4)["frames"]
    assert (metrics.psnr(f, f) == 100).all()
    np.testing.assert_allclose(metrics.ssim(f, f), 1.0)
    noisy = np.clip(f.astype(int) + np.random.default_rng(0).normal(0, 8, f.shape), 0, 255).astype(np.uint8)
    p = metrics.psnr(f, noisy)
    assert (29 < p).all() and (p < 32).all()  # sigma 8 -> about 30 dB
    assert (metrics.ssim(f, noisy) < 0.95).all()


def test_camera_action_recovers_the_simulators_motion():
    hits = [
        metrics.action_hits(r["frames"], list(sc.actions))
        for sc in scenarios("heldout", 8, 30)
        for r in [rollout(sc.biome, sc.world_seed, list(sc.actions))]
    ]
    assert np.concatenate(hits).mean() >= 0.97


def test_random_frames_score_near_chance():
    rng = np.random.default_rng(0)
    frames = (rng.random((80, 64, 64, 3)) * 255).astype(np.uint8)
    acts = list(rng.choice(["none", "up", "down", "left", "right"], 80))
    assert metrics.action_hits(frames, acts).mean() < 0.4


def test_palette_and_sharpness_tell_blur_from_the_world():
    for b in BIOME_NAMES:
        f = rollout(b, 2, ["left"] * 3)["frames"]
        assert metrics.palette_error(f, b).max() == 0
        blurred = ((f[:, :-1, :-1].astype(int) + f[:, 1:, 1:]) // 2).astype(np.uint8)
        assert (metrics.sharpness(blurred) < metrics.sharpness(f[:, :-1, :-1])).all()
        assert (metrics.palette_error(blurred, b) > 0).all()
