"""The streaming engine: sessions, a step loop that batches them, drift shadowing, pacing.

The routes' one way in to generation and models: open a session and act on it
(`open_session`, `set_action`, `set_prompt`, `set_paused`, `close_session`), render a
video (`render_video`), and list, describe and delete models (`models`, `model`,
`delete_model`).

One engine serves every model. Its loop finds the sessions due a chunk, groups them by
model and cache length, and runs each group as one batched forward pass on a single
compute thread, off the event loop. A chunk's frames are encoded on an encoder thread while
the next chunk computes (one chunk in flight, so order and memory stay bounded), then go to
each session's small outbound queue, where the newest frame wins: a slow client loses frames
(counted), never grows memory and never slows the other sessions.

A model is warmed up when it loads (`_warm_up`): a chunk at every batch size the loop can give
it, so compiled blocks never compile in a live session's chunk, and the memory one more stream
of it takes is measured there (its KV and VAE decoder caches as tensor bytes, its rows of the
model's batch buffers, allocated there for the largest batch and kept, on CUDA the chunk's peak
beyond them). Admission counts those bytes against
the memory budget, and `QARVD_MAX_SESSIONS=auto` is the budget over them.

Nothing a client sends waits for the compute thread: a prompt switch is recorded and
applied before the session's next chunk (the newest wins), so a flood of them costs one
re-cache a chunk at most and the session ends as soon as its client goes. Video renders
(`render`) are stepped by the same loop one chunk at a time: whenever no live session is
due, and with at most RENDER_SHARE of the compute thread while sessions keep it busy. A
render is never batched with live sessions (that would slow their chunks), so it costs a
live session at most one render chunk's wait now and then.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import struct
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple, TypedDict

import numpy as np
import torch
from PIL import Image

from qarvd_core import runtime
from qarvd_core.checkpoint import DTYPES
from qarvd_core.eval.metrics import psnr
from qarvd_core.model import WorldModel
from qarvd_core.sampling import ScriptRender, Stream, batch_buffers, batch_row_bytes, step_streams
from qarvd_core.video import encode_mp4
from qarvd_core.world.simulator import BIOME_NAMES
from service.engine.loaded import LoadedModels
from service.metrics import Metrics
from service.settings import Settings
from service.store import ModelRecord, ModelStore, UnknownModel

log = logging.getLogger("qarvd")


class AtCapacity(RuntimeError):
    pass


# QARVD_MAX_SESSIONS=auto: the memory budget over the measured bytes per session, within
# [1, AUTO_MAX_SESSIONS] (warm-up compiles every batch size up to it); without a budget (the
# CPU, where compute rather than memory bounds sessions) AUTO_SESSIONS_WITHOUT_BUDGET.
AUTO_MAX_SESSIONS = 8
AUTO_SESSIONS_WITHOUT_BUDGET = 4
# On CUDA without QARVD_MEMORY_BUDGET_GIB: this share of the device memory free once the default
# model is loaded and warmed up (the rest for other models and the allocator's fragmentation).
CUDA_BUDGET_SHARE = 0.9


class NotForModel(ValueError):
    """A prompt, action or video length that the model asked for does not take."""


DEFAULT_BIOME = "islands"


def check_prompt(model: WorldModel, prompt: str | None) -> str:
    """The prompt a stream of `model` starts with: a biome for a model with a prompt table (default
    DEFAULT_BIOME), free text for a text model (required). Raises NotForModel."""
    if model.args.n_prompts:
        if prompt is None:
            return DEFAULT_BIOME
        if prompt not in BIOME_NAMES:
            raise NotForModel(f"this model's prompts are biomes: {', '.join(BIOME_NAMES)}; got {prompt[:40]!r}")
        return prompt
    if prompt is None or not prompt.strip():
        raise NotForModel("this model is steered by a text prompt: give `prompt`, e.g. 'a red fox runs through snow'")
    return prompt


def idle_action(model: WorldModel) -> str | None:
    """The action of a chunk nobody steers: `none`, or None for a model that takes no actions."""
    return "none" if model.args.n_actions else None


# A render takes its chunks while no live session is due; on a server whose sessions are
# always due it still takes this share of the compute thread (and the sessions the rest).
RENDER_SHARE = 0.15


def encode_frame(frame: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    kw = {"quality": quality} if fmt in ("jpeg", "webp") else {}
    Image.fromarray(frame).save(buf, format=fmt.upper(), **kw)
    return buf.getvalue()


class FrameHeader(TypedDict):
    """The JSON header in front of every frame (docs/protocol.md, "Frame header")."""

    frame: int
    chunk: int
    action: str | None
    latency_ms: float
    ts: float
    index_in_chunk: int


def frame_message(header: FrameHeader, image: bytes) -> bytes:
    """4-byte big-endian header length, UTF-8 JSON header, encoded image."""
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">I", len(h)) + h + image


def _encode_all(sends: list) -> list[list[bytes] | Exception]:
    """On the encoder thread: each session's frames as messages, or the error that stopped them."""
    out: list[list[bytes] | Exception] = []
    for s, headers, frames in sends:
        try:
            out.append([frame_message(h, encode_frame(f, s.fmt, s.quality)) for h, f in zip(headers, frames)])
        except Exception as e:
            out.append(e)
    return out


class OutFrame(NamedTuple):
    made: float  # time.perf_counter() when the chunk was generated: frames too old are not sent
    data: bytes


@dataclass(eq=False)
class Session:
    id: str
    model_id: str
    stream: Stream
    fmt: str
    quality: int
    outbound: asyncio.Queue  # OutFrame, or None once the engine has ended the session
    action: str | None = "none"  # None for a model without actions
    pending_prompt: str | None = None  # applied before the next chunk, on the compute thread
    paused: bool = False
    started: float = field(default_factory=time.perf_counter)
    next_due: float = 0.0
    first_frame_sent: bool = False
    frames_generated: int = 0
    frames_sent: int = 0
    frames_dropped: int = 0
    last_chunk_ms: float = 0.0
    drift_psnr_db: float | None = None
    fell_back: bool = False
    closed: bool = False
    end_reason: str | None = None  # why the engine ended the session
    failed: bool = False  # ended by a failure (as opposed to a server shutdown)


@dataclass(eq=False)
class Render:
    """A video render in progress: the loop steps it one chunk at a time between live chunks."""

    model_id: str
    stream: Stream
    script: ScriptRender
    done: asyncio.Future
    waiting_since: float = field(default_factory=time.perf_counter)
    last_chunk_s: float = 0.0


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics, store: ModelStore):
        self.settings = settings
        self.metrics = metrics
        self._store = store
        # `auto` settings resolved for this host, logged with the reasons (qarvd_core/runtime.py).
        device = runtime.resolve_device(settings.device)
        self.plan = runtime.plan(settings.dtype, settings.compile, settings.kernels, device=device).apply()
        log.info("runtime: %s", self.plan.describe())
        # `auto` compile may differ for models with integer layers (compiling fuses their quantize and rescale).
        quantized_plan = runtime.plan(settings.dtype, settings.compile, settings.kernels, device=device, quantized=True)
        if quantized_plan.compile != self.plan.compile:
            log.info("runtime for quantized models: compile on (%s)", quantized_plan.reasons["compile"])
        self.device = torch.device(self.plan.device)
        metrics.device_memory.device = self.device
        if self.device.type == "cuda" and (self.plan.compile or quantized_plan.compile):
            # Compiled blocks replay as CUDA graphs where inductor can record them (it logs and counts,
            # in counters["inductor"]["cudagraph_skips"], the graphs it cannot; benchmarks/device_check.py).
            import torch._inductor.config as inductor_config

            inductor_config.triton.cudagraphs = True
        self._models = LoadedModels(
            store,
            settings.max_loaded_models,
            in_use=self.models_in_use,
            dtype=DTYPES[self.plan.dtype],
            compile_blocks=self.plan.compile,
            compile_quantized=quantized_plan.compile,
            max_autotune=settings.compile_max_autotune,
            device=self.plan.device,
            on_load=self._warm_up,
        )
        self.sessions: dict[str, Session] = {}
        self.renders: list[Render] = []
        # Sessions at once: the setting, or for `auto` resolved when the default model has loaded.
        self.max_sessions: int | None = None if settings.max_sessions == "auto" else settings.max_sessions
        # Device bytes one more stream of a model takes, measured when it loaded (`_warm_up`).
        self.session_bytes: dict[str, int] = {}
        metrics.stream_memory.source = self._kv_cache_bytes
        # Slots and bytes taken by sessions and renders still being set up (on the compute thread):
        # admission counts them, so concurrent starts cannot all see the same free slot.
        self._opening = 0
        self._rendering = 0
        self._reserved_bytes = 0
        self.closing = False
        # OpenMP gives each thread that runs torch ops its own team of workers, and two teams
        # on the same cores halve the speed (measured: 24 -> 12 frames/s on 2 cores). So every
        # torch op runs on the one compute thread with all the threads; the event loop's
        # thread is held to one, so it never starts a team of its own.
        self.threads = settings.threads or torch.get_num_threads()
        torch.set_num_threads(1)
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="qarvd-compute",
            initializer=torch.set_num_threads,
            initargs=(self.threads,),
        )
        # Frames are encoded here while the next chunk computes: PIL releases the GIL as it encodes,
        # and this thread runs no torch op, so it starts no OpenMP team of its own.
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qarvd-encode")
        self._sending: asyncio.Task | None = None  # the previous chunk's frames, encoding
        self.ready = False
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._rng = random.Random(0)

    async def _on_compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # Lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load and warm up the default model (which resolves `auto` max sessions), then start the step loop."""
        await self._load(self.settings.default_model)
        self.metrics.max_sessions.set(self.max_sessions)
        self._task = asyncio.create_task(self._loop(), name="qarvd-engine")
        self.ready = True
        self.metrics.ready.set(1)

    async def end_sessions(self, reason: str, timeout: float) -> None:
        """Refuse new sessions and renders, end every live one with `reason` (its client is
        told) and wait up to `timeout` seconds for their connections to close."""
        self.closing = True
        for s in list(self.sessions.values()):
            self._end(s, reason, failed=False)
        self._cancel_renders(reason)
        deadline = time.perf_counter() + timeout
        while self.sessions and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        self._cancel_renders("the server is shutting down")
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._sending is not None:
            self._sending.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._encoder.shutdown(wait=True, cancel_futures=True)

    # Memory -------------------------------------------------------------------------

    def _warm_up(self, model_id: str, model: WorldModel) -> None:
        """When a model loads (on the compute thread): measure what one more stream of it takes,
        resolve `auto` max sessions from that for the default model, and run a chunk at every batch
        size the loop can give it (compiled blocks specialise on the batch size)."""
        prompt, action = DEFAULT_BIOME, idle_action(model)  # any text prompts a text model
        stream = Stream(model, prompt, 0)
        step_streams([stream], [action])  # compiles a compiled model, fills a latent model's decoder cache
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        step_streams([stream], [action])
        # Its state once its window is full, its rows of the model's batch buffers (kept:
        # `batch_buffers`), and what a chunk takes beyond what it keeps: on CUDA measured
        # (activations, a quantized cache's batched copy of its stores, which grows with the held
        # chunks until the window is full), elsewhere that copy alone.
        cache = stream.cache
        grows = cache.full_nbytes - cache.nbytes if cache.quant is not None else 0
        if cuda:
            chunk = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device) + grows
        else:
            chunk = cache.full_nbytes if cache.quant is not None else 0
        self.session_bytes[model_id] = stream.nbytes + batch_row_bytes(model) + chunk
        self.metrics.session_bytes.labels(model_id).set(self.session_bytes[model_id])
        if self.max_sessions is None:
            self.max_sessions = self._auto_max_sessions(self.session_bytes[model_id])
        # The batch buffers at their final size now, so they are never reallocated; a compiled model
        # then runs every batch size on them (the largest first), so that its graphs (CUDA graphs on
        # CUDA) are recorded on the buffers it will keep.
        largest = self.max_sessions if self.settings.batch_sessions else 1
        batch_buffers(model, largest)
        if self._models.compiles(model):
            for n in range(largest, 0, -1):
                step_streams([Stream(model, prompt, i) for i in range(n)], [action] * n)

    def _memory_budget(self) -> int | None:
        """Bytes sessions may take: QARVD_MEMORY_BUDGET_GIB, or on CUDA a share of what is free now."""
        if self.settings.memory_budget_gib is not None:
            return int(self.settings.memory_budget_gib * 2**30)
        if self.device.type == "cuda":
            return int(CUDA_BUDGET_SHARE * self._device_free())
        return None

    def _auto_max_sessions(self, per_session: int) -> int:
        budget = self._memory_budget()
        n = AUTO_SESSIONS_WITHOUT_BUDGET if budget is None else max(1, min(AUTO_MAX_SESSIONS, budget // per_session))
        where = "no memory budget" if budget is None else f"{budget / 2**30:.2f} GiB budget"
        log.info("max sessions: auto = %d (%s, %.1f MiB per session)", n, where, per_session / 2**20)
        return n

    def _device_free(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def _reserve(self, model_id: str) -> int:
        """Reserve one more stream's bytes within QARVD_MEMORY_BUDGET_GIB (returned: give them back
        once the stream is registered or has failed); raises AtCapacity past the budget."""
        need = self.session_bytes[model_id]
        if self.settings.memory_budget_gib is not None:
            held = sum(self.session_bytes[x.model_id] for x in [*self.sessions.values(), *self.renders])
            budget = self.settings.memory_budget_gib * 2**30
            if held + self._reserved_bytes + need > budget:
                self.metrics.sessions_rejected.labels("memory_budget").inc()
                raise AtCapacity(f"the memory budget is taken ({need / 2**20:.1f} MiB more needed); retry later")
        self._reserved_bytes += need
        return need

    def _kv_cache_bytes(self) -> dict[str, int]:
        """KV-cache bytes held by live sessions and renders, by model (read at scrape time)."""
        held: dict[str, int] = defaultdict(int)
        for x in [*self.sessions.values(), *self.renders]:
            held[x.model_id] += x.stream.cache.nbytes
        return held

    async def _load(self, model_id: str) -> None:
        """Load and warm up the model if it is not loaded yet (on the compute thread)."""
        await self._on_compute(self._models.get, model_id)
        self.metrics.model_load.labels(model_id).set(self._models.load_seconds[model_id])

    async def _open_stream(self, model_id: str, prompt: str | None, seed: int) -> Stream:
        """A new stream, admitted by memory; raises AtCapacity, UnknownModel or NotForModel."""
        await self._load(model_id)
        need = self._reserve(model_id)
        try:
            return await self._on_compute(self._new_stream, model_id, prompt, seed)
        finally:
            self._reserved_bytes -= need

    def _new_stream(self, model_id: str, prompt: str | None, seed: int) -> Stream:
        """On a CUDA device, raises AtCapacity when it has no room for one more stream of the model."""
        model = self._models.get(model_id)
        # Its rows of the model's batch buffers were allocated when the model loaded.
        if self.device.type == "cuda" and self.session_bytes[model_id] - batch_row_bytes(model) > self._device_free():
            self.metrics.sessions_rejected.labels("device_memory").inc()
            need = self.session_bytes[model_id] / 2**20
            raise AtCapacity(f"not enough device memory for another stream ({need:.0f} MiB needed)")
        return Stream(model, check_prompt(model, prompt), seed)

    # Sessions ------------------------------------------------------------------------

    async def open_session(self, model_id: str, prompt: str | None, seed: int, fmt: str, quality: int) -> Session:
        """A live session; raises AtCapacity, UnknownModel, or NotForModel for a prompt the model does not take."""
        if self.closing:
            raise AtCapacity("the server is restarting")
        if self.max_sessions is None:  # `auto`, resolved by the default model's load (start() does it)
            await self._load(self.settings.default_model)
        if len(self.sessions) + self._opening >= self.max_sessions:
            self.metrics.sessions_rejected.labels("capacity").inc()
            raise AtCapacity(f"at capacity ({self.max_sessions} sessions)")
        self._store.path_of(model_id)  # raises UnknownModel before any work
        # The slot is taken before the first await and given back if the set-up fails.
        self._opening += 1
        try:
            stream = await self._open_stream(model_id, prompt, seed)
        finally:
            self._opening -= 1
        s = Session(
            uuid.uuid4().hex,
            model_id,
            stream,
            fmt,
            quality,
            # At least a chunk's frames (12 for a Wan model), which arrive together.
            asyncio.Queue(maxsize=max(self.settings.outbound_frames, stream.frames_per_chunk)),
            action=idle_action(stream.model),
        )
        self.sessions[s.id] = s
        self.metrics.sessions_active.set(len(self.sessions))
        self._wake.set()
        return s

    def models_in_use(self) -> set[str]:
        live = [*self.sessions.values(), *self.renders]
        ids = {x.model_id for x in live} | {self.settings.default_model}
        return ids | {b for m in ids if (b := self._store.record(m).base) is not None}  # drift shadows

    def close_session(self, s: Session) -> None:
        s.closed = True
        if self.sessions.pop(s.id, None) is not None:
            self.metrics.sessions_active.set(len(self.sessions))

    def set_action(self, s: Session, action: str) -> None:
        """Raises NotForModel for a model without actions."""
        if not s.stream.args.n_actions:
            raise NotForModel("this model takes no actions: it is steered by its text prompt only (send `prompt`)")
        s.action = action

    def set_paused(self, s: Session, paused: bool) -> None:
        s.paused = paused
        if not paused:
            s.next_due = 0.0
            self._wake.set()

    def set_prompt(self, s: Session, prompt: str) -> None:
        """Switch the scene before the session's next chunk; of several switches meanwhile, the newest wins.
        Raises NotForModel for a prompt the model does not take."""
        s.pending_prompt = check_prompt(s.stream.model, prompt)

    def _end(self, s: Session, reason: str, failed: bool) -> None:
        """Stop stepping the session and tell its sender (a None after the frames queued)."""
        if s.end_reason is not None:
            return
        s.closed, s.end_reason, s.failed = True, reason, failed
        self._put(s, None)

    # Videos --------------------------------------------------------------------------

    async def render(self, model_id: str, prompt: str | None, seed: int, script: list[str] | int) -> np.ndarray:
        """Frames [len(script), H, W, 3] of a new stream under a per-frame action script, or for a
        model without actions all the frames of `script` chunks.

        Raises AtCapacity past `max_concurrent_videos` renders, NotForModel for a prompt, script or
        length the model does not take (a length past `video_max_frames` frames).
        """
        self._store.path_of(model_id)  # raises UnknownModel before any work
        if self.closing:
            raise AtCapacity("the server is restarting; retry later")
        if self._rendering >= self.settings.max_concurrent_videos:
            raise AtCapacity(f"{self.settings.max_concurrent_videos} video render(s) running; retry later")
        self._rendering += 1
        job = None
        try:
            stream = await self._open_stream(model_id, prompt, seed)
            job = Render(
                model_id,
                stream,
                self._script_render(stream, script),
                asyncio.get_running_loop().create_future(),
            )
            self.renders.append(job)
            self._wake.set()
            await job.done
            return job.script.video()
        finally:
            self._rendering -= 1
            if job in self.renders:  # cancelled: stop stepping it
                self.renders.remove(job)

    def _script_render(self, stream: Stream, script: list[str] | int) -> ScriptRender:
        if not stream.args.n_actions:
            if not isinstance(script, int):
                raise NotForModel("this model takes no actions: give the video's length in chunks, not actions")
            if script * stream.frames_per_chunk > self.settings.video_max_frames:
                raise NotForModel(
                    f"{script} chunks make {script * stream.frames_per_chunk} frames, "
                    f"over the limit of {self.settings.video_max_frames}"
                )
            return ScriptRender.for_chunks(script)
        if isinstance(script, int):
            raise NotForModel("this model is steered by actions: give an action script, not a length in chunks")
        return ScriptRender(script, stream.args.frames_per_chunk)

    async def render_video(
        self, model_id: str, prompt: str | None, seed: int, script: list[str] | int, fps: int, scale: int
    ) -> bytes:
        """`render` as H.264 MP4 bytes, each frame upscaled by `scale`."""
        frames = await self.render(model_id, prompt, seed, script)
        # Encoding runs beside the compute thread, not on it: live streams keep their turns.
        return await asyncio.to_thread(encode_mp4, frames, fps, scale)

    # Models --------------------------------------------------------------------------

    def models(self) -> list[ModelRecord]:
        return [self._store.record(i) for i in self._store.ids()]

    def model(self, model_id: str) -> ModelRecord:
        """Raises UnknownModel."""
        return self._store.record(model_id)

    def speed_warning(self, model_id: str) -> str | None:
        """Set once the model has loaded, if its integer layers measured slower than FP32 here."""
        return self._models.speed_warnings.get(model_id)

    def delete_model(self, model_id: str) -> None:
        """Remove a quantized model that no session or render is using; raises UnknownModel or DeleteRefused."""
        self._store.delete(model_id, in_use=self.models_in_use())
        self._models.unload(model_id)

    # The step loop ---------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            groups = self._due_groups(time.perf_counter())
            if not groups:
                now = time.perf_counter()
                waits = [s.next_due - now for s in self.sessions.values() if not s.paused and not s.closed]
                self._wake.clear()
                # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel that comes as
                # the wake-up does (a session opened just before stop()), and the loop would run on.
                try:
                    async with asyncio.timeout(min(waits, default=1.0)):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            for group in groups:
                await self._step(group)

    def _due_groups(self, now: float) -> list[list[Session | Render]]:
        """Batches of the sessions due a chunk, of one model, cache length and time position each; then the
        renders due a chunk (all of them while no session is due, else those that have waited
        long enough to keep their RENDER_SHARE)."""
        batch = self.settings.batch_sessions

        def key(x: Session | Render) -> tuple:
            return (x.model_id, x.stream.cache.n_chunks, x.stream.cache.time_offset) if batch else (id(x),)

        live = [s for s in self.sessions.values() if not s.paused and not s.closed and s.next_due <= now]
        groups: dict[tuple, list[Session | Render]] = defaultdict(list)
        for s in live:
            groups[key(s)].append(s)
        for r in self.renders:
            if not live or now - r.waiting_since >= r.last_chunk_s * (1 / RENDER_SHARE - 1):
                groups[("render", *key(r))].append(r)
        return list(groups.values())

    async def _step(self, group: list[Session | Render]) -> None:
        actions: list[str | list[str]] = []
        prompts: list[str | None] = []
        for x in group:
            if isinstance(x, Session):
                actions.append(x.action)
                prompts.append(x.pending_prompt)
                x.pending_prompt = None
            else:
                actions.append(x.script.next_actions())
                prompts.append(None)
        t0 = time.perf_counter()
        error = None
        try:
            frames = await self._on_compute(self._compute, group, actions, prompts)
        except Exception as e:  # a compute failure ends these sessions and renders, not the server
            error = e
        elapsed = time.perf_counter() - t0
        # The previous chunk's frames were encoding meanwhile: they go out first, and one chunk at a
        # time encodes (backpressure: a slow encoder slows the loop, it never queues chunks).
        if self._sending is not None:
            await self._sending
        if error is None:
            sends = self._account(group, actions, frames, elapsed)
            self._sending = asyncio.create_task(self._send(sends, t0 + elapsed))
            return
        out_of_memory = isinstance(error, torch.cuda.OutOfMemoryError)
        message = "out of device memory" if out_of_memory else f"{type(error).__name__}: {error}"
        self._fail(group, f"generation failed: {message}")
        if out_of_memory:  # the failed batch's tensors are unreferenced now: hand their blocks back
            self.metrics.device_out_of_memory.labels(group[0].model_id).inc()
            if self.device.type == "cuda":
                await self._on_compute(torch.cuda.empty_cache)

    def _fail(self, group: list[Session | Render], message: str) -> None:
        for x in group:
            if isinstance(x, Session):
                self._end(x, message, failed=True)
            else:
                self._finish_render(x, RuntimeError(message))

    def _compute(self, group: list[Session | Render], actions: list, prompts: list[str | None]) -> list:
        """Runs on the compute thread: pending prompts, one batched chunk, drift shadows; frames [F, H, W, 3]."""
        for x, prompt in zip(group, prompts):
            if prompt is not None:
                x.stream.set_prompt(prompt)
        shadows = [self._shadow(x) if isinstance(x, Session) else None for x in group]
        frames = step_streams([x.stream for x in group], actions)
        for x, shadow, action, fr in zip(group, shadows, actions, frames):
            if shadow is not None:
                self._finish_shadow(x, *shadow, action, fr)
        return frames

    def _account(self, group: list[Session | Render], actions: list, frames: list, elapsed: float) -> list:
        """A chunk made: renders take their frames; sessions are paced and their frames' headers
        written. Returns (session, headers, frames) for each session, to be encoded and sent."""
        now = time.perf_counter()
        self.metrics.batch_size.labels(group[0].model_id).observe(len(group))
        sends = []
        for x, action, fr in zip(group, actions, frames):
            if isinstance(x, Render):
                x.script.add(fr)
                x.waiting_since, x.last_chunk_s = now, elapsed
                if x.script.done:
                    self._finish_render(x, None)
                continue
            s = x
            self.metrics.chunk_latency.labels(s.model_id).observe(elapsed)
            s.last_chunk_ms = elapsed * 1000
            chunk = s.stream.cache.committed - 1
            n = len(fr)  # frames_per_chunk, or a Wan model's decoded frames: 9, then 12 a chunk
            headers = []
            for i in range(n):
                self.metrics.frame_latency.labels(s.model_id).observe(elapsed / n)
                headers.append(
                    FrameHeader(
                        frame=s.frames_generated,
                        chunk=chunk,
                        action=action,
                        latency_ms=round(elapsed * 1000 / n, 2),
                        ts=time.time(),
                        index_in_chunk=i,
                    )
                )
                s.frames_generated += 1
            sends.append((s, headers, fr))
            period = n / self.settings.fps_target
            s.next_due = max(s.next_due + period, now - period)
        return sends

    async def _send(self, sends: list, made: float) -> None:
        """Encode a chunk's frames on the encoder thread and queue them for their clients. A frame
        that fails to encode ends its own session only."""
        try:
            encoded = await asyncio.get_running_loop().run_in_executor(self._encoder, _encode_all, sends)
        except Exception as e:  # the encoder itself failed: end these sessions, not the loop awaiting this
            encoded = [e] * len(sends)
        for (s, _, _), messages in zip(sends, encoded):
            if isinstance(messages, Exception):
                self._end(s, f"encoding failed: {type(messages).__name__}: {messages}", failed=True)
            elif s.end_reason is None:  # a session ended meanwhile has been told so already
                for m in messages:
                    self._put(s, OutFrame(made, m))

    def _cancel_renders(self, reason: str) -> None:
        for r in list(self.renders):
            self._finish_render(r, AtCapacity(f"{reason}; retry later"))

    def _finish_render(self, r: Render, error: Exception | None) -> None:
        if r in self.renders:
            self.renders.remove(r)
        if r.done.done():  # its request was cancelled
            return
        if error is None:
            r.done.set_result(None)
        else:
            r.done.set_exception(error)

    def _put(self, s: Session, item: OutFrame | None) -> None:
        """Enqueue for the client; when the queue is full the oldest frame is dropped (counted)."""
        if s.outbound.full():
            s.outbound.get_nowait()
            s.frames_dropped += 1
            self.metrics.frames_dropped.labels(s.model_id).inc()
        s.outbound.put_nowait(item)

    # Drift shadowing -----------------------------------------------------------------

    def _shadow(self, s: Session) -> tuple[str, Stream] | None:
        """For a sampled chunk of a quantized model: its FP base and a fork of the stream on it."""
        rate = self.settings.drift_sample_rate
        if rate <= 0 or s.fell_back or self._rng.random() >= rate:
            return None
        base_id = self._store.record(s.model_id).base
        if base_id is None:
            return None
        try:
            # A model quantized from a file names its base by the file's name: shadow only on that very model.
            if self._store.record(base_id).sha256 != s.stream.model.manifest["base_model"]["sha256"]:
                return None
            base = self._models.get(base_id)
        except UnknownModel:  # quantized from a file the store does not hold (`qarvd quantize --model PATH`)
            return None
        return base_id, s.stream.fork(base)

    def _finish_shadow(self, s: Session, base_id: str, fp: Stream, action: str, frames: np.ndarray) -> None:
        ref = step_streams([fp], [action])[0]  # on the base model's batch buffers (CUDA graphs)
        s.drift_psnr_db = float(psnr(frames, ref).mean())
        self.metrics.drift_psnr.labels(s.model_id).observe(s.drift_psnr_db)
        limit = self.settings.drift_fallback_db
        if limit is not None and s.drift_psnr_db < limit:
            # Continue this session on the FP base from the same state, its held context re-cached in FP.
            s.stream = s.stream.fork(fp.model)
            s.stream.set_prompt(s.stream.prompt)
            s.model_id = base_id
            s.fell_back = True
            self.metrics.drift_fallbacks.labels(base_id).inc()
