from dataclasses import replace

import numpy as np
import pytest
import torch

from qarvd_core.model import PRESETS, KVCache, ModelArgs, WorldModel, camera_path, rope_freqs, rope_split
from tests.conftest import MINI


def _inputs(args, B=2, chunks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = chunks * args.frames_per_chunk
    x = torch.randn(B, T, args.in_channels, args.frame_height, args.frame_width, generator=g)
    t = torch.rand(B, T, generator=g)
    acts = torch.randint(0, args.n_actions, (B, T), generator=g)
    return x, t, acts


def test_presets_build_and_describe_wan_layout():
    assert set(PRESETS) == {"tiny-world", "small-world", "wan2.1-1.3b-causal"}
    wan = ModelArgs.from_name("wan2.1-1.3b-causal")
    assert (wan.dim, wan.n_layers, wan.n_heads, wan.ffn_dim, wan.text_dim) == (1536, 30, 12, 8960, 4096)
    keys = set(WorldModel(ModelArgs.from_name("tiny-world")).state_dict())
    for k in [
        "blocks.0.self_attn.q.weight",
        "blocks.0.self_attn.norm_q.weight",
        "blocks.5.cross_attn.o.bias",
        "blocks.0.ffn.0.weight",
        "blocks.0.ffn.2.weight",
        "blocks.0.norm3.weight",
        "blocks.0.modulation",
        "time_embedding.0.weight",
        "time_embedding.2.weight",
        "time_projection.1.weight",
        "head.head.weight",
        "head.modulation",
        "patch_embedding.weight",
        "text_embedding.0.weight",
    ]:
        assert k in keys, k


def test_unknown_preset_names_choices():
    with pytest.raises(ValueError, match="tiny-world"):
        ModelArgs.from_name("huge-world")


def test_later_chunks_never_change_earlier_outputs(mini):
    x, t, acts = _inputs(mini.args)
    ctx = mini.encode_prompt(torch.tensor([0, 1]))
    with torch.no_grad():
        out = mini(x, t, acts, ctx)
        x2 = x.clone()
        x2[:, 6:] = torch.randn_like(x2[:, 6:])  # change only the last chunk
        out2 = mini(x2, t, acts, ctx)
    F = mini.args.frames_per_chunk
    torch.testing.assert_close(out[:, : 2 * F], out2[:, : 2 * F])
    assert (out[:, 2 * F :] - out2[:, 2 * F :]).abs().max() > 1e-3


@pytest.mark.parametrize("camera_rope", [False, True])
def test_cached_incremental_equals_full_recomputation(make_mini, camera_rope):
    mini = make_mini(args=replace(MINI, camera_rope=camera_rope))
    x, t, acts = _inputs(mini.args)
    ctx = mini.encode_prompt(torch.tensor([2, 3]))
    F = mini.args.frames_per_chunk
    with torch.no_grad():
        full = mini(x, t, acts, ctx)
        cache = KVCache(mini.args, 2)
        inc = [
            mini(x[:, k : k + F], t[:, k : k + F], acts[:, k : k + F], ctx, cache=cache, commit=True)
            for k in range(0, x.shape[1], F)
        ]
    torch.testing.assert_close(torch.cat(inc, 1), full, atol=1e-4, rtol=1e-4)
    if camera_rope:  # the cache followed the camera along each stream's own path
        torch.testing.assert_close(cache.camera, camera_path(acts)[:, -1])


def test_camera_rope_keeps_a_place_at_one_position_wherever_the_camera_is():
    a = replace(MINI, camera_rope=True)
    gh, gw = a.grid
    dt = rope_split(a.head_dim)[0]  # the time axis's dims: the first dt // 2 rotation pairs
    # Frame 1 is seen after "right": the camera moved one patch, so its screen column w shows
    # the world column w + 1, which frame 0 showed at screen column w + 1.
    camera = camera_path(torch.tensor([[0, 4]]))  # none, right
    f = rope_freqs(a, 0, 2, camera)[0].view(2, gh, gw, -1, 2)
    torch.testing.assert_close(f[1, :, :-1, dt // 2 :], f[0, :, 1:, dt // 2 :])
    assert not torch.allclose(f[1, :, :-1, : dt // 2], f[0, :, 1:, : dt // 2])  # later in time
    # Without camera_rope the positions are the screen's, as with a camera that never moves.
    screen = rope_freqs(a, 0, 2)
    assert screen.shape == (1, 2 * gh * gw, a.head_dim // 2, 2)
    torch.testing.assert_close(screen, rope_freqs(a, 0, 2, torch.zeros(1, 2, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match="needs actions"):
        replace(MINI, camera_rope=True, n_actions=0)


@pytest.mark.parametrize("camera_rope", [False, True])
def test_rolled_cache_keys_match_a_fresh_cache_of_the_kept_chunks(make_mini, camera_rope):
    """After rolling, kept keys are rotated back in time: layer-0 keys equal a fresh commit
    (of the kept chunks where they were seen, for a model whose positions follow the camera)."""
    mini = make_mini(args=replace(MINI, camera_rope=camera_rope))
    a = mini.args
    ctx = mini.encode_prompt(torch.tensor([0]))
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn(1, a.frames_per_chunk, 3, 64, 64, generator=g) for _ in range(6)]
    t0 = torch.zeros(1, a.frames_per_chunk)
    acts = torch.randint(0, a.n_actions, (6, 1, a.frames_per_chunk), generator=g)
    camera = camera_path(acts.view(1, -1)).view(6, 1, a.frames_per_chunk, 2)
    rolled, fresh = KVCache(a, 1), KVCache(a, 1)
    with torch.no_grad():
        for c, act in zip(chunks, acts):
            mini(c, t0, act, ctx, cache=rolled, commit=True)
        kept = list(range(a.sink_chunks)) + list(range(6 - a.window_chunks, 6))
        for k in kept:
            mini(chunks[k], t0, acts[k], ctx, cache=fresh, commit=True, camera=camera[k])
    assert rolled.n_chunks == fresh.n_chunks == a.sink_chunks + a.window_chunks
    assert rolled.committed == 6
    torch.testing.assert_close(rolled.view(0)[0], fresh.view(0)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rolled.view(0)[1], fresh.view(0)[1])


@pytest.mark.parametrize("camera_rope", [False, True])
def test_rolling_cache_memory_and_positions_stay_bounded(make_mini, camera_rope):
    """Thousands of frames (an hour at 1 fps per chunk) on a tiny config: nothing grows but the
    camera's world position, whose rotations stay exact however far it walks."""
    args = ModelArgs(
        dim=16,
        n_layers=1,
        n_heads=1,
        ffn_dim=32,
        text_dim=8,
        frame_height=16,
        frame_width=16,
        window_chunks=2,
        sink_chunks=1,
        camera_rope=camera_rope,
    )
    model = make_mini(args=args)
    cache, far = KVCache(args, 1), KVCache(args, 1)
    far.camera += torch.tensor([10**6, -(10**6)])  # the same walk, a million patches away
    ctx = model.encode_prompt(torch.tensor([0]))
    x = torch.randn(1, 3, 3, 16, 16)
    t0, acts = torch.zeros(1, 3), torch.full((1, 3), 4)  # "right" all the way
    sizes, offsets = set(), set()
    with torch.no_grad():
        for _ in range(1200):  # 3600 frames
            out = model(x, t0, acts, ctx, cache=cache, commit=True)
            out_far = model(x, t0, acts, ctx, cache=far, commit=True)
            sizes.add((cache.k.numel(), cache.length))
            offsets.add(cache.time_offset)
    assert cache.committed == 1200
    assert len(sizes) <= 3 and max(offsets) == (args.sink_chunks + args.window_chunks) * 3
    assert torch.isfinite(out).all()
    assert cache.camera.tolist() == [[3600 * camera_rope, 0]]
    torch.testing.assert_close(out_far, out, atol=1e-4, rtol=1e-4)  # only relative positions count


def test_cached_generation_takes_one_chunk(mini):
    x, t, acts = _inputs(mini.args, chunks=2)
    with pytest.raises(ValueError, match="one chunk"):
        mini(x, t, acts, mini.encode_prompt(torch.tensor([0, 0])), cache=KVCache(mini.args, 2))
    with pytest.raises(ValueError, match="multiple of frames_per_chunk"):
        mini(x[:, :4], t[:, :4], acts[:, :4], mini.encode_prompt(torch.tensor([0, 0])))


def test_compiled_blocks_stream_like_eager(mini):
    import copy

    from qarvd_core.sampling import Stream

    cap = torch._dynamo.config.accumulated_recompile_limit
    compiled = copy.deepcopy(mini).compile_blocks()
    # Each compiled model widens the process-wide cache cap: a server's tenth model still compiles.
    assert torch._dynamo.config.accumulated_recompile_limit >= cap + 64
    a, b = Stream(mini, "snow", seed=2), Stream(compiled, "snow", seed=2)
    for act in ("left", "up", "none", "right", "down"):  # every cache length, then a roll
        x, y = a.step(act), b.step(act)
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
