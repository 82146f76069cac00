"""Prometheus metrics (prefix qarvd_, base units, no per-session or per-job labels)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0)
PSNR_BUCKETS = (20, 25, 30, 33, 35, 38, 40, 45, 50, 60, 100)


class Metrics:
    """One registry per app, so tests can run several apps in one process."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.time_to_first_frame = Histogram(
            "qarvd_time_to_first_frame_seconds",
            "From the start message to the first frame sent",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.chunk_latency = Histogram(
            "qarvd_chunk_generation_seconds",
            "Generation time of one chunk (batched)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.frame_latency = Histogram(
            "qarvd_frame_generation_seconds",
            "Generation time per frame",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "qarvd_batch_sessions",
            "Sessions (or a render) per batched forward pass, by model",
            ["model"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16),
            registry=r,
        )
        self.frames_sent = Counter("qarvd_frames_sent", "Frames sent to clients", ["model"], registry=r)
        self.frames_dropped = Counter("qarvd_frames_dropped", "Frames dropped for slow clients", ["model"], registry=r)
        self.frames_stale = Counter(
            "qarvd_frames_stale",
            "Frames dropped because they were older than QARVD_MAX_FRAME_AGE_S when their turn came (also counted "
            "in qarvd_frames_dropped)",
            ["model"],
            registry=r,
        )
        self.ws_closes = Counter(
            "qarvd_ws_closes",
            "WebSockets closed by the server, by close code (1011: a server failure)",
            ["code"],
            registry=r,
        )
        self.sessions_active = Gauge("qarvd_sessions_active", "Streaming sessions open now", registry=r)
        self.sessions_rejected = Counter("qarvd_sessions_rejected", "Sessions refused", ["reason"], registry=r)
        self.client_errors = Counter(
            "qarvd_client_errors", "Malformed or refused client messages", ["kind"], registry=r
        )
        self.http_server_errors = Counter(
            "qarvd_http_server_errors", "HTTP responses with a 5xx status", ["status"], registry=r
        )
        self.drift_psnr = Histogram(
            "qarvd_drift_psnr_db",
            "PSNR of quantized chunks vs FP recomputation",
            ["model"],
            buckets=PSNR_BUCKETS,
            registry=r,
        )
        self.drift_fallbacks = Counter(
            "qarvd_drift_fallbacks", "Sessions switched to FP by drift", ["model"], registry=r
        )
        self.device_out_of_memory = Counter(
            "qarvd_device_out_of_memory",
            "Chunks that ran out of device memory (their sessions end with 1011; the server keeps serving)",
            ["model"],
            registry=r,
        )
        self.model_load = Gauge("qarvd_model_load_seconds", "Time to load and warm up a model", ["model"], registry=r)
        self.session_bytes = Gauge(
            "qarvd_session_bytes",
            "Device bytes one more session of a model takes, measured when it loaded (its KV and VAE decoder "
            "caches, its rows of a batched chunk's cache copy, on CUDA the chunk's peak beyond them): what "
            "admission counts",
            ["model"],
            registry=r,
        )
        self.max_sessions = Gauge(
            "qarvd_max_sessions", "Sessions admitted at once (QARVD_MAX_SESSIONS resolved)", registry=r
        )
        self.ready = Gauge("qarvd_ready", "1 when the default model is loaded and warmed up", registry=r)

        self.jobs = JobStats()
        r.register(self.jobs)
        self.device_memory = DeviceMemory()
        r.register(self.device_memory)
        self.stream_memory = StreamMemory()
        r.register(self.stream_memory)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class JobStats:
    """Job metrics read from Redis at scrape time (workers write them there): one view for
    every worker process and API replica, whatever their number."""

    def __init__(self):
        self.snapshot: dict | None = None

    def collect(self):
        s = self.snapshot
        if s is None:
            return
        yield GaugeMetricFamily("qarvd_jobs_queue_depth", "Jobs waiting for a worker", value=s["queue_depth"])
        by_state = GaugeMetricFamily("qarvd_jobs", "Jobs by state (newest 1000)", labels=["state"])
        for state, n in s["by_state"].items():
            by_state.add_metric([state], n)
        yield by_state
        runs = CounterMetricFamily(
            "qarvd_job_runs", "Job runs by method and outcome (retried: a failed attempt)", labels=["method", "outcome"]
        )
        secs = CounterMetricFamily("qarvd_job_run_seconds", "Time spent in job runs", labels=["method", "outcome"])
        for (method, outcome), v in s["outcomes"].items():
            runs.add_metric([method, outcome], v.get("count", 0))
            secs.add_metric([method, outcome], v.get("seconds", 0))
        yield runs
        yield secs
        age = GaugeMetricFamily(
            "qarvd_worker_heartbeat_age_seconds", "Seconds since each worker's last beat", labels=["worker"]
        )
        for name, a in s["worker_heartbeat_age"].items():
            age.add_metric([name], a)
        yield age


class StreamMemory:
    """KV-cache bytes held by live sessions and renders, by model (as stored: a quantized cache's
    codes and scales), read at scrape time from `source` (set by the engine)."""

    def __init__(self):
        self.source: Callable[[], dict[str, int]] | None = None

    def collect(self):
        if self.source is None:
            return
        g = GaugeMetricFamily("qarvd_kv_cache_bytes", "KV-cache bytes held by live streams", labels=["model"])
        for model, n in self.source().items():
            g.add_metric([model], n)
        yield g


class DeviceMemory:
    """The CUDA caching allocator's memory, read at scrape time: allocated (live tensors) and
    reserved (held from the driver, allocated included). Absent while the engine runs on the CPU."""

    def __init__(self):
        self.device: torch.device | None = None  # set by the engine when its models live on a CUDA device

    def collect(self):
        if self.device is None or self.device.type != "cuda":
            return
        label = [str(self.device)]
        for name, read, what in (
            ("allocated", torch.cuda.memory_allocated, "held by live tensors"),
            ("reserved", torch.cuda.memory_reserved, "reserved by the caching allocator (allocated included)"),
        ):
            g = GaugeMetricFamily(f"qarvd_device_memory_{name}_bytes", f"Device memory {what}", labels=["device"])
            g.add_metric(label, read(self.device))
            yield g
