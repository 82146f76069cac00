"""Named recipes: one name for a method and the options that make a variant of it.

Every method is also the recipe of its own defaults, so a recipe name goes wherever a method
name does: `config_from_dict({"method": "gptq-act-per-token", "w_bits": 8})`, `qarvd quantize
--method`, a REST job's `method`, `benchmarks/quant_quality.py --only`. Options given beside
the name override the recipe's; the checkpoint's manifest records the method and its full config.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    method: str
    about: str  # one line, for `qarvd quantize --help` and the benchmark tables
    options: dict = field(default_factory=dict)


_PER_TOKEN = {"act_mode": "dynamic"}
# GPTQv2's asymmetric calibration on MSE-searched weight scales (the quantizers Q-ARVD starts from).
_ACT_AWARE = {"act_aware": True, "weight_init": "mse"}

RECIPES: dict[str, Recipe] = {
    "rtn": Recipe("rtn", "round to nearest, min-max ranges"),
    "smoothquant": Recipe("smoothquant", "SmoothQuant, migration strength 0.5"),
    "vidit-q": Recipe("vidit-q", "ViDiT-Q's rules: channel balancing, per-token activations"),
    "gptq": Recipe("gptq", "GPTQ, static activations"),
    "gptq-per-token": Recipe("gptq", "GPTQ, per-token activations", _PER_TOKEN),
    "gptq-act": Recipe("gptq", "GPTQv2: GPTQ against the quantized activations, static activations", _ACT_AWARE),
    "gptq-act-per-token": Recipe(
        "gptq", "GPTQv2: GPTQ against the quantized activations, per-token activations", {**_ACT_AWARE, **_PER_TOKEN}
    ),
    # The paper's ablation: its two switches on AdaRound reconstruction, as its official code.
    "qarvd": Recipe("qarvd", "Q-ARVD, the paper's method: S1 frame weighting + S2 dual scale"),
    "qarvd-s1": Recipe("qarvd", "Q-ARVD with S1 only", {"dual_scale": False}),
    "qarvd-s2": Recipe("qarvd", "Q-ARVD with S2 only", {"frame_weighting": False}),
    "qarvd-neither": Recipe(
        "qarvd", "Q-ARVD's reconstruction without S1 or S2", {"frame_weighting": False, "dual_scale": False}
    ),
    # The same switches on gptq-act-per-token's rounding instead of AdaRound (beyond the paper);
    # without either switch that is gptq-act-per-token itself.
    "qarvd-gptq-act-per-token": Recipe(
        "qarvd", "Q-ARVD's S1 + S2 on gptq-act-per-token", {"rounding": "gptq-act-per-token"}
    ),
    "qarvd-s1-gptq-act-per-token": Recipe(
        "qarvd", "Q-ARVD's S1 on gptq-act-per-token", {"rounding": "gptq-act-per-token", "dual_scale": False}
    ),
    "qarvd-s2-gptq-act-per-token": Recipe(
        "qarvd", "Q-ARVD's S2 on gptq-act-per-token", {"rounding": "gptq-act-per-token", "frame_weighting": False}
    ),
}
