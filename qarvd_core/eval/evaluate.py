"""`qarvd eval`: quality of a model on held-out scenarios.

Against a reference model (the paper's "-FP" protocol), both models roll out the same
held-out worlds with identical prompts, actions and noise seeds, and frames are compared
pairwise. Against the simulator, the generated pixels are checked for what the world
guarantees: the camera moves as commanded, revisited places look the same, and long
streams stay sharp and inside their biome's palette.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qarvd_core.eval import metrics
from qarvd_core.model import WorldModel
from qarvd_core.sampling import DEFAULT_ACTION_GUIDANCE, Stream, rollout, to_uint8
from qarvd_core.world.scripts import random_walk, scenarios
from qarvd_core.world.simulator import BIOME_NAMES
from qarvd_core.world.simulator import rollout as sim_rollout


@dataclass(frozen=True)
class EvalConfig:
    scenarios: int = 8  # held-out worlds, cycling through biomes and policies
    frames: int = 48  # per scenario (16 chunks of 3)
    drift_frames: int = 600  # one long stream per biome; 0 skips the drift streams
    revisit_max_gap: int = 0  # 0: the model's rolling window in frames
    split: str = "heldout"  # "calibration" to compare checkpoints without touching the held-out worlds
    action_guidance: float = DEFAULT_ACTION_GUIDANCE  # the sampler's setting, for every rollout here


def _generate(model: WorldModel, cases, frames: int, action_guidance: float) -> np.ndarray:
    x = rollout(
        model,
        [c.biome for c in cases],
        [list(c.actions)[:frames] for c in cases],
        [c.noise_seed for c in cases],
        action_guidance=action_guidance,
    )
    return to_uint8(x)  # [B, T, H, W, 3]


def _revisit_pairs(camera: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Frame pairs (i, j) showing the same camera position, 2 <= j - i <= max_gap."""
    return [
        (i, j)
        for j in range(len(camera))
        for i in range(max(0, j - max_gap), j - 1)
        if (camera[i] == camera[j]).all() and not (camera[i + 1 : j] == camera[j]).all(axis=1).all()
    ]


def evaluate(
    model: WorldModel,
    reference: WorldModel | None = None,
    cfg: EvalConfig = EvalConfig(),
    progress=lambda stage: None,
    revisit_examples: list | None = None,
) -> dict:
    """The metrics as a dict; `revisit_examples`, if given, receives a few revisit
    pairs as (simulator frame i, simulator frame j, generated i, generated j) for a person to judge."""
    a = model.args
    cases = scenarios(cfg.split, cfg.scenarios, cfg.frames)
    progress("held-out scenarios")
    gen = _generate(model, cases, cfg.frames, cfg.action_guidance)
    T = gen.shape[1]
    truth = [sim_rollout(c.biome, c.world_seed, list(c.actions)[:T]) for c in cases]
    hits = np.stack([metrics.action_hits(g, list(c.actions)) for g, c in zip(gen, cases)])
    sim_hits = np.stack([metrics.action_hits(t["frames"], list(c.actions)) for t, c in zip(truth, cases)])

    max_gap = cfg.revisit_max_gap or a.window_chunks * a.frames_per_chunk
    rev, rev_sim, other, other_sim = [], [], [], []
    for g, t in zip(gen, truth):
        for i, j in _revisit_pairs(t["camera"], max_gap):
            if revisit_examples is not None and len(revisit_examples) < 6 and j - i >= 4:
                revisit_examples.append((t["frames"][i], t["frames"][j], g[i], g[j]))
            rev.append(metrics.psnr(g[i], g[j]))
            rev_sim.append(metrics.psnr(t["frames"][i], t["frames"][j]))
            # What "consistent" is measured against: frame j vs the frames of its window
            # that show other camera positions of the same world.
            ks = [k for k in range(max(0, j - max_gap), j) if (t["camera"][k] != t["camera"][j]).any()]
            other.append(np.mean([metrics.psnr(g[k], g[j]) for k in ks]))
            other_sim.append(np.mean([metrics.psnr(t["frames"][k], t["frames"][j]) for k in ks]))

    result: dict = {
        "frames": int(gen.shape[0] * T),
        "scenarios": len(cases),
        "action_accuracy": float(hits.mean()),
        "action_accuracy_simulator": float(sim_hits.mean()),
        "revisit_pairs": len(rev),
        "revisit_psnr_db": float(np.mean(rev)) if rev else None,
        "revisit_psnr_db_simulator": float(np.mean(rev_sim)) if rev_sim else None,
        "revisit_other_places_psnr_db": float(np.mean(other)) if other else None,
        "revisit_other_places_psnr_db_simulator": float(np.mean(other_sim)) if other_sim else None,
        "action_accuracy_per_policy": {
            p: float(hits[[c.policy == p for c in cases]].mean()) for p in dict.fromkeys(c.policy for c in cases)
        },
        "action_accuracy_per_chunk": _per_chunk(
            np.pad(hits, ((0, 0), (1, 0)), constant_values=np.nan), a.frames_per_chunk
        ),
    }
    if reference is not None:
        progress("reference rollouts")
        ref = _generate(reference, cases, cfg.frames, cfg.action_guidance)
        p, s = metrics.psnr(gen, ref), metrics.ssim(gen, ref)
        ref_hits = np.stack([metrics.action_hits(r, list(c.actions)) for r, c in zip(ref, cases)])
        result |= {
            "psnr_db_mean": float(p.mean()),
            "ssim_mean": float(s.mean()),
            "psnr_db_per_chunk": _per_chunk(p, a.frames_per_chunk),
            # Paired comparisons of two models on the same worlds need the spread across worlds.
            "psnr_db_per_scenario": [float(v) for v in p.mean(axis=1)],
            "reference_action_accuracy": float(ref_hits.mean()),
        }
    if cfg.drift_frames:
        progress("drift streams")
        result["drift"] = _drift(model, cfg.drift_frames, cfg.action_guidance)
    result["config"] = asdict(cfg)
    return result


def evaluate_prompts(model: WorldModel, reference: WorldModel, prompts: list[str], chunks: int, seed: int = 0) -> dict:
    """A text model (a Wan card) against a reference, the "-FP" protocol on prompts: both stream
    each prompt with the same noise seed and their decoded frames are compared pairwise."""
    psnr, ssim = [], []  # per prompt: [frames]
    per_chunk: list[list[float]] = [[] for _ in range(chunks)]
    for i, prompt in enumerate(prompts):
        ours, theirs = Stream(model, prompt, seed + i), Stream(reference, prompt, seed + i)
        p, s = [], []
        for k in range(chunks):
            a, b = ours.step(), theirs.step()
            p.append(metrics.psnr(a, b))
            s.append(metrics.ssim(a, b))
            per_chunk[k].append(float(p[-1].mean()))
        psnr.append(np.concatenate(p))
        ssim.append(np.concatenate(s))
    return {
        "psnr_db_mean": float(np.concatenate(psnr).mean()),
        "ssim_mean": float(np.concatenate(ssim).mean()),
        "psnr_db_per_chunk": [float(np.mean(c)) for c in per_chunk],
        "psnr_db_per_prompt": [float(p.mean()) for p in psnr],
        "config": {"prompts": list(prompts), "chunks": chunks, "seed": seed},
    }


# A quantized text model is measured against its base on its calibration prompts under noise seeds
# the calibration never drew (it draws seed * 1000 + i): no held-out prompt set ships with a card.
PROMPT_EVAL_CHUNKS, PROMPT_EVAL_SEED = 3, 10**6


def quantization_metrics_on_prompts(qmodel: WorldModel, base: WorldModel, prompts: list[str]) -> dict:
    """What `qarvd quantize` and a job store for a text model: -FP PSNR/SSIM on its calibration prompts."""
    r = evaluate_prompts(qmodel, base, prompts, PROMPT_EVAL_CHUNKS, PROMPT_EVAL_SEED)
    out = {k: r[k] for k in ("psnr_db_mean", "ssim_mean", "psnr_db_per_chunk")}
    out["protocol"] = (
        f"-FP on the {len(prompts)} calibration prompts x {PROMPT_EVAL_CHUNKS} chunks, noise seeds "
        f"from {PROMPT_EVAL_SEED} (unseen in calibration)"
    )
    return out


def _per_chunk(per_frame: np.ndarray, frames_per_chunk: int) -> list[float]:
    B, T = per_frame.shape
    return [float(v) for v in np.nanmean(per_frame.reshape(B, T // frames_per_chunk, -1), axis=(0, 2))]


def _drift(model: WorldModel, frames: int, action_guidance: float) -> dict:
    """One long random-walk stream per biome on held-out worlds: sharpness and palette over time."""
    cases = scenarios("heldout", len(BIOME_NAMES), frames, offset=1000)
    rng = np.random.default_rng(0)
    walks = [random_walk(rng, frames) for _ in cases]
    seeds = [c.noise_seed for c in cases]
    gen = to_uint8(rollout(model, [c.biome for c in cases], walks, seeds, action_guidance=action_guidance))
    T = gen.shape[1]
    sharp_ref = np.array(
        [metrics.sharpness(sim_rollout(c.biome, c.world_seed, w[:T])["frames"]).mean() for c, w in zip(cases, walks)]
    )
    sharp = metrics.sharpness(gen) / sharp_ref[:, None]  # [B, T], 1.0 = as crisp as the simulator
    pal = np.stack([metrics.palette_error(g, c.biome) for g, c in zip(gen, cases)])  # [B, T]
    hits = np.stack([metrics.action_hits(g, w[:T]) for g, w in zip(gen, walks)])
    edge = min(100, T // 3)
    bucket = max(1, T // 20)
    return {
        "frames": int(T),
        "streams": len(cases),
        "sharpness_ratio_first": float(sharp[:, :edge].mean()),
        "sharpness_ratio_last": float(sharp[:, -edge:].mean()),
        "palette_error_first": float(pal[:, :edge].mean()),
        "palette_error_last": float(pal[:, -edge:].mean()),
        "action_accuracy_first": float(hits[:, :edge].mean()),
        "action_accuracy_last": float(hits[:, -edge:].mean()),
        "curve_frame": list(range(0, T - T % bucket, bucket)),
        "sharpness_curve": [float(v) for v in sharp[:, : T - T % bucket].reshape(len(cases), -1, bucket).mean((0, 2))],
        "palette_error_curve": [
            float(v) for v in pal[:, : T - T % bucket].reshape(len(cases), -1, bucket).mean((0, 2))
        ],
    }


def write_report(result: dict, json_path: Path, title: str, revisit_examples: list | None = None) -> list[Path]:
    """JSON, a Markdown table and PNG plots side by side; returns the paths written.

    A world model's result (`evaluate`) gets its action, revisit and drift rows and plots; a text
    model's (`evaluate_prompts`) its -FP rows and PSNR per chunk and per prompt. With
    `revisit_examples` (from `evaluate`), also NAME-revisits.png: one row per pair, simulator then
    model, the first visit left of the return.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    text_model = "prompts" in result["config"]
    rows = _prompt_rows(result) if text_model else _world_rows(result)
    made_by = [f"Made by `{result['command']}`.", ""] if result.get("command") else []
    md = [f"# {title}", "", *made_by, "| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows]
    md_path = json_path.with_suffix(".md")
    md_path.write_text("\n".join(md) + "\n")

    panels = 2 if text_model or "psnr_db_per_chunk" not in result else 3
    fig, axes = plt.subplots(1, panels, figsize=(13 if panels == 3 else 9, 3.6))
    (_prompt_plots if text_model else _world_plots)(axes, result)
    fig.tight_layout()
    if result.get("command"):
        fig.text(0.0, 1.0, result["command"], fontsize=7, family="monospace", va="bottom")
    png = json_path.with_suffix(".png")
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    written = [json_path, md_path, png]
    if revisit_examples:
        from PIL import Image

        gap = np.full_like(revisit_examples[0][0][:, :4], 255)
        strips = [np.concatenate([a, b, gap, c, d], axis=1) for a, b, c, d in revisit_examples]
        strip = np.concatenate([np.concatenate([r, np.full_like(r[:4], 255)]) for r in strips])
        path = json_path.with_name(json_path.stem + "-revisits.png")
        Image.fromarray(strip).resize((strip.shape[1] * 3, strip.shape[0] * 3), Image.NEAREST).save(path)
        written.append(path)
    return written


def _world_rows(result: dict) -> list[tuple[str, object]]:
    d = result["drift"]
    rows = [
        (f"action accuracy ({result['config']['split']})", result["action_accuracy"]),
        (
            "action accuracy by script",
            ", ".join(f"{p} {v:.3f}" for p, v in result["action_accuracy_per_policy"].items()),
        ),
        ("action accuracy of the simulator's own frames (metric ceiling)", result["action_accuracy_simulator"]),
        ("action guidance (sampler setting)", result["config"]["action_guidance"]),
        (
            "revisit PSNR dB (simulator's own)",
            f"{_fmt(result['revisit_psnr_db'])} ({_fmt(result['revisit_psnr_db_simulator'])})",
        ),
        (
            "same frames vs other places in their window, PSNR dB (simulator's own)",
            f"{_fmt(result.get('revisit_other_places_psnr_db'))}"
            f" ({_fmt(result.get('revisit_other_places_psnr_db_simulator'))})",
        ),
        (
            f"drift: sharpness vs simulator, first/last {min(100, d['frames'] // 3)} of {d['frames']} frames",
            f"{d['sharpness_ratio_first']:.3f} / {d['sharpness_ratio_last']:.3f}",
        ),
        (
            "drift: palette error (RGB units), first/last",
            f"{d['palette_error_first']:.2f} / {d['palette_error_last']:.2f}",
        ),
        ("drift: action accuracy, first/last", f"{d['action_accuracy_first']:.3f} / {d['action_accuracy_last']:.3f}"),
    ]
    if "psnr_db_mean" in result:
        rows[:0] = [
            ("PSNR dB vs reference", result["psnr_db_mean"]),
            ("SSIM vs reference", result["ssim_mean"]),
            ("reference action accuracy", result["reference_action_accuracy"]),
        ]
    return rows


def _prompt_rows(result: dict) -> list[tuple[str, object]]:
    c = result["config"]
    return [
        ("PSNR dB vs reference", result["psnr_db_mean"]),
        ("SSIM vs reference", result["ssim_mean"]),
        ("PSNR dB per chunk", ", ".join(f"{v:.2f}" for v in result["psnr_db_per_chunk"])),
        ("PSNR dB per prompt", ", ".join(f"{v:.2f}" for v in result["psnr_db_per_prompt"])),
        ("prompts x chunks (noise seeds)", f"{len(c['prompts'])} x {c['chunks']} (from {c['seed']})"),
    ]


def _world_plots(axes, result: dict) -> None:
    d = result["drift"]
    axes[0].plot(d["curve_frame"], d["sharpness_curve"], label="sharpness / simulator")
    axes[0].plot(d["curve_frame"], np.array(d["palette_error_curve"]) / 10, label="palette error / 10")
    axes[0].set(xlabel="frame", title=f"drift over a {d['frames']}-frame stream")
    axes[0].legend()
    axes[1].plot(result["action_accuracy_per_chunk"], marker="o")
    axes[1].set(xlabel="chunk", ylabel="action accuracy", ylim=(0, 1.05), title="action following per chunk")
    if "psnr_db_per_chunk" in result:
        axes[2].plot(result["psnr_db_per_chunk"], marker="o")
        axes[2].set(xlabel="chunk", ylabel="PSNR dB", title="PSNR vs reference per chunk")


def _prompt_plots(axes, result: dict) -> None:
    axes[0].plot(result["psnr_db_per_chunk"], marker="o")
    axes[0].set(xlabel="chunk", ylabel="PSNR dB", title="PSNR vs reference per chunk")
    per_prompt = result["psnr_db_per_prompt"]
    axes[1].bar(range(len(per_prompt)), per_prompt)
    axes[1].set(xlabel="prompt (line of the prompts file)", ylabel="PSNR dB", title="PSNR vs reference per prompt")


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)
