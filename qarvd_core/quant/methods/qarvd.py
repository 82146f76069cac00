"""Q-ARVD (arXiv 2605.21072): final-quality-aware frame weighting (S1) + outlier-aware adaptive
dual-scale quantization (S2), on layer-wise AdaRound reconstruction, as the official code does it.

S1: the sensitivity of the final video to quantizing chunk k alone, e_k, becomes a weight
w_k = K * e_k / sum(e) on every calibration sample from chunk k, in the reconstruction loss
and in the activation clipping search. S2: input columns of W whose L2 norm is an outlier
(modified z-score > 3.5 and > 1.2x the median) get their own quantizers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from qarvd_core.model import WorldModel
from qarvd_core.quant.api import Progress, QuantConfig, config_from_dict, register, swap_module, target_linears
from qarvd_core.quant.calibration import CalibrationSet, LayerInputs, collect_inputs
from qarvd_core.quant.linear import DualScaleQuantLinear, QuantLinear
from qarvd_core.quant.methods.gptq import GPTQConfig, gptq_round, own_zero, parts
from qarvd_core.quant.primitives import AdaRound, fake_quant
from qarvd_core.recipes import RECIPES
from qarvd_core.sampling import rollout

# Layers the official code leaves at round-to-nearest (their inputs are the prompt tokens).
NO_RECONSTRUCTION = ("cross_attn.k", "cross_attn.v", "text_embedding")


@dataclass(frozen=True)
class QArvdConfig(QuantConfig):
    """Q-ARVD: frame-weighted (S1) AdaRound reconstruction with adaptive dual-scale layers (S2)."""

    name = "qarvd"
    w_bits: int = 4
    a_bits: int = 8
    frame_weighting: bool = True  # S1
    dual_scale: bool = True  # S2
    weighting_on_dual_scale: bool = False  # the official code turns S1 off on dual-scale layers
    frame_weights: tuple[float, ...] | None = None  # given weights skip the sensitivity measurement
    sensitivity_rollouts: int = 8
    # How the weights are rounded. "adaround": layer-wise AdaRound with a learned activation step
    # size, as the official code (the prompt-fed layers stay at nearest). Beyond the paper, the name
    # of a GPTQ recipe (`gptq_recipes()`): GPTQ's rounding of every layer with that recipe's damping,
    # act-awareness and activation scheme, on Q-ARVD's quantizers, S1 weighting the Hessian's rows.
    rounding: str = "adaround"
    recon_iters: int = 2000  # AdaRound steps per layer; 0 keeps round-to-nearest
    recon_rows: int = 256  # calibration rows per reconstruction step
    lr_rounding: float = 2e-3
    lr_act_scale: float = 4e-5
    round_reg: float = 0.01
    outlier_z: float = 3.5
    outlier_ratio: float = 1.2
    outlier_align: int = 32

    def __post_init__(self):
        super().__post_init__()
        if self.recon_iters < 0 or self.sensitivity_rollouts < 1 or self.recon_rows < 1:
            raise ValueError("recon_iters must be >= 0, sensitivity_rollouts and recon_rows >= 1")
        if self.rounding != "adaround" and self.rounding not in gptq_recipes():
            raise ValueError(f"rounding must be 'adaround' or one of {gptq_recipes()}, got {self.rounding!r}")

    def gptq(self) -> GPTQConfig | None:
        """The GPTQ config that rounds the weights, at these bits; None for AdaRound."""
        if self.rounding == "adaround":
            return None
        shared = {"w_bits": self.w_bits, "a_bits": self.a_bits, "w_symmetric": self.w_symmetric}
        return config_from_dict({"method": self.rounding, **shared, "keep_fp": list(self.keep_fp)})

    @classmethod
    def upgrade(cls, saved: dict) -> dict:
        """Manifests written before recipes name the rounding with `rounding_init` ("nearest", "gptq",
        "gptq-act"), `act_mode` and `reconstruct_prompt_layers`; they map to `rounding`. A loaded
        checkpoint's layers keep the activation scheme each one records, so the combinations with
        no counterpart (GPTQ's codes as AdaRound's start, AdaRound with per-token activations)
        read as AdaRound."""
        if "rounding_init" not in saved:
            return saved
        init = saved.pop("rounding_init")
        per_token = saved.pop("act_mode", "static") == "dynamic"
        saved.pop("reconstruct_prompt_layers", None)
        if init != "nearest" and saved.get("recon_iters", 2000) == 0:
            saved["rounding"] = init + ("-per-token" if per_token else "")
        return saved


def gptq_recipes() -> tuple[str, ...]:
    return tuple(name for name, r in RECIPES.items() if r.method == GPTQConfig.name)


def find_outlier_columns(w: Tensor, z: float = 3.5, ratio: float = 1.2, align: int = 32) -> Tensor:
    """Indices of outlier input columns of w [out, in] (S2), possibly empty.

    n_j = ||W[:, j]||_2; an outlier has modified z-score 0.6745 (n_j - med) / MAD > z and
    n_j > ratio * med. A non-zero count is rounded up to a multiple of `align` (taking the
    next largest norms) and capped at half the columns.
    """
    n = w.float().norm(dim=0)
    med = n.median()
    mad = (n - med).abs().median()
    if mad < 1e-8:
        return torch.empty(0, dtype=torch.long)
    count = int(((0.6745 * (n - med) / mad > z) & (n > ratio * med)).sum())
    if count == 0:
        return torch.empty(0, dtype=torch.long)
    count = min(math.ceil(count / align) * align, w.shape[1] // 2)
    return torch.argsort(n, descending=True)[:count].sort().values


@torch.no_grad()
def chunk_sensitivity(
    fp: WorldModel, quant: WorldModel, calib: CalibrationSet, rollouts: int, progress: bool = True
) -> list[float]:
    """e_k: MSE between the final videos of the FP rollout and of one with only chunk k quantized.

    Same scenarios, noise and actions; chunk k's denoising and its cache commit run on the
    quantized model, every other chunk on the FP model (sharing one KV cache).
    """
    cases = replace(calib, rollouts=rollouts).scenarios(fp.args.frames_per_chunk)
    prompts, actions, seeds = [c.biome for c in cases], [list(c.actions) for c in cases], [c.noise_seed for c in cases]
    ref = rollout(fp, prompts, actions, seeds)
    errors = []
    for k in tqdm(range(calib.chunks), desc="chunk sensitivity", disable=not progress):
        hybrid = rollout(fp, prompts, actions, seeds, chunk_model=lambda j, k=k: quant if j == k else fp)
        errors.append(float((hybrid - ref).pow(2).mean()))
    return errors


def frame_weights_from(errors: list[float]) -> list[float]:
    """w_k = e_k / sum(e), rescaled to mean 1."""
    total = sum(errors)
    if total <= 0:
        return [1.0] * len(errors)
    return [len(errors) * e / total for e in errors]


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, DualScaleQuantLinear))}


def _set_act_mode(layers, mode: str) -> None:
    for m in layers.values():
        for q in m.modules():
            if isinstance(q, QuantLinear):
                q.act_mode = mode


def _row_weights(data: LayerInputs, weights: list[float] | None) -> Tensor | None:
    if weights is None:
        return None
    _, chunk, _ = data.stacked()
    w = torch.tensor(weights)
    return w[chunk.clamp(max=len(w) - 1)]


def reconstruct(
    layer: nn.Module,
    w_fp: Tensor,
    b_fp: Tensor | None,
    x: Tensor,
    row_w: Tensor | None,
    cfg: QArvdConfig,
    tokens_per_call: int,
    generator: torch.Generator,
    report: Callable[[float], None] | None = None,
) -> float:
    """Layer-wise AdaRound with a learned activation step size; returns the final loss.

    `report(fraction done)` is called every few steps (it may raise, to cancel).

    Loss per step: mean over channels of sum over rows of w_row * (Q-layer(x) - FP-layer(x))^2,
    scaled to a forward pass's token count, plus the rounding regulariser once warm-up ends
    (beta 20 -> 2 over the remaining 80% of steps).
    """
    groups = parts(layer)
    rounders, scales = [], []
    for part, idx in groups:
        w = w_fp if idx is None else w_fp[:, idx]
        rounders.append(AdaRound(w, part.w_scale, own_zero(part), part.w_spec))
        scales.append(nn.Parameter(part.a_scale.clone()))
    opt_round = torch.optim.Adam([r.alpha for r in rounders], lr=cfg.lr_rounding)
    opt_act = torch.optim.Adam(scales, lr=cfg.lr_act_scale)
    sched_act = torch.optim.lr_scheduler.CosineAnnealingLR(opt_act, T_max=max(cfg.recon_iters, 1), eta_min=0)
    target_all = F.linear(x, w_fp, b_fp)
    warm = int(0.2 * cfg.recon_iters)
    loss = torch.tensor(0.0)
    for it in range(cfg.recon_iters):
        if report is not None and it % 10 == 0:
            report(it / cfg.recon_iters)
        rows = torch.randint(0, len(x), (min(cfg.recon_rows, len(x)),), generator=generator)
        xb, target = x[rows], target_all[rows]
        pred = 0 if b_fp is None else b_fp
        for (part, idx), rnd, s in zip(groups, rounders, scales):
            xin = xb if idx is None else xb[:, idx]
            xq = fake_quant(xin, s, part.a_zero, part.a_spec)
            pred = pred + F.linear(xq, rnd())
        err = (pred - target).pow(2)
        if row_w is not None:
            err = err * row_w[rows, None]
        rec = err.sum(0).mean() * tokens_per_call / len(rows)
        loss = rec
        if it >= warm:
            beta = 2 + (20 - 2) * (1 - (it - warm) / max(cfg.recon_iters - warm, 1))
            loss = rec + cfg.round_reg * sum(r.regulariser(beta) for r in rounders)
        opt_round.zero_grad()
        opt_act.zero_grad()
        loss.backward()
        opt_round.step()
        opt_act.step()
        sched_act.step()
        with torch.no_grad():
            for s in scales:
                s.clamp_(min=1e-8)
    for (part, _), rnd, s in zip(groups, rounders, scales):
        part.set_weight(rnd.codes(hard=True).detach(), part.w_scale, own_zero(part))
        part.set_activation(s.detach(), part.a_zero)
    return float(loss.detach())


@register(QArvdConfig)
def run(model: WorldModel, config: QArvdConfig, calib: CalibrationSet, progress: Progress) -> dict:
    fp = copy.deepcopy(model)
    linears = target_linears(model, config.keep_fp)
    fp_params = {
        n: (m.weight.detach().float().clone(), None if m.bias is None else m.bias.detach().float().clone())
        for n, m in linears.items()
    }
    progress("collecting", 0.0)
    inputs_fp = collect_inputs(model, linears, calib, progress.bars)  # reconstruction data: FP inputs
    gptq = config.gptq()
    act_mode = "static" if gptq is None else gptq.act_mode

    summary = {}
    for name in linears:
        w, b = fp_params[name]
        outliers = torch.empty(0, dtype=torch.long)
        if config.dual_scale and name.startswith("blocks."):
            outliers = find_outlier_columns(w, config.outlier_z, config.outlier_ratio, config.outlier_align)
        if len(outliers):
            q = DualScaleQuantLinear.from_float(w, b, outliers, config.w_spec, config.a_spec)
        else:
            q = QuantLinear.from_float(w, b, config.w_spec, config.a_spec)
        swap_module(model, name, q)
        summary[name] = {
            "kind": "dual" if len(outliers) else "linear",
            "in": w.shape[1],
            "out": w.shape[0],
            "outliers": len(outliers),
            "act_mode": act_mode,
        }
    layers = _quantized_layers(model)
    layers = {n: layers[n] for n in linears}

    # Static activation ranges come from the weight-quantized model with float activations.
    static = act_mode == "static"
    if static:
        _set_act_mode(layers, "none")
        progress("collecting", 0.5)
        inputs_wq = collect_inputs(model, layers, calib, progress.bars)
        _set_act_mode(layers, "static")
        for name, layer in layers.items():
            layer.init_activation(inputs_wq[name].stacked()[0])
    else:
        _set_act_mode(layers, "dynamic")

    errors = None
    weights = list(config.frame_weights) if config.frame_weights else None
    if config.frame_weighting and weights is None:
        progress("sensitivity", 0.0)
        errors = chunk_sensitivity(fp, model, calib, config.sensitivity_rollouts, progress.bars)
        weights = frame_weights_from(errors)
    if not config.frame_weighting:
        weights = None

    gen = torch.Generator().manual_seed(calib.seed)
    bar = tqdm(layers.items(), desc="reconstruction", disable=not progress.bars)
    for i, (name, layer) in enumerate(bar):
        progress("calibrating", i / len(layers))
        weighted = weights if (summary[name]["kind"] == "linear" or config.weighting_on_dual_scale) else None
        if weighted is not None and static:
            layer.init_activation(inputs_wq[name].stacked()[0], _row_weights(inputs_wq[name], weighted))
        x, _, _ = inputs_fp[name].stacked()
        w, b = fp_params[name]
        row_w = _row_weights(inputs_fp[name], weighted)
        if gptq is not None:
            gptq_round(layer, w, x, gptq, row_w)
            continue
        if any(k in name for k in NO_RECONSTRUCTION) or config.recon_iters == 0:
            continue

        def report(fraction: float, i: int = i) -> None:
            progress("calibrating", (i + fraction) / len(layers))

        summary[name]["recon_loss"] = reconstruct(layer, w, b, x, row_w, config, model.args.chunk_tokens, gen, report)
        bar.set_postfix(layer=name)
    return {"layers": summary, "frame_weights": weights, "chunk_sensitivity": errors}
