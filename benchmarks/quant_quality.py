"""Quality of every method at one bit-width, and the Q-ARVD ablation, on identical data.

For one base model and bit-width (default tiny-world W4A8), every recipe of
`qarvd_core.recipes` (`qarvd quantize --help` lists them: the baselines, the GPTQ family,
and Q-ARVD with each combination of S1 and S2), all on the same calibration rollouts,
evaluated with `qarvd eval` against the FP model on the held-out scenarios (identical
seeds, noise and actions). At W8A8 the peer library too: torchao's int8 configs on the
same layers (`pip install -e ".[bench]"`). Once the paper's `qarvd` has run, the other
variants with S1 reuse the frame weights it measured, so the ablation differs only in the
switches. Results are written after every variant, and a rerun skips what is done (a long
sweep survives interruption).

    python benchmarks/quant_quality.py --w-bits 4 --a-bits 8 --out benchmarks/results/quant_quality_w4a8
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from qarvd_core.checkpoint import load_model
from qarvd_core.eval.evaluate import EvalConfig, evaluate
from qarvd_core.quant import CalibrationSet, QArvdConfig, config_from_dict, quantize
from qarvd_core.quant.api import DEFAULT_KEEP_FP, target_linears
from qarvd_core.recipes import RECIPES

QARVD = "qarvd"  # the paper's method: the S1 variants reuse its frame weights, and its line is drawn bold
# torchao's int8 configs (per-channel symmetric weights, RTN; dynamic per-token symmetric
# activations or none), by their class names in torchao.quantization. Data-free: no calibration.
PEERS = {
    "torchao-int8-dynamic": "Int8DynamicActivationInt8WeightConfig",
    "torchao-int8-weight-only": "Int8WeightOnlyConfig",
}
# Weight-only int8 keeps the activations in float: reported, but not a baseline at the same bits.
SAME_BITS_PEERS = ("torchao-int8-dynamic",)
# What Q-ARVD is measured against: every recipe of another method, and the peer at the same bits.
BASELINES = tuple(name for name, r in RECIPES.items() if r.method != QARVD) + SAME_BITS_PEERS


def torchao_model(base, config_name: str):
    """A copy of `base` with torchao's config applied to exactly the layers qarvd quantizes."""
    import torchao.quantization as tq

    model = copy.deepcopy(base)
    names = set(target_linears(base, DEFAULT_KEEP_FP))
    tq.quantize_(model, getattr(tq, config_name)(), filter_fn=lambda m, name: name in names)
    return model, {}


def qarvd_model(base, options: dict, calib: CalibrationSet):
    qmodel = quantize(base, config_from_dict(options), calib, progress=False)
    info = qmodel.quant_info
    return qmodel, {
        "frame_weights": info.get("frame_weights"),
        "dual_scale_layers": sum(v.get("kind") == "dual" for v in info["layers"].values()),
    }


def run_variant(base, options: dict, calib: CalibrationSet, eval_cfg: EvalConfig) -> dict:
    t0 = time.perf_counter()
    if options["method"] in PEERS.values():
        qmodel, extra = torchao_model(base, options["method"])
    else:
        qmodel, extra = qarvd_model(base, options, calib)
    seconds = time.perf_counter() - t0
    r = evaluate(qmodel, base, eval_cfg)
    return {
        "options": options,
        "quantize_s": round(seconds, 1),
        "psnr_db_mean": r["psnr_db_mean"],
        "ssim_mean": r["ssim_mean"],
        "psnr_db_per_chunk": r["psnr_db_per_chunk"],
        "psnr_db_per_scenario": r["psnr_db_per_scenario"],
        "action_accuracy": r["action_accuracy"],
        "reference_action_accuracy": r["reference_action_accuracy"],
        **extra,
    }


def paired_gap(a: list[float], b: list[float], resamples: int = 10_000) -> tuple[float, float, float]:
    """Mean of a - b over the same worlds and its 95% bootstrap interval (worlds resampled).

    Whole-set means move by 1-3 dB between world sets, because a few worlds whose rollouts
    drift apart dominate; pairing by world removes that and the interval says what is left.
    """
    d = np.asarray(a) - np.asarray(b)
    idx = np.random.default_rng(0).integers(0, len(d), (resamples, len(d)))
    lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def _gap(results: dict, name: str, anchor: str | None) -> str:
    """`name` minus `anchor` in PSNR over the same worlds, as "mean [low, high]"."""
    a, b = results[name].get("psnr_db_per_scenario"), results.get(anchor, {}).get("psnr_db_per_scenario")
    if name == anchor or not a or not b:
        return ""
    return "{:+.2f} [{:+.2f}, {:+.2f}]".format(*paired_gap(a, b))


def plot_per_chunk(results: dict, title: str, command: str, path: Path) -> None:
    """PSNR per chunk, one line per method, each in its own colour (tab20's ten dark hues, then
    its ten light ones dashed), the legend beside the axes and the command that made it on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, r) in enumerate(results.items()):
        ax.plot(
            r["psnr_db_per_chunk"],
            color=palette[(2 * i) % 20 + (i // 10) % 2],
            ls=("-", "--", ":", "-.")[(i // 10) % 4],
            marker="o",
            ms=3,
            lw=2.5 if name == QARVD else 1.4,
            label=textwrap.fill(name, 48),
        )
    ax.set(xlabel="chunk (3 frames)", ylabel="PSNR dB vs FP", title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    # Above the title: a long legend may reach below the axes.
    fig.text(0.0, 1.0, textwrap.fill(command, 110), fontsize=6.5, family="monospace", va="bottom")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(results: dict, meta: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    ref = next(iter(results.values()))["reference_action_accuracy"] if results else None
    baselines = [n for n in results if n in BASELINES]
    best = max(baselines, key=lambda n: results[n]["psnr_db_mean"], default=None)
    # Paired gaps to GPTQ, to the best baseline at these bits, and to the peer library's.
    anchors = list(dict.fromkeys(n for n in ("gptq", best, *SAME_BITS_PEERS) if n in results))
    titles = [f"vs {a}" + (" (best baseline)" if a == best else "") for a in anchors]
    md = [
        f"# W{meta['w_bits']}A{meta['a_bits']} on {meta['model']}: every method vs the FP model",
        "",
        f"{meta['eval']}; calibration {json.dumps(meta['calibration'])}. FP action accuracy {ref}.",
        "PSNR gaps are paired by world, with a 95% bootstrap interval.",
        "",
        "| method | PSNR dB vs FP | " + " | ".join(titles) + " | SSIM | action accuracy | first / last chunk PSNR "
        "| quantize s |",
        "|---|---|" + "---|" * len(anchors) + "---|---|---|---|",
    ]
    for name, r in results.items():
        c = r["psnr_db_per_chunk"]
        gaps = "".join(f" {_gap(results, name, a)} |" for a in anchors)
        md.append(
            f"| {name} | {r['psnr_db_mean']:.2f} |{gaps} {r['ssim_mean']:.3f} "
            f"| {r['action_accuracy']:.3f} | {c[0]:.1f} / {c[-1]:.1f} | {r['quantize_s']:.0f} |"
        )
    if QARVD in results:
        md += ["", "Frame weights (S1): " + " ".join(f"{w:.2f}" for w in results[QARVD]["frame_weights"] or [])]
    md[1:1] = ["", f"Made by `{meta['command']}`."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot_per_chunk(results, md[0][2:], meta["command"], out.with_suffix(".png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-world")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--only", nargs="*", help="a subset of the variants: recipe names, and torchao's at W8A8")
    ap.add_argument("--scenarios", type=int, default=8)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--split", default="heldout", choices=["heldout", "calibration"], help="calibration: to choose")
    ap.add_argument("--calib-rollouts", type=int, default=CalibrationSet.rollouts, help="calibration worlds")
    ap.add_argument(
        "--calib-tokens",
        type=int,
        default=CalibrationSet.tokens_per_pass,
        help="rows kept per layer per pass",
    )
    ap.add_argument("--calib-seed", type=int, default=0, help="1+: worlds the calibration split's eval never sees")
    ap.add_argument("--out", default="benchmarks/results/quant_quality_w4a8")
    a = ap.parse_args()
    out = Path(a.out)
    base = load_model(a.model)
    calib = CalibrationSet(rollouts=a.calib_rollouts, tokens_per_pass=a.calib_tokens, seed=a.calib_seed)
    eval_cfg = EvalConfig(scenarios=a.scenarios, frames=a.frames, drift_frames=0, split=a.split)
    meta = {
        "command": shlex.join(["python", "benchmarks/quant_quality.py", *sys.argv[1:]]),
        "model": a.model,
        "w_bits": a.w_bits,
        "a_bits": a.a_bits,
        "calibration": calib.describe(),
        "eval": f"qarvd eval, {a.scenarios} {a.split} scenarios x {a.frames} frames, simulate mode",
    }
    done = json.loads(out.with_suffix(".json").read_text())["results"] if out.with_suffix(".json").exists() else {}
    variants = {name: {"method": name, "w_bits": a.w_bits, "a_bits": a.a_bits} for name in RECIPES}
    if (a.w_bits, a.a_bits) == (8, 8):
        variants |= {name: {"method": cls} for name, cls in PEERS.items()}
    unknown = set(a.only or ()) - set(variants)
    if unknown:
        ap.error(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(variants)}")
    for name, options in variants.items():
        if name in done or (a.only and name not in a.only):
            continue
        config = None if name in PEERS else config_from_dict(options)
        if isinstance(config, QArvdConfig) and config.frame_weighting and QARVD in done:
            options["frame_weights"] = done[QARVD]["frame_weights"]
        print(f"{name}: quantizing", flush=True)
        done[name] = run_variant(base, options, calib, eval_cfg)
        r = done[name]
        print(
            f"{name}: {r['psnr_db_mean']:.2f} dB, action {r['action_accuracy']:.3f}, {r['quantize_s']:.0f} s",
            flush=True,
        )
        write_report(done, meta, out)
    write_report(done, meta, out)  # also re-renders a finished sweep's table


if __name__ == "__main__":
    main()
