"""The streaming engine: sessions, a step loop that batches them, drift shadowing, pacing.

One engine serves every model. Its loop finds the sessions due a chunk, groups them by
model and cache length, and runs each group as one batched forward pass on a single
compute thread, off the event loop. Frames go to each session's small outbound queue,
where the newest frame wins: a slow client loses frames (counted), never grows memory
and never slows the other sessions.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import struct
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from qarvd_core.eval.metrics import psnr
from qarvd_core.sampling import Stream, step_streams
from service.engine.registry import ModelRegistry
from service.metrics import Metrics
from service.settings import Settings


class AtCapacity(RuntimeError):
    pass


def encode_frame(frame: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    kw = {"quality": quality} if fmt in ("jpeg", "webp") else {}
    Image.fromarray(frame).save(buf, format=fmt.upper(), **kw)
    return buf.getvalue()


def frame_message(header: dict, image: bytes) -> bytes:
    """4-byte big-endian header length, UTF-8 JSON header, encoded image."""
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">I", len(h)) + h + image


@dataclass
class Session:
    id: str
    model_id: str
    stream: Stream
    fmt: str
    quality: int
    outbound: asyncio.Queue
    action: str = "none"
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
    failure: str | None = None


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics, registry: ModelRegistry):
        self.settings = settings
        self.metrics = metrics
        self.registry = registry
        self.sessions: dict[str, Session] = {}
        # OpenMP gives each thread that runs torch ops its own team of workers, and two teams
        # on the same cores halve the speed (measured: 24 -> 12 frames/s on 2 cores). So every
        # torch op runs on the one compute thread with all the threads; the event loop's
        # thread is held to one, so it never starts a team of its own.
        self.threads = settings.threads or torch.get_num_threads()
        torch.set_num_threads(1)
        self.executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="qarvd-compute",
            initializer=torch.set_num_threads,
            initargs=(self.threads,),
        )
        self.ready = False
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._rng = random.Random(0)

    # Lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load and warm up the default model (one chunk), then start the step loop."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        model_id = self.settings.default_model
        model = await loop.run_in_executor(self.executor, self.registry.get, model_id)
        # Compiled blocks specialise on the batch size: compile every size the loop can batch now.
        sizes = self.settings.max_sessions if self.settings.compile and self.settings.batch_sessions else 1
        for n in range(1, sizes + 1):
            warm = [Stream(model, "islands", i) for i in range(n)]
            await loop.run_in_executor(self.executor, step_streams, warm, ["none"] * n)
        self.metrics.model_load.labels(model_id).set(time.perf_counter() - t0)
        self._task = asyncio.create_task(self._loop(), name="qarvd-engine")
        self.ready = True
        self.metrics.ready.set(1)

    async def stop(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True, cancel_futures=True)

    # Sessions ------------------------------------------------------------------------

    async def open_session(self, model_id: str, prompt: str, seed: int, fmt: str, quality: int) -> Session:
        if len(self.sessions) >= self.settings.max_sessions:
            self.metrics.sessions_rejected.labels("capacity").inc()
            raise AtCapacity(f"at capacity ({self.settings.max_sessions} sessions)")
        self.registry.path_of(model_id)  # raises UnknownModel before any work
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(self.executor, self.registry.get, model_id)
        stream = await loop.run_in_executor(self.executor, Stream, model, prompt, seed)
        s = Session(
            uuid.uuid4().hex, model_id, stream, fmt, quality, asyncio.Queue(maxsize=self.settings.outbound_frames)
        )
        self.sessions[s.id] = s
        self.metrics.sessions_active.set(len(self.sessions))
        self._wake.set()
        return s

    def models_in_use(self) -> set[str]:
        ids = {s.model_id for s in list(self.sessions.values())} | {self.settings.default_model}
        return ids | {b for m in ids if (b := self.registry.base_of(m)) is not None}  # drift shadows

    def close_session(self, s: Session) -> None:
        s.closed = True
        if self.sessions.pop(s.id, None) is not None:
            self.metrics.sessions_active.set(len(self.sessions))

    def set_action(self, s: Session, action: str) -> None:
        s.action = action

    def set_paused(self, s: Session, paused: bool) -> None:
        s.paused = paused
        if not paused:
            s.next_due = 0.0
            self._wake.set()

    async def set_prompt(self, s: Session, prompt: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self.executor, s.stream.set_prompt, prompt)

    # The step loop ---------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = time.perf_counter()
            due = [s for s in self.sessions.values() if not s.paused and not s.closed and s.next_due <= now]
            if not due:
                waits = [s.next_due - now for s in self.sessions.values() if not s.paused]
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=min(waits, default=1.0))
                except TimeoutError:
                    pass
                continue
            groups: dict[tuple, list[Session]] = defaultdict(list)
            for s in due:
                key = (s.model_id, s.stream.cache.n_chunks) if self.settings.batch_sessions else (s.id,)
                groups[key].append(s)
            for group in groups.values():
                t0 = time.perf_counter()
                try:
                    results = await loop.run_in_executor(self.executor, self._compute, group)
                except Exception as e:  # a compute failure ends these sessions, not the server
                    for s in group:
                        s.failure = f"generation failed: {type(e).__name__}: {e}"
                        self._put(s, None)
                    continue
                elapsed = time.perf_counter() - t0
                self._deliver(group, results, elapsed)

    def _compute(self, group: list[Session]) -> list[list[bytes]]:
        """Runs on the compute thread: one batched chunk, drift shadows, encoding."""
        actions = [s.action for s in group]
        shadows = [self._shadow_snapshot(s) for s in group]
        frames = step_streams([s.stream for s in group], actions)
        for s, snap, fr in zip(group, shadows, frames):
            if snap is not None:
                self._finish_shadow(s, snap, fr)
        return [[encode_frame(f, s.fmt, s.quality) for f in fr] for s, fr in zip(group, frames)]

    def _deliver(self, group: list[Session], results: list[list[bytes]], elapsed: float) -> None:
        fr = group[0].stream.args.frames_per_chunk
        period = fr / self.settings.fps_target
        now = time.perf_counter()
        self.metrics.batch_size.observe(len(group))
        for s, images in zip(group, results):
            self.metrics.chunk_latency.labels(s.model_id).observe(elapsed)
            s.last_chunk_ms = elapsed * 1000
            chunk = s.stream.cache.committed - 1
            for i, img in enumerate(images):
                self.metrics.frame_latency.labels(s.model_id).observe(elapsed / fr)
                header = {
                    "frame": s.frames_generated,
                    "chunk": chunk,
                    "action": s.action,
                    "latency_ms": round(elapsed * 1000 / fr, 2),
                    "ts": time.time(),
                    "index_in_chunk": i,
                }
                s.frames_generated += 1
                self._put(s, frame_message(header, img))
            s.next_due = max(s.next_due + period, now - period)

    def _put(self, s: Session, item: bytes | None) -> None:
        """Enqueue for the client; when the queue is full the oldest frame is dropped (counted)."""
        if s.outbound.full():
            s.outbound.get_nowait()
            s.frames_dropped += 1
            self.metrics.frames_dropped.labels(s.model_id).inc()
        s.outbound.put_nowait(item)

    # Drift shadowing -----------------------------------------------------------------

    def _shadow_snapshot(self, s: Session):
        """For a sampled chunk of a quantized model: the state to re-run it in FP from."""
        rate = self.settings.drift_sample_rate
        if rate <= 0 or s.fell_back or self._rng.random() >= rate:
            return None
        base_id = self.registry.base_of(s.model_id)
        if base_id is None:
            return None
        st = s.stream
        return base_id, st.cache.k.clone(), st.cache.v.clone(), st.cache.n_chunks, st.generator.get_state(), s.action

    def _finish_shadow(self, s: Session, snap, frames: np.ndarray) -> None:
        base_id, k, v, n_chunks, gen_state, action = snap
        fp = Stream(self.registry.get(base_id), s.stream.prompt, 0)
        fp.cache.k.copy_(k)
        fp.cache.v.copy_(v)
        fp.cache.n_chunks = n_chunks
        fp.generator.set_state(gen_state)
        ref = fp.step(action)
        s.drift_psnr_db = float(psnr(frames, ref).mean())
        self.metrics.drift_psnr.labels(s.model_id).observe(s.drift_psnr_db)
        limit = self.settings.drift_fallback_db
        if limit is not None and s.drift_psnr_db < limit:
            # Continue this session on the FP base from the same state.
            s.stream.model = fp.model
            s.stream.set_prompt(s.stream.prompt)  # re-caches the held context with the FP model
            s.model_id = base_id
            s.fell_back = True
            self.metrics.drift_fallbacks.labels(base_id).inc()
