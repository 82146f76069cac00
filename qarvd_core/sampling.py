"""Few-step flow-matching sampling and the streaming API.

Flow time t runs from 1 (pure noise) to 0 (clean): x_t = (1 - t) * x0 + t * noise. The
model predicts x0; each step moves to the next time on a shifted schedule (`Sampler`).
`Stream` is the one object for a live stream: the CLI, the evaluator and the server all
drive generation through it (or through `rollout`, its batched form). A stream over a Wan
model card (qarvd_core/wan.py) takes text prompts and decodes its latent chunks to frames as
they come; its frames leave in the same layout as a pixel-space model's.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qarvd_core.model import KVCache, WorldModel, camera_path
from qarvd_core.wan_vae import StreamDecoder
from qarvd_core.world.simulator import ACTIONS, BIOME_NAMES

DEFAULT_STEPS = 4
DEFAULT_SHIFT = 1.5
# Action guidance on the first denoising step: x0 = x0(a) + g * (x0(a) - x0(none)), at the
# price of one extra forward pass per chunk (6 instead of 5). Off by default: with camera_rope
# the shipped tiny-world follows actions at 1.000 with g=0 on 32 calibration worlds, and g=0.5
# adds nothing (docs/results.md). It is for models that repeat their last frame instead of
# moving; on a quantized model it also amplifies the quantization error.
DEFAULT_ACTION_GUIDANCE = 0.0


def flow_schedule(steps: int = DEFAULT_STEPS, shift: float = DEFAULT_SHIFT) -> list[float]:
    """Decreasing flow times, first 1.0, 0 excluded: t = shift*s / (1 + (shift-1)*s)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    s = np.linspace(1.0, 0.0, steps + 1)[:-1]
    return [float(shift * v / (1 + (shift - 1) * v)) for v in s]


def flowmatch_sigmas(shift: float, train_steps: int = 1000) -> Tensor:
    """The FlowMatch scheduler's sigmas (sigma_min 0, extra_one_step) in float32: linspace(1, 0,
    train_steps + 1)[:-1] shifted to shift*s / (1 + (shift-1)*s); its timesteps are 1000 times these."""
    s = torch.linspace(1.0, 0.0, train_steps + 1)[:-1]
    return shift * s / (1 + (shift - 1) * s)


def flowmatch_schedule(steps: list[int], shift: float, train_steps: int = 1000) -> list[float]:
    """Flow times of a step list on the 1000-step FlowMatch schedule Wan models are distilled on.

    The scheduler (sigma_min 0, extra_one_step) has sigmas linspace(1, 0, train_steps + 1)[:-1]
    shifted to shift*s / (1 + (shift-1)*s), in float32; step k is its sigma at index
    train_steps - k (0 is clean), so Self-Forcing's 1000, 750, 500, 250 at shift 5 become
    1, 0.9375, 0.8333, 0.625. The values are those float32 sigmas exactly, so a model's
    timestep 1000 t is the scheduler's timestep bit for bit.
    """
    _check_steps(steps, train_steps)
    sigmas = torch.cat([flowmatch_sigmas(shift, train_steps), torch.zeros(1)])
    return [float(sigmas[train_steps - k]) for k in steps]


def flowmatch_nearest(steps: list[int], shift: float, train_steps: int = 1000) -> tuple[list[float], list[float]]:
    """Unwarped steps on the FlowMatch schedule, as CausVid samples: (flow times, sigmas).

    The model is fed the step k itself as its timestep (flow time k / 1000; 1000 t in float32 is
    k exactly for the steps accepted here), while x0 = x_t - sigma v and the re-noising use the
    scheduler's sigma whose timestep is nearest k (`argmin |timesteps - k|`), as CausVid's
    wrapper and `FlowMatchScheduler.add_noise` look it up.
    """
    _check_steps(steps, train_steps)
    times = torch.tensor([k / train_steps for k in steps], dtype=torch.float32)
    if not torch.equal(times * train_steps, torch.tensor(steps, dtype=torch.float32)):
        raise ValueError(f"steps {steps}: some k / {train_steps} do not give the timestep k back in float32")
    sigmas = flowmatch_sigmas(shift, train_steps)
    nearest = (sigmas.double()[None] * train_steps - torch.tensor(steps, dtype=torch.float64)[:, None]).abs().argmin(1)
    return [float(t) for t in times], [float(sigmas[i]) for i in nearest]


def _check_steps(steps: list[int], train_steps: int) -> None:
    if not steps or any(not 0 <= k <= train_steps for k in steps):
        raise ValueError(f"steps must be a non-empty list within [0, {train_steps}], got {steps}")


@dataclass(frozen=True)
class Sampler:
    """How a chunk is denoised: its flow times, how x moves from one to the next, action guidance.

    The model is fed each flow time of `schedule`; `sigmas`, when given, are the flow-matching
    sigmas its output is read with (x0 = x - sigma v) and x moves along, where they differ from
    the times (CausVid's unwarped steps, `flowmatch_nearest`). After each step but the last, x
    moves to the next sigma s' along a noise eps: x = (1 - s') x0 + s' eps. By default eps is the
    noise the current x implies, eps = (x - (1 - s) x0) / s (deterministic, DDIM); with
    `fresh_noise` it is drawn anew from the stream's noise generator, as Self-Forcing, CausVid
    and LongLive sample. `global_sink`: a prompt switch keeps the sink's cache (`Stream.set_prompt`).
    """

    schedule: tuple[float, ...]
    fresh_noise: bool = False
    action_guidance: float = DEFAULT_ACTION_GUIDANCE
    sigmas: tuple[float, ...] | None = None
    global_sink: bool = False

    @classmethod
    def for_model(
        cls,
        model: WorldModel,
        steps: int | None = None,
        shift: float | None = None,
        action_guidance: float = DEFAULT_ACTION_GUIDANCE,
    ) -> Sampler:
        """The model's own sampler: its card's sampling preset (Wan) or `flow_schedule`; `steps` or
        `shift` given put the model on `flow_schedule(steps, shift)` instead."""
        preset = getattr(getattr(model, "card", None), "sampling", None)
        sigmas = None
        if preset is not None and steps is None and shift is None:
            schedule, sigmas = preset.times()
        else:
            steps = DEFAULT_STEPS if steps is None else steps
            schedule = flow_schedule(steps, DEFAULT_SHIFT if shift is None else shift)
        fresh = preset is not None and preset.fresh_noise
        global_sink = preset is not None and preset.global_sink
        return cls(tuple(schedule), fresh, action_guidance, None if sigmas is None else tuple(sigmas), global_sink)


class ActionNotSupported(ValueError):
    """An action given to a model that takes none (a text-to-video model)."""


def to_uint8(frames: Tensor) -> np.ndarray:
    """[..., C, H, W] in [-1, 1] -> [..., H, W, C] uint8 on the host.

    Converted where the frames are, so frames on a CUDA device leave it once, as bytes (a
    quarter of float32's), by a non-blocking copy into pinned memory (the copy engine's fast
    path; pinned blocks are cached by torch and reused).
    """
    x = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1)
    if x.device.type == "cpu":
        return x.numpy()
    host = torch.empty(x.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(x.contiguous(), non_blocking=True)
    torch.cuda.current_stream(x.device).synchronize()
    return host.numpy()


def from_uint8(frames: np.ndarray) -> Tensor:
    """[..., H, W, C] uint8 -> [..., C, H, W] float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3).float() / 127.5 - 1


def action_ids(actions) -> Tensor:
    try:
        return torch.tensor([ACTIONS.index(a) for a in actions], dtype=torch.long)
    except ValueError as e:
        raise ValueError(f"unknown action in {list(actions)}; choose from {', '.join(ACTIONS)}") from e


def prompt_id(prompt: str) -> int:
    if prompt not in BIOME_NAMES:
        raise ValueError(f"unknown prompt {prompt!r}; choose a biome: {', '.join(BIOME_NAMES)}")
    return BIOME_NAMES.index(prompt)


def chunk_actions(model: WorldModel, action: str | list[str] | None) -> Tensor:
    """A chunk's action ids [frames_per_chunk]: `action` held for the chunk or given per frame.

    A model without actions takes `None` (its ids are placeholders it ignores) and refuses
    anything else with `ActionNotSupported`.
    """
    Fr = model.args.frames_per_chunk
    if not model.args.n_actions:
        if action is not None:
            raise ActionNotSupported("this model takes no actions: it is steered by its text prompt only")
        return torch.full((Fr,), ACTIONS.index("none"))
    if action is None:
        raise ValueError(f"this model is steered by actions: give one of {', '.join(ACTIONS)}")
    acts = [action] * Fr if isinstance(action, str) else list(action)
    if len(acts) != Fr:
        raise ValueError(f"give one action or exactly {Fr} (one per frame), got {len(acts)}")
    return action_ids(acts)


def encode_prompts(model: WorldModel, prompts: list[str]) -> Tensor:
    """Prompts -> cross-attention context [B, text_len, dim]: a tiny preset's biome names through
    its learned prompt table, free text through the text encoder of a Wan model's card."""
    p = next(model.parameters())
    if model.args.n_prompts:
        return model.encode_prompt(torch.tensor([prompt_id(x) for x in prompts], device=p.device))
    parts = getattr(model, "parts", None)
    if parts is None:
        raise ValueError("this model takes text prompts through a text encoder: load it from its model card")
    return model.embed_text(parts.text(prompts).to(p.device, p.dtype))


@torch.no_grad()
def denoise_chunk(
    model: WorldModel,
    cache: KVCache,
    context: Tensor,
    actions: Tensor,
    noise: Callable[[], Tensor],
    sampler: Sampler,
) -> Tensor:
    """One chunk: `noise()` [B, F, C, H, W] -> clean frames, then commit them to the cache at t=0.

    `noise` draws the chunk's starting noise, and with `sampler.fresh_noise` the noise of every
    later step, in that order. Action guidance g > 0 pushes the first step away from what the
    model would draw under the action "none" (the cache is only read, so both passes see the
    same context).
    """
    B, Fr = actions.shape
    schedule, g = sampler.schedule, sampler.action_guidance
    sigmas = schedule if sampler.sigmas is None else sampler.sigmas
    x = noise()
    guide = g > 0 and model.args.n_actions > 0
    for i, t in enumerate(schedule):
        tt = torch.full((B, Fr), t, device=x.device)
        ss = None if sampler.sigmas is None else torch.full((B, Fr), sigmas[i], device=x.device)
        x0 = model(x, tt, actions, context, cache=cache, sigma=ss)
        if guide and i == 0:
            still = model(x, tt, torch.full_like(actions, ACTIONS.index("none")), context, cache=cache, sigma=ss)
            x0 = x0 + g * (x0 - still)
        if model.args.clamp_x0:  # pixel space; latents are unbounded
            x0 = x0.clamp(-1, 1)
        if i + 1 == len(schedule):
            break
        s, s_next = sigmas[i], sigmas[i + 1]
        if sampler.fresh_noise:  # in float32, then the model's dtype, as Self-Forcing's scheduler adds noise
            x = ((1 - s_next) * x0.float() + s_next * noise().float()).to(x0.dtype)
        else:
            eps = (x - (1 - s) * x0) / s
            x = (1 - s_next) * x0 + s_next * eps
    model(x0, torch.zeros(B, Fr, device=x.device), actions, context, cache=cache, commit=True)
    return x0


@dataclass
class _HeldChunk:
    frames: Tensor  # [B, F, C, H, W]
    actions: Tensor  # [B, F]
    camera: Tensor  # [B, F, 2]: where each frame was seen (a re-commit must not lose the path before it)
    index: int  # the chunk's number in its stream (its time position, for an absolute-time cache)


@dataclass(frozen=True)
class StreamState:
    """A copy of everything a stream's next chunks depend on besides its model (`Stream.snapshot`).

    The prompt's encoding is not part of it: it belongs to the model, so a fork re-encodes it.
    """

    prompt: str
    seed: int
    cache: KVCache
    generator: Tensor  # the noise generator's state
    held: tuple[_HeldChunk, ...]  # never modified in place, so sharing them is a copy
    sampler: Sampler
    decoder: StreamDecoder | None  # a latent model's VAE decoder, with its cache


class ScriptRender:
    """Frames for a per-frame action script, made one chunk at a time: the one home of a
    script's padding and trimming, for `qarvd generate` and the server's video renders.

    The script is cut into chunks, the last one padded by holding its last action; step a
    stream with each `next_actions()`, `add` what it made, and `video()` is one frame per
    script action (the padding's frames cut off). A model without actions renders a number
    of chunks instead (`for_chunks`), each stepped with the action None, every frame kept.
    """

    def __init__(self, script: list[str], frames_per_chunk: int):
        if not script:
            raise ValueError("an action script needs at least one action")
        padded = script + [script[-1]] * (-len(script) % frames_per_chunk)
        self.length: int | None = len(script)
        self.chunks: list[list[str] | None] = [
            padded[k : k + frames_per_chunk] for k in range(0, len(padded), frames_per_chunk)
        ]
        self._frames: list[np.ndarray] = []

    @classmethod
    def for_chunks(cls, chunks: int) -> ScriptRender:
        if chunks < 1:
            raise ValueError("a render needs at least one chunk")
        render = cls(["none"], 1)
        render.length, render.chunks = None, [None] * chunks
        return render

    @property
    def done(self) -> bool:
        return len(self._frames) == len(self.chunks)

    def next_actions(self) -> list[str] | None:
        return self.chunks[len(self._frames)]

    def add(self, frames: np.ndarray) -> None:
        self._frames.append(frames)

    def video(self) -> np.ndarray:
        """Frames [len(script), H, W, 3] uint8 (every frame made, for `for_chunks`), once `done`."""
        if not self.done:
            raise ValueError(f"{len(self._frames)} of {len(self.chunks)} chunks made")
        return np.concatenate(self._frames)[: self.length]


class Stream:
    """A live stream: start with a model, prompt and seed; `step(action)` yields one chunk.

    Holds its own KV cache, seeded noise generator and, for a latent model, VAE decoder cache;
    `set_prompt` switches the scene and re-caches the held context under the new prompt;
    `reset` starts over. The sampler is the model's own (`Sampler.for_model`).
    """

    def __init__(
        self,
        model: WorldModel,
        prompt: str,
        seed: int,
        steps: int | None = None,
        shift: float | None = None,
        action_guidance: float = DEFAULT_ACTION_GUIDANCE,
    ):
        self.model = model
        self.args = model.args
        self.sampler = Sampler.for_model(model, steps, shift, action_guidance)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache = KVCache(self.args, 1, self.device, self.dtype, model.kv_quant)
        parts = getattr(model, "parts", None)
        self.decoder = None if parts is None else parts.decoder()
        self.reset(seed, prompt)

    def reset(self, seed: int | None = None, prompt: str | None = None) -> None:
        self.seed = self.seed if seed is None else seed
        self.generator = torch.Generator(self.device).manual_seed(self.seed)
        self.cache.reset()
        self.held: list[_HeldChunk] = []
        if self.decoder is not None:
            self.decoder.reset()
        self.set_prompt(self.prompt if prompt is None else prompt)

    @torch.no_grad()
    def set_prompt(self, prompt: str) -> None:
        """Switch the scene prompt; the held chunks are re-run under it, each at its own time
        position, so the cache matches (LongLive's KV re-cache).

        With the sampler's `global_sink`, once the cache window (sink, window and the chunk being
        made) no longer reaches the stream's first chunk, the sink keeps the cache its chunks got
        under the earlier prompt and only the window is re-run, as LongLive's `global_sink` does.
        """
        self.context = encode_prompts(self.model, [prompt])
        self.prompt = prompt
        a, committed = self.args, self.cache.committed
        keep = a.sink_chunks if self.sampler.global_sink and committed > a.context_chunks else 0
        held, self.held = self.held, self.held[:keep]
        self.cache.rewind(keep)
        for chunk in held[keep:]:
            self.cache.committed = chunk.index
            t0 = torch.zeros(chunk.actions.shape, device=self.device)
            self.model(chunk.frames, t0, chunk.actions, self.context, self.cache, commit=True, camera=chunk.camera)
            self._hold(chunk)
        self.cache.committed = committed

    def snapshot(self) -> StreamState:
        """A copy of this stream's state: stepping the stream afterwards does not change it."""
        cache = KVCache(self.args, 1, self.device, self.dtype, self.cache.quant)
        cache.copy_from(self.cache)
        return StreamState(
            self.prompt,
            self.seed,
            cache,
            self.generator.get_state(),
            tuple(self.held),
            self.sampler,
            None if self.decoder is None else self.decoder.copy(),
        )

    def fork(self, model: WorldModel | None = None) -> Stream:
        """An independent stream that continues from this one's state, on `model` (default: the same).

        With the same model, `fork().step(a)` equals `step(a)` bit for bit. With another model
        (an FP base shadowing a quantized stream) the next chunk is drawn from the same cache,
        camera and noise, so the two chunks differ only by the models; the fork decodes with
        this stream's VAE decoder cache.
        """
        state = self.snapshot()
        twin = Stream(model or self.model, state.prompt, state.seed)
        twin.sampler = state.sampler
        twin.cache = KVCache(twin.args, 1, twin.device, twin.dtype, state.cache.quant)
        twin.cache.copy_from(state.cache)
        twin.generator.set_state(state.generator)
        twin.held = list(state.held)
        twin.decoder = None if state.decoder is None else state.decoder.copy()
        return twin

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) of the frames this stream yields, in pixels."""
        scale = 1 if self.decoder is None else self.decoder.scale
        return self.args.frame_height * scale, self.args.frame_width * scale

    @property
    def frames_per_chunk(self) -> int:
        """Frames a chunk yields: frames_per_chunk, or a Wan model's decoded frames per latent
        chunk past the first (the stream's first chunk has frames_per_latent - 1 fewer)."""
        per = 1 if self.decoder is None else self.decoder.frames_per_latent
        return self.args.frames_per_chunk * per

    def _hold(self, chunk: _HeldChunk) -> None:
        # Mirror the cache: sink chunks forever, then the newest window chunks.
        a = self.args
        self.held.append(chunk)
        if len(self.held) > a.sink_chunks + a.window_chunks:
            del self.held[a.sink_chunks]

    def _noise(self) -> Tensor:
        a = self.args
        shape = (1, a.frames_per_chunk, a.in_channels, a.frame_height, a.frame_width)
        return torch.randn(shape, generator=self.generator, device=self.device).to(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of this stream's state on its device: its KV cache once the window is full (as
        stored: quantized or not) and, for a latent model, its VAE decoder's cache (full once a
        chunk is decoded)."""
        decoder = 0 if self.decoder is None else sum(t.nbytes for t in self.decoder.cache if isinstance(t, Tensor))
        return self.cache.full_nbytes + decoder

    def _decoded(self, x0: Tensor) -> Tensor:
        """A generated chunk [1, F, C, H, W] as frames [F', C, H', W'] in [-1, 1] (a latent chunk decoded)."""
        return (x0 if self.decoder is None else self.decoder.decode(x0))[0]

    def _frames(self, x0: Tensor) -> np.ndarray:
        """A generated chunk [1, F, C, H, W] as frames [F', H', W', 3] uint8 on the host."""
        return to_uint8(self._decoded(x0))

    @torch.no_grad()
    def step(self, action: str | list[str] | None = None) -> np.ndarray:
        """Generate the next chunk; `action` is held for the chunk or given per frame (`chunk_actions`).

        Returns frames [F, H, W, 3] uint8: frames_per_chunk frames, or for a Wan model the
        decoded video frames (4 per latent frame, the stream's first latent frame giving 1).
        """
        ids = chunk_actions(self.model, action)[None].to(self.device)
        camera = camera_path(ids, self.cache.camera)
        index = self.cache.committed
        x0 = denoise_chunk(self.model, self.cache, self.context, ids, self._noise, self.sampler)
        self._hold(_HeldChunk(x0, ids, camera, index))
        return self._frames(x0)


@torch.no_grad()
def rollout(
    model: WorldModel,
    prompts: list[str],
    actions: list[list[str]],
    seeds: list[int],
    steps: int | None = None,
    shift: float | None = None,
    on_chunk=None,
    chunk_model=None,
    action_guidance: float = DEFAULT_ACTION_GUIDANCE,
) -> Tensor:
    """Batched streams in lockstep: the model's frames [B, T, C, H, W] (pixels in [-1, 1], or
    a Wan model's normalised latents, not decoded).

    Stream b uses the noise of `Stream(model, prompts[b], seeds[b])`, so a batched rollout
    and a single stream with the same seed see identical noise. T is the script length
    rounded down to whole chunks (a model without actions ignores them: its scripts only give
    the length). `on_chunk(k, n_chunks)` reports progress. `chunk_model(k)` picks the model
    for chunk k (all share one cache and `model`'s sampler): Q-ARVD's sensitivity runs
    quantize one chunk at a time this way.
    """
    a = model.args
    B, Fr = len(prompts), a.frames_per_chunk
    n_chunks = min(len(x) for x in actions) // Fr
    if n_chunks == 0:
        raise ValueError(f"action scripts must hold at least one chunk ({Fr} frames)")
    p = next(model.parameters())
    cache = KVCache(a, B, p.device, p.dtype, model.kv_quant)
    contexts: dict[int, Tensor] = {}
    ids = torch.stack([action_ids(x[: n_chunks * Fr]) for x in actions]).to(p.device)
    gens = [torch.Generator(p.device).manual_seed(s) for s in seeds]
    shape = (1, Fr, a.in_channels, a.frame_height, a.frame_width)
    sampler = Sampler.for_model(model, steps, shift, action_guidance)

    def noise() -> Tensor:
        return torch.cat([torch.randn(shape, generator=g, device=p.device) for g in gens]).to(p.dtype)

    out = []
    for k in range(n_chunks):
        m = model if chunk_model is None else chunk_model(k)
        if id(m) not in contexts:
            contexts[id(m)] = encode_prompts(m, prompts)
        chunk_ids = ids[:, k * Fr : (k + 1) * Fr]
        out.append(denoise_chunk(m, cache, contexts[id(m)], chunk_ids, noise, sampler))
        if on_chunk is not None:
            on_chunk(k + 1, n_chunks)
    return torch.cat(out, dim=1)


# The batched key and value buffers of each model, kept across chunks (`batch_buffers`).
_BATCH_BUFFERS: weakref.WeakKeyDictionary[WorldModel, tuple[Tensor, Tensor]] = weakref.WeakKeyDictionary()


def batch_buffers(model: WorldModel, batch: int, quantized: bool | None = None) -> tuple[Tensor, Tensor]:
    """The key and value buffers `step_streams` gathers `batch` streams of `model` into: an FP
    cache's storage [layers, batch, heads, capacity, head_dim], or a quantized one's working buffers
    [1, batch, heads, capacity, head_dim] (one layer's, which every layer dequantizes into);
    `quantized` defaults to the model's cache setting (`kv_quant`).

    Every batch size takes the first rows of one pair of buffers per model, kept across chunks, so
    the blocks write into the same addresses every chunk and inductor's CUDA graphs, recorded once,
    replay. They are allocated for the largest batch asked for so far and reallocated (the graphs
    re-recorded) only when a larger one comes, or the model's cache setting changes: a server asks
    for its largest batch when a model loads. Freed by `release_batch_buffers` or with the model.
    """
    held = _BATCH_BUFFERS.get(model)
    shape = _batch_shape(model, batch, quantized)
    if held is None or held[0].shape[1] < batch or held[0].shape[0] != shape[0]:
        p = next(model.parameters())
        held = _BATCH_BUFFERS[model] = tuple(torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in "kv")
    return held[0][:, :batch], held[1][:, :batch]


def _batch_shape(model: WorldModel, batch: int, quantized: bool | None = None) -> tuple[int, ...]:
    a = model.args
    if quantized is None:
        quantized = model.kv_quant is not None and model.kv_quant.enabled
    return (1 if quantized else a.n_layers, batch, a.n_heads, a.context_chunks * a.chunk_tokens, a.head_dim)


def batch_row_bytes(model: WorldModel) -> int:
    """Bytes of one stream's rows of `model`'s batch buffers (what each stream of a batch holds there)."""
    return 2 * math.prod(_batch_shape(model, 1)) * next(model.parameters()).element_size()


def release_batch_buffers(model: WorldModel) -> None:
    """Free `model`'s batch buffers (a model being unloaded)."""
    _BATCH_BUFFERS.pop(model, None)


@torch.no_grad()
def step_streams(streams: list[Stream], actions: list[str | list[str] | None]) -> list[np.ndarray]:
    """One chunk for one or several streams of the same model in one batched forward pass.

    Streams must share a model and the time position of their next chunk (the same number of held
    chunks, and of chunks ever made for an absolute-time cache; the server groups them so); each
    keeps its own cache, noise generator, prompt, held context and decoder. Their caches are
    gathered into the model's batch buffers (`batch_buffers`) and scattered back, so a compiled
    model's chunks run on the same buffers every time (CUDA graphs). The result equals calling
    `stream.step(action)` on each (exactly for one stream; up to float rounding for several).
    """
    if not streams:
        return []
    first = streams[0]
    if any(
        s.model is not first.model
        or (s.cache.n_chunks, s.cache.time_offset) != (first.cache.n_chunks, first.cache.time_offset)
        or s.sampler != first.sampler
        for s in streams
    ):
        raise ValueError("batched streams must share a model, a cache length and time position and sampler settings")
    ids = torch.stack([chunk_actions(first.model, a) for a in actions]).to(first.device)
    B = len(streams)
    quant = first.cache.quant
    cache = KVCache(first.args, B, first.device, first.dtype, quant, batch_buffers(first.model, B, quant is not None))
    for i, s in enumerate(streams):
        cache.copy_from(s.cache, dst_rows=slice(i, i + 1))
    camera = camera_path(ids, cache.camera)
    context = torch.cat([s.context for s in streams])

    def noise() -> Tensor:
        return torch.cat([s._noise() for s in streams])

    x0 = denoise_chunk(first.model, cache, context, ids, noise, first.sampler)
    decoded = []
    for i, s in enumerate(streams):
        index = s.cache.committed  # batched streams share a cache length, not a chunk count
        s.cache.copy_from(cache, src_rows=slice(i, i + 1))
        s.cache.committed = index + 1
        s._hold(_HeldChunk(x0[i : i + 1], ids[i : i + 1], camera[i : i + 1], index))
        decoded.append(s._decoded(x0[i : i + 1]))
    # Every stream's frames leave the device together: one conversion, one copy.
    frames = to_uint8(torch.cat(decoded))
    return np.split(frames, np.cumsum([len(d) for d in decoded[:-1]]))
