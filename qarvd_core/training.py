"""Training recipe for the world presets: diffusion forcing on simulator clips.

What keeps long autoregressive rollouts stable here:
- clips as long as the model's whole attention span (sink + window + current chunk);
- an independent flow time per chunk, a third of them near-clean (what a committed cache
  chunk looks like), so the model learns both to denoise and to use clean context;
- "own-context" augmentation: some clips have their context replaced by the model's own
  one-step predictions, so it learns to continue from imperfect frames and correct them;
- "sink gap" augmentation: the first chunk sometimes comes from much earlier in the walk,
  as it does once the rolling window has moved on.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from qarvd_core.checkpoint import load_model, read_manifest, resolve_weights, save_weights
from qarvd_core.model import ModelArgs, WorldModel
from qarvd_core.sampling import flow_schedule
from qarvd_core.world.scripts import POLICIES, SPLITS, random_walk
from qarvd_core.world.simulator import ACTION_MOTION, ACTIONS, BIOME_NAMES, MAP_TILES, World


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny-world"
    steps: int = 6000
    batch: int = 16
    lr: float = 6e-4
    warmup: int = 200
    weight_decay: float = 0.01
    ema: float = 0.998
    clean_chunk_prob: float = 0.35
    own_context_prob: float = 0.25
    sink_gap_prob: float = 0.3
    seed: int = 0
    # Action scripts of the training clips. Random walks alone are enough: the shipped weights,
    # trained on them, follow patrol and go-and-return scripts too (docs/results.md).
    policies: tuple[str, ...] = ("random_walk",)
    init_from: str | None = None  # start from these weights (a fine-tune) instead of a random init
    checkpoint_every: int = 250
    stop_after: int | None = None  # end early (the schedule still spans `steps`)
    bf16: bool = True
    compile: bool = True

    def __post_init__(self):
        unknown = set(self.policies) - set(POLICIES)
        if not self.policies or unknown:
            raise ValueError(f"policies must be some of {', '.join(POLICIES)}; got {', '.join(self.policies)}")


def make_clip(
    rng: np.random.Generator, args: ModelArgs, sink_gap_prob: float, policies: tuple[str, ...] = ("random_walk",)
) -> tuple[np.ndarray, list[str], int, np.ndarray]:
    """Frames [T, H, W, 3], actions [T], biome id, camera path [T, 2] (x, y in tiles, unwrapped) for one
    training clip (train split only). Across a sink gap the camera moved under actions left out of
    the clip: the path, not the actions, says where its frames were seen."""
    Fr = args.frames_per_chunk
    T = args.context_chunks * Fr
    gap = int(rng.integers(6, 40)) if rng.random() < sink_gap_prob else 0
    biome = int(rng.integers(len(BIOME_NAMES)))
    world = World(BIOME_NAMES[biome], int(rng.integers(SPLITS["train"].start, SPLITS["train"].stop)))
    world.camera = rng.integers(0, MAP_TILES, size=2)
    policy = policies[0] if len(policies) == 1 else policies[int(rng.integers(len(policies)))]
    # Random walks hold each action for 1-8 frames (the shipped weights' recipe).
    actions = random_walk(rng, T + gap, hold=(1, 8)) if policy == "random_walk" else POLICIES[policy](rng, T + gap)
    frames = np.stack([world.step(a) for a in actions])
    keep = np.r_[0:Fr, Fr + gap : T + gap]
    camera = np.cumsum([ACTION_MOTION[a] for a in actions], axis=0)
    return frames[keep], [actions[i] for i in keep], biome, camera[keep]


def sample_times(rng: np.random.Generator, n_chunks: int, clean_prob: float) -> np.ndarray:
    """One flow time per chunk: near-clean, a sampler step, or uniform."""
    sched = flow_schedule()
    out = np.empty(n_chunks)
    for k in range(n_chunks):
        u = rng.random()
        if u < clean_prob:
            out[k] = rng.uniform(0, 0.05)
        elif u < clean_prob + (1 - clean_prob) / 2:
            out[k] = sched[rng.integers(len(sched))]
        else:
            out[k] = rng.uniform(0.02, 1)
    return out


def make_batch(rng, args: ModelArgs, cfg: TrainConfig):
    clips = [make_clip(rng, args, cfg.sink_gap_prob, cfg.policies) for _ in range(cfg.batch)]
    x0 = torch.from_numpy(np.stack([c[0] for c in clips])).permute(0, 1, 4, 2, 3).float() / 127.5 - 1
    acts = torch.tensor([[ACTIONS.index(a) for a in c[1]] for c in clips])
    prompts = torch.tensor([c[2] for c in clips])
    t_chunk = torch.from_numpy(np.stack([sample_times(rng, args.context_chunks, cfg.clean_chunk_prob) for _ in clips]))
    t = t_chunk.float().repeat_interleave(args.frames_per_chunk, dim=1)  # [B, T]
    camera = torch.from_numpy(np.stack([c[3] for c in clips]))
    return x0, acts, prompts, t, camera


def _ckpt_path(out_dir: Path) -> Path:
    return out_dir / "train_state.pt"


def train(cfg: TrainConfig, out_dir: Path, args: ModelArgs | None = None, log=print) -> Path:
    """Train (resuming from out_dir if a state is there); returns the exported weights path.

    `args` overrides the preset's architecture (tests train a miniature model).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    args = args or ModelArgs.from_name(cfg.preset)
    model = WorldModel(args)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    step = 0
    rng = np.random.default_rng(cfg.seed)
    if _ckpt_path(out_dir).exists():
        state = torch.load(_ckpt_path(out_dir), weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        rng = state["rng"]
        if "torch_rng" in state:  # noise and dropout continue as if never interrupted
            torch.set_rng_state(state["torch_rng"])
        log(f"resumed at step {step}")
    elif cfg.init_from:
        start = load_model(cfg.init_from)
        # Any weights of the same shapes will do: a fine-tune may switch position handling
        # (camera_rope), which has no parameters.
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        if {k: v.shape for k, v in start.state_dict().items()} != shapes:
            raise ValueError(f"{cfg.init_from!r} is a {start.args} model, not {args}")
        model.load_state_dict(start.state_dict())
        ema.load_state_dict(start.state_dict())
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, s / cfg.steps)))),
    )
    if step:
        # The schedule is a pure function of the step, so resuming just moves it there.
        sched.last_epoch = step
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * sched.lr_lambdas[0](step)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)
    forward = torch.compile(model) if cfg.compile else model
    bar = tqdm(total=cfg.steps, initial=step, desc="train", mininterval=5)
    log_file = (out_dir / "train_log.jsonl").open("a")
    t_start = time.time()
    last = min(cfg.steps, cfg.stop_after or cfg.steps)
    while step < last:
        x0, acts, prompts, t, camera = make_batch(rng, args, cfg)
        noise = torch.randn_like(x0)
        tb = t[:, :, None, None, None]
        xt = (1 - tb) * x0 + tb * noise
        if rng.random() < cfg.own_context_prob:
            # Replace the context with the model's own one-step guesses from mid noise levels.
            with torch.no_grad(), amp:
                tm = torch.rand(t.shape[0], 1).expand_as(t) * 0.5 + 0.2
                guess = (
                    ema(
                        (1 - tm[..., None, None, None]) * x0 + tm[..., None, None, None] * noise,
                        tm,
                        acts,
                        ema.encode_prompt(prompts),
                        camera=camera,
                    )
                    .float()
                    .clamp(-1, 1)
                )
            ctx = t < 0.05  # near-clean chunks act as context
            xt = torch.where(ctx[..., None, None, None], (1 - tb) * guess + tb * noise, xt)
        with amp:
            pred = forward(xt, t, acts, model.encode_prompt(prompts), camera=camera)
        loss = F.mse_loss(pred.float(), x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - cfg.ema)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log_file.write(
            json.dumps(
                {
                    "step": step,
                    "loss": loss.item(),
                    "grad_norm": gn.item(),
                    "lr": sched.get_last_lr()[0],
                    "elapsed_s": time.time() - t_start,
                }
            )
            + "\n"
        )
        log_file.flush()
        if step % cfg.checkpoint_every == 0 or step == last:
            tmp = out_dir / "train_state.pt.tmp"
            torch.save(
                {
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "rng": rng,
                    "torch_rng": torch.get_rng_state(),
                    "config": asdict(cfg),
                },
                tmp,
            )
            os.replace(tmp, _ckpt_path(out_dir))
            export_weights(ema, out_dir / "model.safetensors", cfg, step, out_dir)
    bar.close()
    return out_dir / "model.safetensors"


def export_weights(model: WorldModel, path: Path, cfg: TrainConfig, step: int, out_dir: Path) -> None:
    """Shippable weights with the exact command that made them (and, for a fine-tune, its start's)."""
    command = (
        f"qarvd train --preset {cfg.preset} --steps {cfg.steps} --batch {cfg.batch} --seed {cfg.seed}"
        f" --lr {cfg.lr:g} --warmup {cfg.warmup} --policies {','.join(cfg.policies)}"
        + (f" --init-from {cfg.init_from}" if cfg.init_from else "")
        + (f" --stop-after {cfg.stop_after}" if cfg.stop_after else "")
        + f" --out {out_dir}"
    )
    info = {}
    if cfg.init_from:
        start = read_manifest(resolve_weights(cfg.init_from))
        info["init_from"] = {k: start.get(k) for k in ("sha256", "train_steps", "command", "init_from")}
    save_weights(model, path, preset=cfg.preset, train_steps=step, train_config=asdict(cfg), command=command, **info)
