"""Speed, size and fidelity of deploy-mode quantization vs FP32, BF16 and torchao, in one run.

For each model: FP32 and BF16, eager and with the transformer blocks compiled
(`WorldModel.compile_blocks`, plain and with `max_autotune`: frozen weights, AMX GEMM
templates); qarvd W8A8 and W4A8 in deploy mode (integer GEMMs, bf16 around them; RTN with
static per-tensor activations, and ViDiT-Q's per-token dynamic activations, the scheme
torchao's int8 dynamic config uses; asymmetric weights as the paper, and symmetric ones,
which need no zero-point term), eager and compiled both ways; torchao's
Int8DynamicActivationInt8WeightConfig and Int8WeightOnlyConfig on the same layers of the
bf16 model, compiled the same way. Reported as ratios from the same process: streaming
frames/s (`qarvd bench`; every variant is timed once per round, `--rounds` rounds interleaved,
so each ratio is the median of per-round ratios and the range over rounds shows the noise),
time in the linear layers alone (all block linears in one function, eager or compiled as the
variant is), bytes of the quantized layers, the SQNR of one denoiser pass against FP32 on
identical inputs, and PSNR of a short rollout against the FP32 model on identical noise.

    pip install -e ".[bench]"   # torchao, the peer
    python benchmarks/quant_speed.py --models tiny-world small-world --out benchmarks/results/quant_speed

`--sessions N` streams N sessions in one batched pass (as the server batches them; the linear
layers then see N times the rows); `--only LABEL ...` runs only those variants (and FP32, the base).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from qarvd_core.checkpoint import load_model
from qarvd_core.eval.bench import bench_stream
from qarvd_core.eval.metrics import psnr
from qarvd_core.model import KVCache, ModelArgs, WorldModel, compile_inference
from qarvd_core.quant import CalibrationSet, RTNConfig, config_from_dict, quantize, set_compute_dtype, set_mode
from qarvd_core.quant.api import DEFAULT_KEEP_FP, target_linears
from qarvd_core.quant.methods import ViDiTQConfig
from qarvd_core.sampling import action_ids, flow_schedule, prompt_id, rollout, to_uint8

# The most accurate W8A8 setting on held-out worlds (benchmarks/results/quant_quality_w8a8_camera_heldout32):
# GPTQv2's act-aware rounding with per-token activations, the recipe Q-ARVD's ablation reaches without its switches.
GPTQ_ACT_PER_TOKEN = config_from_dict({"method": "gptq-act-per-token", "w_bits": 8, "a_bits": 8})
COMPILED, MAX_AUTOTUNE = "compiled", "max-autotune"  # how a variant's blocks are compiled (None: eager)
ROLLOUT = (["islands", "desert"], [["right"] * 12, ["down"] * 6 + ["left"] * 6], [1, 2])


def model_named(name: str) -> WorldModel:
    try:
        return load_model(name)
    except ValueError:  # a preset without shipped weights: speed does not depend on the values
        torch.manual_seed(0)
        m = WorldModel(ModelArgs.from_name(name))
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return m.eval()


def block_linears(model: WorldModel, names: list[str]) -> dict:
    """The same layers in any variant: nn.Linear, QuantLinear/DualScale, or torchao-swapped."""
    return {n: model.get_submodule(n) for n in names}


def linear_ms(model: WorldModel, names: list[str], tokens: int, compiled: str | None, repeats: int = 20) -> float:
    """Time of the transformer blocks' linear layers for one forward pass on `tokens` rows."""
    layers = block_linears(model, names)
    dtype = next(model.parameters()).dtype
    inputs = [torch.randn(tokens, m.in_features, dtype=dtype) for m in layers.values()]

    def run(xs):
        return [m(x) for m, x in zip(layers.values(), xs)]

    fn = compile_inference(run, compiled == MAX_AUTOTUNE) if compiled else run
    with torch.no_grad():
        for _ in range(3):
            fn(inputs)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(inputs)
    return (time.perf_counter() - t0) / repeats * 1000


def layer_bytes(model: WorldModel, names: list[str]) -> int:
    """Serialized bytes of those layers (counts packed integers and torchao tensors alike)."""
    buf = io.BytesIO()
    torch.save({n: m.state_dict() for n, m in block_linears(model, names).items()}, buf)
    return buf.tell()


def fidelity(model: WorldModel, ref_frames) -> float:
    return float(psnr(to_uint8(rollout(model, *ROLLOUT)), ref_frames).mean())


@torch.no_grad()
def pass_sqnr(model: WorldModel, fp32: WorldModel) -> float:
    """SQNR (dB) of one denoiser pass vs FP32 on identical inputs: the first chunk of both
    rollout streams, as the FP32 model generates it, noised to each of the sampler's flow
    times (x_t = (1 - t) x0 + t noise), empty cache.

    A rollout's PSNR compounds the error through the cache and the guidance, so two runs of
    the same weights can differ by several dB; this measures the quantization error alone.
    The inputs lie on the data: pure noise labelled with a small t is no input the model
    ever sees, and it penalises activation ranges fitted to real inputs.
    """
    a = fp32.args
    g = torch.Generator().manual_seed(0)
    times = flow_schedule()
    B, Fr = 2 * len(times), a.frames_per_chunk
    clean = rollout(fp32, *ROLLOUT)[:, :Fr].repeat_interleave(len(times), dim=0)
    t = torch.tensor(times).repeat(2)[:, None].expand(B, Fr).contiguous()
    tt = t[:, :, None, None, None]
    x = (1 - tt) * clean + tt * torch.randn(clean.shape, generator=g)
    prompts = torch.tensor([prompt_id(p) for p in ROLLOUT[0] for _ in times])
    acts = torch.stack([action_ids(s[:Fr]) for s in ROLLOUT[1] for _ in times])
    dtype = next(model.parameters()).dtype

    def run(m, dt):
        cache = KVCache(a, B, dtype=dt)
        return m(x.to(dt), t, acts, m.encode_prompt(prompts), cache=cache).float()

    ref = run(fp32, torch.float32)
    noise = (run(model, dtype) - ref).pow(2).sum().clamp_min(1e-30)
    return min(float(10 * torch.log10(ref.pow(2).sum() / noise)), 100.0)  # 100: identical, as psnr()


def variants(fp32: WorldModel, calib: CalibrationSet, wanted=lambda label: True):
    """(label, model, compile mode) for every variant; compiled ones get `compile_blocks()`.
    Quantizes only for the labels `wanted` can accept (calibrating a skipped variant costs minutes)."""
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    yield "fp32", fp32, None
    yield "bf16", bf16, None
    yield "fp32 compiled", copy.deepcopy(fp32), COMPILED
    yield "bf16 compiled", copy.deepcopy(bf16), COMPILED
    yield "bf16 max-autotune", copy.deepcopy(bf16), MAX_AUTOTUNE
    for label, cfg in (
        ("qarvd W8A8", RTNConfig(w_bits=8, a_bits=8)),
        ("qarvd W8A8 symmetric weights", RTNConfig(w_bits=8, a_bits=8, w_symmetric=True)),
        ("qarvd W4A8", RTNConfig(w_bits=4, a_bits=8)),
        ("qarvd W4A8 symmetric weights", RTNConfig(w_bits=4, a_bits=8, w_symmetric=True)),
        ("qarvd W8A8 per-token (vidit-q)", ViDiTQConfig(w_bits=8, a_bits=8)),
        ("qarvd W8A8 per-token (Q-ARVD, act-aware rounding)", GPTQ_ACT_PER_TOKEN),
        ("qarvd W8A8 per-token symmetric weights (Q-ARVD)", replace(GPTQ_ACT_PER_TOKEN, w_symmetric=True)),
    ):
        if not any(wanted(f"{label} deploy ({how})") for how in ("eager", COMPILED, MAX_AUTOTUNE)):
            continue
        q = quantize(fp32, cfg, calib, progress=False)
        set_mode(set_compute_dtype(q, torch.bfloat16), "deploy")
        if label == "qarvd W8A8":
            yield f"{label} deploy (eager)", q, None
        yield f"{label} deploy (compiled)", copy.deepcopy(q), COMPILED
        yield f"{label} deploy (max-autotune)", copy.deepcopy(q), MAX_AUTOTUNE
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return
    for label, cfg in (
        ("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig()),
        ("torchao int8 weight-only", Int8WeightOnlyConfig()),
    ):
        m = copy.deepcopy(bf16)
        quantize_(m, cfg, filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear) and name.startswith("blocks."))
        yield f"{label} (eager)", m, None
        yield f"{label} (compiled)", copy.deepcopy(m), COMPILED


def ratio(rows: dict, label: str, ref: str, spread: bool = False) -> str:
    """Median per-round frames/s ratio to `ref` (with the range if `spread`); blank where `ref` did not run."""
    if "round_fps" not in rows.get(ref, {}):
        return ""
    r = np.asarray(rows[label]["round_fps"]) / np.asarray(rows[ref]["round_fps"])
    return f"{np.median(r):.2f}" + (f" ({r.min():.2f}-{r.max():.2f})" if spread and len(r) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-world", "small-world"])
    ap.add_argument("--chunks", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quant_speed"))
    ap.add_argument("--sessions", type=int, default=1, help="streams stepped together in one batched pass")
    ap.add_argument("--only", nargs="+", help="variant labels to run (FP32 always runs: it is the base)")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds, variants interleaved (ratios: medians)")
    a = ap.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    calib = CalibrationSet(rollouts=2, chunks=4, tokens_per_pass=64)  # small: speed does not depend on it
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "models": {}}
    results["sessions"] = a.sessions
    title = f"# Deploy-mode speed and size ({results['threads']} threads, torch {torch.__version__}"
    md = [title + (f", {a.sessions} sessions batched)" if a.sessions > 1 else ")"), ""]

    def wanted(label: str) -> bool:
        return not a.only or label == "fp32" or label in a.only

    for name in a.models:
        fp32 = model_named(name)
        names = [n for n in target_linears(fp32, DEFAULT_KEEP_FP) if n.startswith("blocks.")]
        ref = to_uint8(rollout(fp32, *ROLLOUT))
        rows, built = {}, []
        for label, m, compiled in variants(fp32, calib, wanted):
            if not wanted(label):
                continue
            if compiled:
                m.compile_blocks(max_autotune=compiled == MAX_AUTOTUNE)
            try:
                bench_stream(m, chunks=2, warmup=3, sessions=a.sessions)  # compiles here, outside the timing
                rows[label] = {
                    "linear_ms": linear_ms(m, names, fp32.args.chunk_tokens * a.sessions, compiled),
                    "layer_bytes": layer_bytes(m, names),
                    "psnr_db_vs_fp32": fidelity(m, ref),
                    "pass_sqnr_db": pass_sqnr(m, fp32),
                    "round_fps": [],
                }
                built.append((label, m))
            except Exception as e:  # e.g. an inductor bug on a peer's layers: report it, go on
                rows[label] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}
            print(name, label, rows[label], flush=True)
        # Interleaved rounds: every variant is timed once per round, so a slow spell of this
        # shared machine hits all of them alike, and each ratio is the median of per-round ratios.
        for i in range(a.rounds):
            for label, m in built:
                rows[label]["round_fps"].append(bench_stream(m, chunks=a.chunks, warmup=2, sessions=a.sessions)["fps"])
            print(name, f"round {i + 1}/{a.rounds}:", {lb: round(rows[lb]["round_fps"][-1], 1) for lb, _ in built})
        for label, _ in built:
            rows[label]["fps"] = float(np.median(rows[label]["round_fps"]))
        base = rows["fp32"]
        results["models"][name] = rows
        md += [
            f"## {name}",
            "",
            "| variant | frames/s | x FP32 | x BF16 | x BF16 compiled | x BF16 max-autotune (range over rounds) | "
            "linear layers x FP32 | "
            "layer size / FP32 | one-pass SQNR dB | 12-frame PSNR dB vs FP32 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]

        for label, r in rows.items():
            if "error" in r:
                md.append(f"| {label} | failed: {r['error']} |" + " |" * 8)
                continue
            refs = ("fp32", "bf16", "bf16 compiled", "bf16 max-autotune")
            ratios = " | ".join(ratio(rows, label, ref, spread=ref == refs[-1]) for ref in refs)
            md.append(
                f"| {label} | {r['fps']:.1f} | {ratios} | "
                f"{base['linear_ms'] / r['linear_ms']:.2f} | "
                f"{r['layer_bytes'] / base['layer_bytes']:.3f} | {r['pass_sqnr_db']:.1f} | {r['psnr_db_vs_fp32']:.1f} |"
            )
        md.append("")
    a.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
