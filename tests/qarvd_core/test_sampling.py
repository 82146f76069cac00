from dataclasses import replace

import numpy as np
import pytest
import torch

from qarvd_core.sampling import ScriptRender, Stream, flow_schedule, rollout, to_uint8
from tests.conftest import MINI


def test_schedule_is_shifted_and_decreasing():
    s = flow_schedule(4, 1.5)
    assert len(s) == 4 and s[0] == 1.0 and all(a > b for a, b in zip(s, s[1:])) and s[-1] > 0
    assert s[2] > 0.5  # the shift spends more steps at high noise than a linear schedule
    with pytest.raises(ValueError):
        flow_schedule(0)


def test_stream_is_deterministic_given_a_seed(mini):
    a = [Stream(mini, "islands", seed=5).step(act) for act in ("left", "up")]
    b = [Stream(mini, "islands", seed=5).step(act) for act in ("left", "up")]
    s1 = Stream(mini, "islands", seed=5)
    c = [s1.step("left"), s1.step("up")]
    s2 = Stream(mini, "islands", seed=6)
    d = [s2.step("left"), s2.step("up")]
    np.testing.assert_array_equal(c[0], Stream(mini, "islands", seed=5).step("left"))
    assert not np.array_equal(c[1], d[1])
    assert a[0].shape == (mini.args.frames_per_chunk, 64, 64, 3) and a[0].dtype == np.uint8
    np.testing.assert_array_equal(np.stack(a), np.stack(b))


def test_batched_rollout_matches_single_streams(mini):
    actions = [["right"] * 6, ["down"] * 3 + ["none"] * 3]
    batch = to_uint8(rollout(mini, ["islands", "snow"], actions, [1, 2]))
    for b, (prompt, seed) in enumerate([("islands", 1), ("snow", 2)]):
        s = Stream(mini, prompt, seed)
        single = np.concatenate([s.step(actions[b][k : k + 3]) for k in (0, 3)])
        assert np.abs(batch[b].astype(int) - single.astype(int)).max() <= 1


@pytest.mark.parametrize("camera_rope", [False, True])
def test_prompt_switch_recaches_held_context(make_mini, camera_rope):
    mini = make_mini(args=replace(MINI, camera_rope=camera_rope))
    s = Stream(mini, "islands", seed=3)
    for act in ("right", "up", "left", "down"):
        s.step(act)
    before, camera = s.cache.view(1)[0].clone(), s.cache.camera.clone()
    s.set_prompt("desert")
    assert torch.equal(s.cache.camera, camera)
    # The held chunks re-committed from scratch under the new prompt: the same cache.
    fresh = Stream(mini, "desert", seed=3)
    for chunk in s.held:
        mini(chunk.frames, torch.zeros(1, 3), chunk.actions, fresh.context, fresh.cache, True, chunk.camera)
    assert s.cache.n_chunks == fresh.cache.n_chunks == len(s.held) == 3
    torch.testing.assert_close(s.cache.view(1)[0], fresh.cache.view(1)[0])
    assert (s.cache.view(1)[0] - before).abs().max() > 1e-4  # the prompt reaches the cache
    assert s.step("right").shape == (3, 64, 64, 3)
    if camera_rope:  # right, up, left, down, right, each held for a 3-frame chunk: 3 patches right
        assert s.cache.camera.tolist() == [[3, 0]]


def test_stream_rejects_bad_input(mini):
    with pytest.raises(ValueError, match="biome"):
        Stream(mini, "moon", 0)
    s = Stream(mini, "forest", 0)
    with pytest.raises(ValueError, match="unknown action"):
        s.step("jump")
    with pytest.raises(ValueError, match="exactly 3"):
        s.step(["left", "right"])


@pytest.mark.parametrize("camera_rope", [False, True])
def test_batched_step_equals_separate_streams(make_mini, camera_rope):
    from qarvd_core.sampling import step_streams

    mini = make_mini(args=replace(MINI, camera_rope=camera_rope))
    a = [Stream(mini, p, seed) for p, seed in (("islands", 1), ("snow", 2), ("forest", 3))]
    b = [Stream(mini, p, seed) for p, seed in (("islands", 1), ("snow", 2), ("forest", 3))]
    for step in range(5):  # past the window, so the caches roll
        acts = [["right", "up", "none"][(step + i) % 3] for i in range(3)]
        batched = step_streams(a, acts)
        single = [s.step(act) for s, act in zip(b, acts)]
        for x, y in zip(batched, single):
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    assert [s.cache.committed for s in a] == [5, 5, 5] and a[0].cache.n_chunks == b[0].cache.n_chunks
    for x, y in zip(a, b):  # each stream's camera went its own way
        assert torch.equal(x.cache.camera, y.cache.camera) and torch.equal(x.held[-1].camera, y.held[-1].camera)
    with pytest.raises(ValueError, match="cache length"):
        step_streams([a[0], Stream(mini, "islands", 0)], ["none", "none"])


def test_action_guidance_moves_only_moving_frames(mini):
    def chunk(action, guidance):
        return Stream(mini, "islands", seed=4, action_guidance=guidance).step(action)

    # Under "none" the guided and the unguided pass see the same input: no change at all.
    np.testing.assert_array_equal(chunk("none", 0.0), chunk("none", 2.0))
    assert not np.array_equal(chunk("left", 0.0), chunk("left", 2.0))
    guided = to_uint8(rollout(mini, ["islands"], [["left"] * 3], [4], action_guidance=2.0))[0]
    np.testing.assert_array_equal(guided, chunk("left", 2.0))


def test_the_shipped_model_follows_actions_and_recalls_revisited_places():
    from qarvd_core.checkpoint import load_model
    from qarvd_core.eval.evaluate import EvalConfig, evaluate

    # 4 calibration worlds (all three policies) of 24 frames (8 chunks: the window rolls) with the
    # sampler's defaults measure 1.000, and 21 revisits 31.9 dB against 14.9 dB for other places
    # (30.3 against 14.2 at 48 frames): the bounds leave room for thread-count differences.
    cfg = EvalConfig(scenarios=4, frames=24, drift_frames=0, split="calibration")
    r = evaluate(load_model("tiny-world"), None, cfg)
    assert r["action_accuracy"] >= 0.97, r["action_accuracy"]
    assert r["revisit_psnr_db"] >= r["revisit_other_places_psnr_db"] + 10, r


def test_fork_continues_bit_for_bit_while_the_camera_moves(make_mini):
    mini = make_mini(args=replace(MINI, camera_rope=True))
    s = Stream(mini, "islands", seed=3)
    for act in ("right", "right", "down", "right", "up"):  # past the window: the cache has rolled
        s.step(act)
    s.set_prompt("snow")
    twin = s.fork()
    assert twin.cache is not s.cache and twin.generator is not s.generator
    for act in ("right", "right", "left"):
        np.testing.assert_array_equal(twin.step(act), s.step(act))
    assert torch.equal(twin.cache.camera, s.cache.camera) and twin.cache.committed == s.cache.committed
    twin.step("right")  # the copies are independent
    assert twin.cache.committed == s.cache.committed + 1 and not torch.equal(twin.cache.camera, s.cache.camera)
    # Another model object with the same weights (an FP base shadowing a quantized stream, here
    # lossless) draws the same chunk: the cache, camera, noise and prompt all carry over.
    shadow = s.fork(make_mini(args=replace(MINI, camera_rope=True)))
    np.testing.assert_array_equal(shadow.step("right"), s.step("right"))


def test_a_snapshot_does_not_move_with_its_stream(mini):
    s = Stream(mini, "forest", seed=1)
    s.step("left")
    state = s.snapshot()
    k, camera = state.cache.k.clone(), state.cache.camera.clone()
    s.step("down")
    assert torch.equal(state.cache.k, k) and torch.equal(state.cache.camera, camera)
    assert state.cache.committed == 1 and len(state.held) == 1 and state.prompt == "forest"


def test_a_script_render_pads_the_last_chunk_and_trims_its_frames(mini):
    r = ScriptRender(["left"] * 4 + ["up"], 3)
    assert r.chunks == [["left"] * 3, ["left", "up", "up"]]
    assert ScriptRender(["none"] * 3, 3).chunks == [["none"] * 3]
    with pytest.raises(ValueError, match="at least one"):
        ScriptRender([], 3)
    script = ["right"] * (MINI.frames_per_chunk + 1)
    r, s = ScriptRender(script, MINI.frames_per_chunk), Stream(mini, "forest", seed=4)
    while not r.done:
        r.add(s.step(r.next_actions()))
    same = Stream(mini, "forest", seed=4)
    whole = np.concatenate([same.step("right"), same.step("right")])
    np.testing.assert_array_equal(r.video(), whole[: len(script)])


def _assert_batch_buffers_kept(model, streams, twin, refs, step_refs) -> None:
    """Five chunks past the window roll: `streams` of `model` through step_streams write into the
    same buffers every chunk and make the frames that `step_refs(refs, actions)` makes with `refs`,
    the same streams on `twin` (the same weights) with freshly allocated buffers each chunk."""
    from qarvd_core.sampling import batch_buffers, release_batch_buffers, step_streams

    n, seen, chunk_buffers = len(streams), [], []
    # The address of the key buffer each block writes into, pass by pass.
    hooks = [b.register_forward_pre_hook(lambda _m, args: seen.append(args[5][0].data_ptr())) for b in model.blocks]
    for step in range(5):
        acts = [["right", "up", "none"][(step + i) % 3] for i in range(n)] if model.args.n_actions else [None] * n
        got = step_streams(streams, acts)
        chunk_buffers.append(tuple(seen))
        seen.clear()
        release_batch_buffers(twin)
        for x, y in zip(got, step_refs(refs, acts), strict=True):
            np.testing.assert_array_equal(x, y)
    for h in hooks:
        h.remove()
    assert chunk_buffers[0][0] == batch_buffers(model, n)[0].data_ptr()  # the blocks wrote into them
    assert len(set(chunk_buffers)) == 1  # ... the same ones every chunk: allocated once
    assert streams[0].cache.committed == 5 and streams[0].cache.n_chunks < 5  # the window rolled


@pytest.mark.parametrize("kv_bits", [None, (8, 4)])
@pytest.mark.parametrize("n", [1, 3])
def test_step_streams_keeps_its_batch_buffers_and_frames_exact(make_mini, kv_bits, n):
    """The batched KV buffers are allocated once per model and batch size and reused: frames stay
    byte for byte those of fresh buffers (one stream: of `Stream.step`), quantized caches too."""
    from qarvd_core.quant.kv import KVQuantConfig
    from qarvd_core.sampling import step_streams

    mini, twin = (make_mini(args=replace(MINI, camera_rope=True)) for _ in range(2))
    for m in (mini, twin):
        m.kv_quant = None if kv_bits is None else KVQuantConfig(*kv_bits)
    prompts = ["islands", "snow", "forest"][:n]
    streams = [Stream(mini, p, seed) for seed, p in enumerate(prompts)]
    refs = [Stream(twin, p, seed) for seed, p in enumerate(prompts)]

    def step_refs(refs, acts):
        return [s.step(a) for s, a in zip(refs, acts)] if n == 1 else step_streams(refs, acts)

    _assert_batch_buffers_kept(mini, streams, twin, refs, step_refs)


def test_compiled_blocks_write_only_static_buffers_and_compile_once(mini):
    """What inductor's CUDA graphs need, checked where no GPU is: every input a compiled block
    writes in place is a static address (else inductor skips the graph), and chunks after the
    first compile nothing new (no per-chunk Python scalar, shape or buffer in the guards). The
    same metadata inductor reads (AOT autograd's), through an AOT backend that runs the graph eagerly."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters
    from torch._guards import TracingContext

    from qarvd_core.sampling import step_streams

    unsafe = []

    def check(gm, _inputs):
        meta = TracingContext.get().fw_metadata
        written = {i for i, info in enumerate(meta.input_info) if info.mutates_data}
        unsafe.append(written - set(meta.static_input_indices))
        return gm

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=check)
    for block in mini.blocks:  # as WorldModel.compile_blocks wires them, on this backend
        block._compiled_call_impl = torch.compile(block._call_impl, backend=backend, dynamic=False)
    pair, solo = [Stream(mini, p, i) for i, p in enumerate(["islands", "snow"])], [Stream(mini, "forest", 2)]
    step_streams(pair, ["left", "up"])  # every batch size once, as a server warms a model up
    step_streams(solo, ["left"])
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(4):  # past the window roll
        step_streams(pair, ["right", "none"])
        step_streams(solo, ["up"])
    assert counters["stats"]["unique_graphs"] == graphs and solo[0].cache.n_chunks < solo[0].cache.committed
    assert unsafe and not any(unsafe)


@pytest.mark.cuda
def test_on_cuda_compiled_chunks_replay_as_cuda_graphs_with_the_frames_of_eager(make_mini):
    """Inductor's CUDA graphs, as the server turns them on: none skipped, frames as eager's."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    from qarvd_core.sampling import step_streams

    eager = make_mini().cuda()
    compiled = make_mini().cuda()
    with inductor_config.patch({"triton.cudagraphs": True}):
        compiled.compile_blocks()
        skips = counters["inductor"]["cudagraph_skips"]
        for n in (1, 2):  # past the window roll at both batch sizes
            a = [Stream(compiled, "islands", i) for i in range(n)]
            b = [Stream(eager, "islands", i) for i in range(n)]
            for step in range(5):
                acts = [["right", "up"][(step + i) % 2] for i in range(n)]
                for x, y in zip(step_streams(a, acts), step_streams(b, acts), strict=True):
                    assert np.abs(x.astype(int) - y.astype(int)).mean() < 0.5  # fused float rounding only
        assert counters["inductor"]["cudagraph_skips"] == skips
