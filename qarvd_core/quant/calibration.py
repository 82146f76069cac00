"""Calibration data: per-layer inputs from full-precision rollouts of calibration scenarios
(an action model's worlds from the calibration split, or a text model's prompts).

Each collected row is tagged with the chunk it came from and the flow time of the pass,
so Q-ARVD can weight samples by chunk (S1). Memory is bounded by keeping a random subset
of tokens per forward pass, copied to the CPU in float32 as it is taken, so the captured
activations never hold accelerator memory and grow only with passes x tokens_per_pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from qarvd_core.model import WorldModel
from qarvd_core.sampling import rollout
from qarvd_core.world.scripts import Scenario, scenarios


@dataclass(frozen=True)
class CalibrationSet:
    """Which calibration scenarios to roll out (never the held-out split).

    A text model (no prompt table, e.g. a Wan card) calibrates on `prompts` instead, one
    rollout per prompt (cycling through them if `rollouts` is larger), as the official
    Self-Forcing setting does with 21 latent frames (7 chunks of 3).
    """

    # 16 worlds x 16 tokens per pass keep as many rows as 4 x 64 but from more places, which is
    # worth 3.8 dB to W4A8 GPTQ and 1.0 dB to Q-ARVD on worlds the calibration never saw
    # (docs/results.md, calibration diversity).
    rollouts: int = 16
    chunks: int = 7  # the official setting: 21 frames = 7 chunks of 3
    tokens_per_pass: int = 16  # rows kept per layer per forward pass and stream
    seed: int = 0
    prompts: tuple[str, ...] | None = None
    # Rollouts run together in one batched pass (0: all): the KV cache of one 21-frame rollout of
    # a 1.3B Wan model is gigabytes, so text models calibrate one prompt at a time by default.
    batch: int = 0

    @classmethod
    def from_prompts(cls, prompts: list[str], **kw) -> CalibrationSet:
        """One rollout per prompt; blank prompts are skipped."""
        kept = tuple(p.strip() for p in prompts if p.strip())
        if not kept:
            raise ValueError("no calibration prompts: give at least one non-empty line")
        return cls(rollouts=len(kept), prompts=kept, **{"batch": 1, **kw})

    def scenarios(self, frames_per_chunk: int) -> list[Scenario]:
        frames = self.chunks * frames_per_chunk
        if self.prompts is None:
            return scenarios("calibration", self.rollouts, frames, offset=self.seed * 1000)
        return [
            Scenario(self.prompts[i % len(self.prompts)], 0, self.seed * 1000 + i, ("none",) * frames, "prompt")
            for i in range(self.rollouts)
        ]

    def check(self, model: WorldModel) -> None:
        """Refuse scenarios the model cannot take: biome worlds for a text model, prompts for a biome one."""
        if model.args.n_prompts and self.prompts is not None:
            raise ValueError("this model's prompts are its biomes: calibrate it on the calibration split, not prompts")
        if not model.args.n_prompts and self.prompts is None:
            raise ValueError(
                "this model takes text prompts: calibrate it on a prompt file (qarvd quantize --prompts FILE)"
            )

    def describe(self) -> dict:
        source = {"split": "calibration"} if self.prompts is None else {"prompts": list(self.prompts)}
        return {
            **source,
            "rollouts": self.rollouts,
            "chunks": self.chunks,
            "tokens_per_pass": self.tokens_per_pass,
            "seed": self.seed,
            "batch": self.batch,
        }


@dataclass
class LayerInputs:
    """Rows x [S, in_features] with the chunk index and flow time of each row.

    The rows are kept on the CPU however many rollouts fill them; `stacked` hands them back on
    the layer's device, so a GPU holds one layer's rows at a time."""

    x: list[Tensor] = field(default_factory=list)
    chunk: list[Tensor] = field(default_factory=list)
    t: list[Tensor] = field(default_factory=list)
    device: torch.device = torch.device("cpu")  # the layer's

    def stacked(self) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(torch.cat(v).to(self.device) for v in (self.x, self.chunk, self.t))


class _PassTags:
    """Chunk index and flow time of the forward pass in flight (set by a model pre-hook)."""

    chunk = 0
    t = 0.0


@torch.no_grad()
def collect_inputs(
    model: WorldModel, layers: dict[str, nn.Linear], calib: CalibrationSet, progress: bool = True
) -> dict[str, LayerInputs]:
    """Roll out the calibration scenarios with `model` and record each named layer's inputs."""
    calib.check(model)
    tags = _PassTags()
    gen = torch.Generator().manual_seed(calib.seed)
    store = {name: LayerInputs() for name in layers}

    def tag_pass(_module, args, kwargs):
        cache = kwargs.get("cache")
        tags.chunk = cache.committed if cache is not None else 0
        tags.t = float(args[1].flatten()[0])

    def record(name):
        def hook(_module, inputs, _output):
            x = inputs[0].reshape(inputs[0].shape[0], -1, inputs[0].shape[-1])  # [B, L, in]
            keep = min(calib.tokens_per_pass, x.shape[1])
            idx = torch.randperm(x.shape[1], generator=gen)[:keep]
            rows = x[:, idx].reshape(-1, x.shape[-1]).float().cpu()
            store[name].x.append(rows)
            store[name].device = x.device
            store[name].chunk.append(torch.full((len(rows),), tags.chunk))
            store[name].t.append(torch.full((len(rows),), tags.t))

        return hook

    handles = [model.register_forward_pre_hook(tag_pass, with_kwargs=True)]
    handles += [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    cases = calib.scenarios(model.args.frames_per_chunk)
    size = calib.batch or len(cases)
    batches = [cases[i : i + size] for i in range(0, len(cases), size)]
    bar = tqdm(total=calib.chunks * len(batches), desc="calibration rollouts (chunks)", disable=not progress)
    try:
        for part in batches:
            rollout(
                model,
                [c.biome for c in part],
                [list(c.actions) for c in part],
                [c.noise_seed for c in part],
                on_chunk=lambda k, n: bar.update(1),
            )
    finally:
        bar.close()
        for h in handles:
            h.remove()
    return store
