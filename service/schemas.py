"""Wire formats: WebSocket messages and REST bodies. Unknown fields are refused everywhere."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qarvd_core.quant.kv import KVQuantConfig
from qarvd_core.recipes import RECIPES
from qarvd_core.world.simulator import ACTIONS, BIOME_NAMES
from service.store import MODEL_ID_PATTERN

ModelId = Annotated[str, Field(pattern=MODEL_ID_PATTERN, examples=["tiny-world"])]
MAX_PROMPT_CHARS = 2000
# A biome name for a model with a prompt table, free text for a text model: the engine checks
# it against the model (service.engine.check_prompt), which only it has loaded.
Prompt = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description=f"a biome ({', '.join(BIOME_NAMES)}; default islands) or, for a text model, free text",
    ),
]
Action = Literal[ACTIONS]  # type: ignore[valid-type]
Method = Literal[tuple(RECIPES)]  # type: ignore[valid-type]  # every method is a recipe of its defaults


class JobState(StrEnum):
    """A quantization job's state, as views report it and `?status=` filters by it."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# Client -> server ----------------------------------------------------------------------


class StartMsg(Strict):
    type: Literal["start"]
    model: ModelId | None = None
    prompt: Prompt | None = None
    seed: int = Field(0, ge=0, le=2**31 - 1)
    format: Literal["jpeg", "webp", "png"] = "jpeg"
    quality: int = Field(80, ge=10, le=100)


class ActionMsg(Strict):
    type: Literal["action"]
    action: Action


class PromptMsg(Strict):
    type: Literal["prompt"]
    prompt: Prompt


class ControlMsg(Strict):
    type: Literal["pause", "resume", "stop"]


ClientMsg = Annotated[StartMsg | ActionMsg | PromptMsg | ControlMsg, Field(discriminator="type")]


# REST --------------------------------------------------------------------------------


class VideoRequest(Strict):  # strict: "seed": false is an error, not 0
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "tiny-world", "prompt": "islands", "seed": 3, "actions": "right*24,down*24"},
                {"model": "self-forcing", "prompt": "a red fox runs through snow", "chunks": 7},
            ]
        },
    )
    model: ModelId | None = Field(None, description="model id; the server's default model when omitted")
    prompt: Prompt | None = None
    seed: int = Field(0, ge=0, le=2**31 - 1)
    actions: str | None = Field(
        None, min_length=1, max_length=2000, description="action script, e.g. 'right*24,up*8' (action models)"
    )
    chunks: int | None = Field(None, ge=1, le=256, description="length in chunks (models without actions)")
    fps: int = Field(16, ge=1, le=60)
    scale: int = Field(4, ge=1, le=8)


class ModelInfo(BaseModel):
    id: str
    kind: Literal["base", "quantized"]
    base: str | None = None
    method: str | None = None
    w_bits: int | None = None
    a_bits: int | None = None
    sha256: str
    size_bytes: int
    metrics: dict | None = None
    created: str | None = None
    kv_cache: dict | None = Field(
        None, description="how its streams store their KV cache: sink_bits, window_bits, rotate; null: full precision"
    )
    speed_warning: str | None = Field(
        None, description="set when the model, once loaded, measured slower than FP32 on this host's kernels"
    )


class JobRequest(Strict):  # strict: "seed": false or "w_bits": 8.0 is an error
    """A calibration/quantization job."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "base_model": "tiny-world",
                    "method": "qarvd",
                    "w_bits": 4,
                    "a_bits": 8,
                    "options": {"recon_iters": 500},
                    "calibration_rollouts": 16,
                    "calibration_chunks": 7,
                    "seed": 0,
                }
            ]
        },
    )
    base_model: ModelId
    method: Method = Field(
        ..., description="a method, or a named recipe of one (a method with preset options, which `options` override)"
    )
    w_bits: int = Field(8, ge=2, le=8)
    a_bits: int = Field(8, ge=2, le=8)
    options: dict[str, bool | int | float | str | None | list[bool | int | float | str]] = Field(
        default_factory=dict,
        description="the method's config fields, checked against its types and ranges, e.g. "
        "{'frame_weighting': false, 'recon_iters': 500, 'keep_fp': ['head']}; not method, w_bits or a_bits",
    )
    calibration_rollouts: int = Field(16, ge=1, le=256)
    calibration_prompts: list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]] | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="a text model's calibration prompts, one rollout each (calibration_rollouts unused)",
    )
    calibration_chunks: int = Field(7, ge=2, le=32)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    evaluate: bool = True
    kv_bits: str | None = Field(
        None,
        max_length=8,
        examples=["auto", "8,4", "8"],
        description="KV-cache bits the model's streams use, saved in its checkpoint: 8, 4, SINK,WINDOW (e.g. 8,4), "
        "auto (8,4) or 16; null: full precision",
    )

    @field_validator("kv_bits")
    @classmethod
    def _kv_bits(cls, value: str | None) -> str | None:
        if value is not None:
            KVQuantConfig.parse(value)  # a ValueError becomes a 422 naming the field
        return value


class JobView(BaseModel):
    id: str
    status: JobState
    stage: str
    progress: float
    attempts: int
    error: str | None
    request: dict
    result_model: str | None
    metrics: dict | None
    expected_model: str | None
    created: float | None = Field(description="submitted (seconds since the epoch)")
    started: float | None = Field(None, description="the current or last attempt started")
    finished: float | None = Field(None, description="reached a final state")
