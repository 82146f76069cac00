"""The streaming engine: sessions, a step loop that batches them, drift shadowing, pacing.

The routes' one way in to generation and models: open a session and act on it
(`open_session`, `set_action`, `set_prompt`, `set_paused`, `close_session`), render a
video (`render_video`), and list, describe and delete models (`models`, `model`,
`delete_model`).

One engine serves every model. Its loop finds the sessions due a chunk, groups them by
model and cache length, and runs each group as one batched forward pass on a single
compute thread, off the event loop. Frames go to each session's small outbound queue,
where the newest frame wins: a slow client loses frames (counted), never grows memory
and never slows the other sessions.

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
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from qarvd_core import runtime
from qarvd_core.checkpoint import DTYPES
from qarvd_core.eval.metrics import psnr
from qarvd_core.model import WorldModel
from qarvd_core.sampling import ScriptRender, Stream, step_streams
from qarvd_core.video import encode_mp4
from qarvd_core.world.simulator import BIOME_NAMES
from service.engine.loaded import LoadedModels
from service.metrics import Metrics
from service.settings import Settings
from service.store import ModelRecord, ModelStore, UnknownModel

log = logging.getLogger("qarvd")


class AtCapacity(RuntimeError):
    pass


def session_bytes(args, dtype: torch.dtype) -> int:
    """Device memory one more stream needs, estimated: its KV cache, its rows of the batched copy
    a chunk works on, and one chunk's widest activations (the FFN's) in float32."""
    cache = 2 * args.n_layers * args.n_heads * args.context_chunks * args.chunk_tokens * args.head_dim
    return 2 * cache * dtype.itemsize + 4 * args.chunk_tokens * (args.ffn_dim + 4 * args.dim)


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


def frame_message(header: dict, image: bytes) -> bytes:
    """4-byte big-endian header length, UTF-8 JSON header, encoded image."""
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">I", len(h)) + h + image


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
        self._models = LoadedModels(
            store,
            settings.max_loaded_models,
            in_use=self.models_in_use,
            dtype=DTYPES[self.plan.dtype],
            compile_blocks=self.plan.compile,
            compile_quantized=quantized_plan.compile,
            max_autotune=settings.compile_max_autotune,
            device=self.plan.device,
        )
        self.sessions: dict[str, Session] = {}
        self.renders: list[Render] = []
        # Slots taken by sessions and renders still being set up (on the compute thread): admission
        # counts them, so concurrent starts cannot all see the same free slot.
        self._opening = 0
        self._rendering = 0
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
        self.ready = False
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._rng = random.Random(0)

    async def _on_compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # Lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load and warm up the default model (one chunk), then start the step loop."""
        t0 = time.perf_counter()
        model_id = self.settings.default_model
        model = await self._on_compute(self._models.get, model_id)
        # Compiled blocks specialise on the batch size: compile every size the loop can batch now.
        sizes = self.settings.max_sessions if self._models.compiles(model) and self.settings.batch_sessions else 1
        for n in range(1, sizes + 1):
            warm = [Stream(model, DEFAULT_BIOME, i) for i in range(n)]  # any text prompts a text model
            await self._on_compute(step_streams, warm, [idle_action(model)] * n)
        self.metrics.model_load.labels(model_id).set(time.perf_counter() - t0)
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
        self._executor.shutdown(wait=True, cancel_futures=True)

    # Sessions ------------------------------------------------------------------------

    def _admit_on_device(self, model_id: str) -> None:
        """On a CUDA device, raise AtCapacity when it has no room for one more stream of the model."""
        if self.device.type != "cuda":
            return
        model = self._models.get(model_id)
        need = session_bytes(model.args, next(model.parameters()).dtype)
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if need > free:
            self.metrics.sessions_rejected.labels("device_memory").inc()
            raise AtCapacity(f"not enough device memory for another stream ({need / 2**20:.0f} MiB needed)")

    def _new_stream(self, model_id: str, prompt: str | None, seed: int) -> Stream:
        model = self._models.get(model_id)
        return Stream(model, check_prompt(model, prompt), seed)

    async def open_session(self, model_id: str, prompt: str | None, seed: int, fmt: str, quality: int) -> Session:
        """A live session; raises AtCapacity, UnknownModel, or NotForModel for a prompt the model does not take."""
        if self.closing:
            raise AtCapacity("the server is restarting")
        if len(self.sessions) + self._opening >= self.settings.max_sessions:
            self.metrics.sessions_rejected.labels("capacity").inc()
            raise AtCapacity(f"at capacity ({self.settings.max_sessions} sessions)")
        self._store.path_of(model_id)  # raises UnknownModel before any work
        # The slot is taken before the first await and given back if the set-up fails.
        self._opening += 1
        try:
            await self._on_compute(self._admit_on_device, model_id)
            stream = await self._on_compute(self._new_stream, model_id, prompt, seed)
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
            await self._on_compute(self._admit_on_device, model_id)
            stream = await self._on_compute(self._new_stream, model_id, prompt, seed)
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
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=min(waits, default=1.0))
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
        try:
            results = await self._on_compute(self._compute, group, actions, prompts)
        except Exception as e:  # a compute failure ends these sessions and renders, not the server
            out_of_memory = isinstance(e, torch.cuda.OutOfMemoryError)
            message = "out of device memory" if out_of_memory else f"{type(e).__name__}: {e}"
            self._fail(group, f"generation failed: {message}")
        else:
            self._deliver(group, actions, results, time.perf_counter() - t0)
            return
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
        """Runs on the compute thread: pending prompts, one batched chunk, drift shadows, encoding."""
        for x, prompt in zip(group, prompts):
            if prompt is not None:
                x.stream.set_prompt(prompt)
        shadows = [self._shadow(x) if isinstance(x, Session) else None for x in group]
        frames = step_streams([x.stream for x in group], actions)
        for x, shadow, action, fr in zip(group, shadows, actions, frames):
            if shadow is not None:
                self._finish_shadow(x, *shadow, action, fr)
        return [
            [encode_frame(f, x.fmt, x.quality) for f in fr] if isinstance(x, Session) else fr
            for x, fr in zip(group, frames)
        ]

    def _deliver(self, group: list[Session | Render], actions: list, results: list, elapsed: float) -> None:
        now = time.perf_counter()
        self.metrics.batch_size.labels(group[0].model_id).observe(len(group))
        for x, action, result in zip(group, actions, results):
            if isinstance(x, Render):
                x.script.add(result)
                x.waiting_since, x.last_chunk_s = now, elapsed
                if x.script.done:
                    self._finish_render(x, None)
                continue
            s = x
            self.metrics.chunk_latency.labels(s.model_id).observe(elapsed)
            s.last_chunk_ms = elapsed * 1000
            chunk = s.stream.cache.committed - 1
            fr = len(result)  # frames_per_chunk, or a Wan model's decoded frames: 9, then 12 a chunk
            for i, img in enumerate(result):
                self.metrics.frame_latency.labels(s.model_id).observe(elapsed / fr)
                header = {
                    "frame": s.frames_generated,
                    "chunk": chunk,
                    "action": action,
                    "latency_ms": round(elapsed * 1000 / fr, 2),
                    "ts": time.time(),
                    "index_in_chunk": i,
                }
                s.frames_generated += 1
                self._put(s, OutFrame(now, frame_message(header, img)))
            period = fr / self.settings.fps_target
            s.next_due = max(s.next_due + period, now - period)

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
        ref = fp.step(action)
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
