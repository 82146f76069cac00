"""Streaming a Wan model card: Self-Forcing's sampler, UMT5 prompts, and latent chunks decoded
to frames as they come, on a tiny random card of the real layout (tests/support/wan_card.py).

References are independent of the code under test: Self-Forcing's inference loop written here
from its equations, diffusers' own prompt encoding, and diffusers' one-shot VAE decode.
"""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from qarvd_core.checkpoint import load_model  # noqa: E402
from qarvd_core.cli import app  # noqa: E402
from qarvd_core.model import KVCache  # noqa: E402
from qarvd_core.sampling import (  # noqa: E402
    ActionNotSupported,
    Sampler,
    Stream,
    flow_schedule,
    flowmatch_schedule,
    rollout,
    step_streams,
    to_uint8,
)
from qarvd_core.video import read_mp4  # noqa: E402
from qarvd_core.wan_text import TextEncoder  # noqa: E402
from qarvd_core.wan_vae import load_vae  # noqa: E402
from tests.support.wan_card import write_wan_card  # noqa: E402

PROMPT = "a red cat walks on the beach"


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    return write_wan_card(tmp_path_factory.mktemp("wan"))


@pytest.fixture(scope="module")
def wan(card):
    return load_model(str(card))


def _chunks(model, n: int) -> list[list[str]]:
    return [["none"] * (n * model.args.frames_per_chunk)]


# ----------------------------------------------------------------------------- sampler


def _self_forcing_rollout(model, text, seed: int, chunks: int) -> torch.Tensor:
    """Self-Forcing's inference loop (pipeline/causal_inference.py) from its equations: the
    FlowMatchScheduler (shift 5, sigma_min 0, extra_one_step) over 1000 steps, the step list
    [1000, 750, 500, 250] warped through its timesteps, x0 at each step, then add_noise with
    fresh noise to the next step's sigma, (1 - s') x0 + s' eps; the clean chunk re-run at t=0
    into the cache. Noise is drawn from one generator: a chunk's start, then each re-noise."""
    shift = 5.0
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * 1000
    steps = torch.cat([timesteps, torch.zeros(1)])[1000 - torch.tensor([1000, 750, 500, 250])]

    def sigma_of(timestep):  # the scheduler's lookup
        return sigmas[torch.argmin((timesteps - timestep).abs())]

    a = model.args
    g = torch.Generator().manual_seed(seed)
    shape = (1, a.frames_per_chunk, a.in_channels, a.frame_height, a.frame_width)
    cache, context = KVCache(a, 1), model.embed_text(text)
    out = []
    with torch.no_grad():
        for _ in range(chunks):
            x = torch.randn(shape, generator=g)
            for i, timestep in enumerate(steps):
                x0 = model(x, sigma_of(timestep).expand(1, a.frames_per_chunk), None, context, cache=cache)
                if i + 1 < len(steps):
                    s = sigma_of(steps[i + 1])
                    x = ((1 - s) * x0 + s * torch.randn(shape, generator=g)).type_as(x0)
            model(x0, torch.zeros(1, a.frames_per_chunk), None, context, cache=cache, commit=True)
            out.append(x0)
    return torch.cat(out, 1)


def test_self_forcing_sampler_re_noises_with_fresh_noise_from_the_stream(wan):
    assert Sampler.for_model(wan) == Sampler(tuple(flowmatch_schedule([1000, 750, 500, 250], 5.0)), True)
    expected = _self_forcing_rollout(wan, wan.parts.text([PROMPT]), seed=7, chunks=2)
    assert torch.equal(rollout(wan, [PROMPT], _chunks(wan, 2), [7]), expected)
    s = Stream(wan, PROMPT, 7)
    for _ in range(2):
        s.step()
    assert torch.equal(torch.cat([h.frames for h in s.held], 1), expected)
    ddim = Stream(wan, PROMPT, 7)
    ddim.sampler = replace(ddim.sampler, fresh_noise=False)
    for _ in range(2):
        ddim.step()
    assert (torch.cat([h.frames for h in ddim.held], 1) - expected).abs().mean() > 0.1  # the rule matters


def test_the_default_sampler_is_the_deterministic_ddim_step(make_mini):
    """Pixel-space presets keep x moving along the noise it implies, eps = (x - (1 - t) x0) / t."""
    mini = make_mini()
    sampler = Sampler.for_model(mini)
    assert sampler == Sampler(tuple(flow_schedule(4, 1.5)), False)
    a = mini.args
    g = torch.Generator().manual_seed(3)
    cache, context = KVCache(a, 1), mini.encode_prompt(torch.tensor([0]))
    actions = torch.zeros(1, a.frames_per_chunk, dtype=torch.long)  # "none"
    expected = []
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(1, a.frames_per_chunk, a.in_channels, a.frame_height, a.frame_width, generator=g)
            times = [*sampler.schedule, 0.0]
            for t, t_next in zip(times, times[1:]):
                x0 = mini(x, torch.full((1, a.frames_per_chunk), t), actions, context, cache=cache).clamp(-1, 1)
                x = (1 - t_next) * x0 + t_next * ((x - (1 - t) * x0) / t)
            mini(x0, torch.zeros(1, a.frames_per_chunk), actions, context, cache=cache, commit=True)
            expected.append(x0)
    from qarvd_core.world.simulator import BIOME_NAMES

    got = rollout(mini, [BIOME_NAMES[0]], [["none"] * 2 * a.frames_per_chunk], [3])
    assert torch.equal(got, torch.cat(expected, 1))


# ----------------------------------------------------------------------------- streams


def test_a_wan_stream_yields_decoded_frames_as_one_shot_decode_would(wan, card):
    s = Stream(wan, PROMPT, 2)
    frames = [s.step() for _ in range(3)]
    assert [f.shape for f in frames] == [(9, 32, 48, 3), (12, 32, 48, 3), (12, 32, 48, 3)]
    assert all(f.dtype == np.uint8 for f in frames)
    latents = rollout(wan, [PROMPT], _chunks(wan, 3), [2])
    vae = load_vae(card.parent / "Wan2.1-T2V-1.3B-Diffusers/vae")
    shape = (1, -1, 1, 1, 1)
    raw = latents.transpose(1, 2) * torch.tensor(vae.config.latents_std).view(shape)
    raw = raw + torch.tensor(vae.config.latents_mean).view(shape)
    with torch.no_grad():
        one_shot = vae.decode(raw).sample.clamp(-1, 1).transpose(1, 2)
    np.testing.assert_array_equal(np.concatenate(frames), to_uint8(one_shot[0]))
    assert 20 < np.concatenate(frames).std()  # a picture, not a flat or saturated one


def test_fork_copies_the_decoder_cache_and_steps_exactly_like_the_stream(wan):
    s = Stream(wan, PROMPT, 4)
    s.step()
    f = s.fork()
    twin = [f.step() for _ in range(4)]  # the fork goes first: sharing state would show in s
    ours = [s.step() for _ in range(4)]  # past the window, so the caches roll
    for x, y in zip(twin, ours):
        np.testing.assert_array_equal(x, y)
    s.reset()
    np.testing.assert_array_equal(s.step(), Stream(wan, PROMPT, 4).step())  # reset restarts the video


def test_batched_wan_streams_equal_separate_ones(wan):
    prompts = [(PROMPT, 1), ("a dog runs in the snow at night", 2)]
    a = [Stream(wan, p, seed) for p, seed in prompts]
    b = [Stream(wan, p, seed) for p, seed in prompts]
    for _ in range(2):
        for x, y in zip(step_streams(a, [None, None]), [s.step() for s in b]):
            assert x.shape == y.shape and np.abs(x.astype(int) - y.astype(int)).max() <= 1
    with pytest.raises(ActionNotSupported):
        step_streams(a, ["left", None])


def test_a_prompt_switch_re_encodes_and_re_caches(wan):
    calls = []
    s = Stream(wan, PROMPT, 5)
    s.step()
    s.step()
    hook = wan.parts.text._encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        s.set_prompt("blue city at night")  # a prompt no other test uses
        s.set_prompt(PROMPT)
        s.set_prompt("blue city at night")
    finally:
        hook.remove()
    assert len(calls) == 1  # each prompt is encoded once, whatever the switches
    s.step()
    kept = Stream(wan, PROMPT, 5)
    for _ in range(3):
        kept.step()
    assert (s.held[-1].frames - kept.held[-1].frames).abs().mean() > 0.05  # the new prompt shows
    # The held chunks were re-run under the new prompt: a fresh cache built from them agrees.
    again = Stream(wan, "blue city at night", 5)
    with torch.no_grad():
        for chunk in s.held:
            t0 = torch.zeros(chunk.actions.shape)
            wan(chunk.frames, t0, chunk.actions, again.context, again.cache, commit=True)
    assert torch.equal(again.cache.k[:, :, :, : again.cache.length], s.cache.k[:, :, :, : s.cache.length])


@pytest.fixture(scope="module")
def longlive(tmp_path_factory):
    return load_model(str(write_wan_card(tmp_path_factory.mktemp("longlive"), sampling="longlive")))


def _chunk_keys(cache: KVCache, slot: int) -> torch.Tensor:
    ct = cache.args.chunk_tokens
    return cache.k[:, :, :, slot * ct : (slot + 1) * ct].clone()


def test_a_longlive_stream_runs_past_its_window_with_absolute_time_positions(longlive):
    """LongLive's cache (causal_model.py): 12 latent frames, the first 3 a sink; keys roped at their
    absolute frame and never moved in time; a 3-frame chunk attends to the sink and the 9 newest
    frames, its own included."""
    s = Stream(longlive, PROMPT, 3)
    shape = s.cache.k.shape
    committed = []
    for k in range(6):
        s.step()
        assert s.cache.n_chunks == min(k + 1, 3) and s.cache.time_offset == 3 * (k + 1)
        assert torch.isfinite(s.held[-1].frames).all() and s.held[-1].frames.abs().mean() > 0.1
        committed.append(_chunk_keys(s.cache, s.cache.n_chunks - 1))
    assert s.cache.k.shape == shape  # bounded: sink, 2 window chunks and the slot
    assert [h.index for h in s.held] == [0, 4, 5]
    for slot, k in enumerate((0, 4, 5)):  # rolled keys moved as they were made, not rotated back
        assert torch.equal(_chunk_keys(s.cache, slot), committed[k])


def _recommitted(model, held, contexts) -> KVCache:
    """A cache holding `held` committed one by one at their own chunk numbers, each under its context."""
    cache = KVCache(model.args, 1)
    with torch.no_grad():
        for chunk, context in zip(held, contexts):
            cache.committed = chunk.index
            model(chunk.frames, torch.zeros(chunk.actions.shape), chunk.actions, context, cache, commit=True)
    return cache


@pytest.mark.parametrize("made", [6, 2])
def test_a_longlive_prompt_switch_re_caches_the_window_and_keeps_the_global_sink(longlive, made):
    """LongLive's `_recache_after_switch` with global_sink: the last local_attn_size (12) frames
    are re-run under the new prompt at their own positions; the sink slots are left as they were
    unless the re-cache starts at frame 0 (a stream of 4 chunks or fewer), when they are re-run too."""
    city = "blue city at night"
    s = Stream(longlive, PROMPT, 5)
    for _ in range(made):
        s.step()
    old = s.context
    s.set_prompt(city)
    assert s.cache.committed == made and s.cache.time_offset == 3 * made
    keep = made > longlive.args.context_chunks
    contexts = [old if keep and i == 0 else s.context for i in range(len(s.held))]
    expected = _recommitted(longlive, s.held, contexts)
    n = s.cache.length
    assert torch.equal(s.cache.k[:, :, :, :n], expected.k[:, :, :, :n])
    assert torch.equal(s.cache.v[:, :, :, :n], expected.v[:, :, :, :n])
    stayed = _recommitted(longlive, s.held, [old] * len(s.held))
    sink_same = torch.equal(_chunk_keys(s.cache, 0), _chunk_keys(stayed, 0))
    assert sink_same == keep and not torch.equal(_chunk_keys(s.cache, 1), _chunk_keys(stayed, 1))
    assert torch.isfinite(torch.from_numpy(s.step().astype(np.float32))).all()


def test_batched_absolute_time_streams_must_share_their_time_position(longlive):
    a, b = Stream(longlive, PROMPT, 1), Stream(longlive, PROMPT, 2)
    for _ in range(4):
        a.step()
    for _ in range(3):
        b.step()
    assert a.cache.n_chunks == b.cache.n_chunks == 3  # same cache length, other positions
    with pytest.raises(ValueError, match="time position"):
        step_streams([a, b], [None, None])


def test_an_action_to_a_model_without_actions_is_refused_clearly(wan, mini):
    s = Stream(wan, PROMPT, 0)
    twin = s.fork()
    for action in ("left", ["none"] * 3):
        with pytest.raises(ActionNotSupported, match="takes no actions"):
            s.step(action)
    np.testing.assert_array_equal(s.step(), twin.step())  # the refusal changed nothing
    assert issubclass(ActionNotSupported, ValueError)
    with pytest.raises(ValueError, match="steered by actions"):
        Stream(mini, "islands", 0).step()


# ----------------------------------------------------------------------------- text


def test_prompts_are_encoded_as_diffusers_wan_pipeline_encodes_them(card):
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = card.parent / "Wan2.1-T2V-1.3B-Diffusers"
    prompts = [PROMPT, "  a   dog &amp; cat\n", "a cat " * 12]  # cleaned; the last one is cut at 16 tokens
    encoder = TextEncoder(folder / "text_encoder", folder / "tokenizer", text_len=16)
    got = encoder(prompts)
    ref = SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(folder / "text_encoder").eval(),
    )
    with torch.no_grad():
        expected = WanPipeline._get_t5_prompt_embeds(
            ref, prompts, max_sequence_length=16, device=torch.device("cpu"), dtype=torch.float32
        )
    assert got.shape == (3, 16, 24) and torch.equal(got, expected)
    lengths = (got.abs().sum(-1) > 0).sum(-1).tolist()
    assert lengths == [8, 5, 16]  # 7 and 4 words, then the end token; zeros after
    encoder.release()
    assert encoder._encoder is None
    assert torch.equal(encoder(prompts[1:2]), got[1:2]) and encoder._encoder is None  # cached: not reloaded
    fresh = TextEncoder(folder / "text_encoder", folder / "tokenizer", text_len=16)
    assert torch.equal(encoder(["a blue dog"]), fresh(["a blue dog"])) and encoder._encoder is not None  # reloaded
    with pytest.raises(ValueError, match="no text encoder folder"):
        TextEncoder(folder / "absent", folder / "tokenizer", 16)(["a cat"])
    with pytest.raises(ValueError, match="no VAE at"):
        load_vae(folder / "absent")


# ----------------------------------------------------------------------------- command line


def test_generate_writes_a_video_from_a_card(card, tmp_path):
    out = tmp_path / "wan.mp4"
    args = ["generate", "--model", str(card), "--prompt", PROMPT, "--out", str(out), "--dtype", "fp32", "--no-compile"]
    r = CliRunner().invoke(app, [*args, "--chunks", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["frames"] == 21
    video = read_mp4(out)
    assert video.shape == (21, 256, 384, 3)  # 32x48 frames at the default scale of 8
    r = CliRunner().invoke(app, [*args, "--actions", "left*9"])
    assert r.exit_code == 2 and "takes no actions" in r.output


def test_batched_wan_streams_keep_their_batch_buffers(card, wan):
    """step_streams's batch buffers on the Wan layout (absolute time positions, fresh noise, latent
    chunks decoded as they come): allocated once, frames byte for byte those of fresh buffers."""
    from tests.qarvd_core.test_sampling import _assert_batch_buffers_kept

    twin = load_model(str(card))
    prompts = [PROMPT, "a dog runs in snow"]
    streams = [Stream(wan, p, seed) for seed, p in enumerate(prompts)]
    refs = [Stream(twin, p, seed) for seed, p in enumerate(prompts)]
    _assert_batch_buffers_kept(wan, streams, twin, refs, step_streams)
