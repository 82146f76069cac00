"""All service settings, from QARVD_* environment variables (one typed object)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from qarvd_core.runtime import DEVICE_PATTERN


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QARVD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    default_model: str = "tiny-world"
    artifact_dir: Path = Path("artifacts")  # quantized models: NAME.safetensors + NAME.json
    model_cards: list[Path] = Field(default_factory=list, description="Wan model cards served by their file names")
    data_dir: Path = Path(".qarvd")  # the embedded Redis's files
    max_loaded_models: int = Field(4, ge=1, description="models kept in memory; least recently used unload")
    max_sessions: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="admission control: sessions past this are refused (1013); auto: the memory budget over the "
        "bytes one session of the default model was measured to take at load, from 1 to 8 (4 without a budget)",
    )
    memory_budget_gib: float | None = Field(
        None,
        gt=0,
        description="device memory sessions may take (each counted at its model's measured bytes; past it: 1013); "
        "unset: on CUDA 90% of the memory free once the default model is warm, checked against free memory at "
        "each start; on the CPU no budget",
    )
    batch_sessions: bool = True  # sessions due a chunk run in one forward pass
    fps_target: float = Field(16.0, gt=0, description="frames per second each session is paced to")
    idle_timeout_s: float = Field(120.0, gt=0, description="a session with no client message for this long ends")
    outbound_frames: int = Field(6, ge=1, description="frames queued per session; older ones are dropped")
    stats_interval_s: float = 1.0
    max_message_bytes: int = Field(4096, ge=64, description="larger client messages close the socket (1009)")
    actions_per_s: float = Field(60.0, gt=0, description="per-connection rate limit on client messages")
    api_keys: list[str] = Field(default_factory=list, description="when set, required on HTTP and WebSocket")
    allowed_origins: list[str] = Field(default_factory=list, description="WebSocket Origins allowed; empty: any")
    drift_sample_rate: float = Field(0.1, ge=0, le=1, description="fraction of quantized chunks re-run in FP")
    drift_fallback_db: float | None = Field(None, description="below this drift PSNR a session falls back to FP")
    video_max_frames: int = Field(600, ge=1)
    send_buffer_bytes: int | None = Field(None, ge=4096, description="kernel send buffer per connection")
    max_frame_age_s: float = Field(
        0.5, gt=0, description="frames older than this when their turn to be sent comes are dropped (counted)"
    )
    max_concurrent_videos: int = Field(1, ge=1, description="POST /v1/videos renders at once; past it: 503")
    max_body_bytes: int = Field(65536, ge=1024)
    threads: int = Field(0, ge=0, description="torch threads for generation (0: torch's default)")
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="where models, caches and streams live, for the server and the worker: auto (CUDA when "
        "available, else CPU), cpu, cuda or cuda:N; a CUDA device this host lacks stops the start",
    )
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="generation dtype (auto: bf16 on CUDA and where the CPU runs it natively, else fp32); for "
        "quantized models, "
        "of everything around the integer GEMMs",
    )
    compile: bool | None = Field(
        None,
        description="torch.compile each model's blocks (unset: by host, see qarvd_core.runtime); warm-up compiles "
        "every batch size up to max_sessions",
    )
    kernels: Literal["auto", "onednn", "fbgemm", "int_mm", "cuda"] = Field(
        "auto", description="quantized models' integer GEMMs (auto: by device and CPU, see qarvd_core.quant.kernels)"
    )
    compile_max_autotune: bool = Field(
        False,
        description="with compile: frozen weights and AMX GEMM templates; faster streams, each compile takes minutes",
    )
    redis_url: str | None = Field(None, description="jobs queue; `qarvd serve` starts an embedded Redis when unset")
    job_attempts: int = Field(3, ge=1, description="runs of a failing job before it is failed")
    job_heartbeat_s: int = Field(10, ge=2, description="a running job silent this long is retried elsewhere")
    job_retry_delay_s: float = Field(1.0, ge=0, description="first retry delay; doubles each retry")
    worker_threads: int = Field(
        0, ge=0, description="torch threads of a worker (0: torch's default; `qarvd serve`'s: a quarter of the cores)"
    )
    worker_nice: int = Field(
        10, ge=0, le=19, description="a worker lowers its CPU priority by this much: streams on its host come first"
    )
    worker_redis_grace_s: float = Field(
        60.0, gt=0, description="a worker exits (status 1) after Redis is gone this long"
    )


@lru_cache
def get_settings() -> Settings:
    return Settings()
