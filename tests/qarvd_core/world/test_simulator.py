import numpy as np
import pytest

from qarvd_core.world import ACTIONS, BIOME_NAMES, TILE, World, rollout


def test_at_least_four_biomes_with_distinct_palettes():
    assert len(BIOME_NAMES) >= 4
    firsts = [World(b, 1).render() for b in BIOME_NAMES]
    means = {tuple(f.reshape(-1, 3).mean(0).round()) for f in firsts}
    assert len(means) == len(BIOME_NAMES)


def test_same_seed_same_frames_other_seed_other_frames():
    acts = ["right", "down", "none", "left", "up"] * 4
    a, b = rollout("forest", 11, acts), rollout("forest", 11, acts)
    c = rollout("forest", 12, acts)
    np.testing.assert_array_equal(a["frames"], b["frames"])
    assert not np.array_equal(a["frames"], c["frames"])


def test_camera_moves_one_tile_per_frame_as_commanded():
    r = rollout("islands", 3, ["right", "right", "down", "none", "left", "up"])
    assert r["frames"].shape == (6, 64, 64, 3) and r["frames"].dtype == np.uint8
    assert r["offsets"].tolist() == [[8, 0], [8, 0], [0, 8], [0, 0], [-8, 0], [0, -8]]
    f = r["frames"]
    # Content scrolls left by one tile when the camera moves right (agent square excluded).
    assert (f[1][:48, : 64 - TILE] == f[0][:48, TILE:]).mean() > 0.9


def test_entities_move_over_time():
    w = World("snow", 5)
    start = w.entities.copy()
    for _ in range(10):
        w.step("none")
    assert (w.entities != start).any()


def test_bad_biome_and_action_are_refused():
    with pytest.raises(ValueError, match="unknown biome"):
        World("moon", 0)
    with pytest.raises(ValueError, match="unknown action"):
        World("snow", 0).step("jump")
    assert ACTIONS[0] == "none"
