"""One verb: `quantize(model, config, calibration)` returns a quantized copy of the model.

Configs are frozen dataclasses, one per method, registered by name for the CLI and REST.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from torch import nn

from qarvd_core.model import WorldModel
from qarvd_core.quant.calibration import CalibrationSet, collect_inputs
from qarvd_core.quant.primitives import QuantSpec

# Kept in full precision by default, as in the paper: patch embedding, time embedding and
# projection, output head (attention matmuls and the KV cache are never quantized).
DEFAULT_KEEP_FP = ("patch_embedding", "time_embedding", "time_projection", "head")


@dataclass(frozen=True)
class QuantConfig:
    """Settings every method shares."""

    name: ClassVar[str] = ""
    w_bits: int = 8
    a_bits: int = 8
    keep_fp: tuple[str, ...] = DEFAULT_KEEP_FP
    # Symmetric weights (zero point 0, as torchao's int8 configs) instead of the paper's
    # asymmetric ones: deploy mode then needs no zero-point term, so an input's quantize is a
    # pointwise op that compiles into the kernel producing the input.
    w_symmetric: bool = False

    def __post_init__(self):
        for what in ("w_bits", "a_bits"):
            bits = getattr(self, what)
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"{what} must be an integer from 2 to 8, got {bits!r}; e.g. w_bits=4, a_bits=8")
        if not isinstance(self.w_symmetric, bool):
            raise ValueError(f"w_symmetric must be true or false, got {self.w_symmetric!r}")

    @property
    def w_spec(self) -> QuantSpec:
        return QuantSpec(self.w_bits, symmetric=self.w_symmetric)

    @property
    def a_spec(self) -> QuantSpec:
        return QuantSpec(self.a_bits, symmetric=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep_fp"] = list(self.keep_fp)
        return {"method": self.name, **d}


@dataclass
class Progress:
    """Where a method reports its stage and progress (0..1); `callback` may raise to cancel."""

    bars: bool = True  # tqdm bars on stderr
    callback: Callable[[str, float], None] | None = None

    def __call__(self, stage: str, fraction: float) -> None:
        if self.callback is not None:
            self.callback(stage, fraction)


METHODS: dict[str, tuple[type[QuantConfig], object]] = {}


def register(config_cls: type[QuantConfig]):
    """Decorator for a method's `run(model, config, calibration, progress: Progress)` function."""

    def wrap(fn):
        METHODS[config_cls.name] = (config_cls, fn)
        return fn

    return wrap


def check_act_mode(mode: str) -> None:
    """For the methods that offer both activation schemes (an `act_mode` field)."""
    if mode not in ("static", "dynamic"):
        raise ValueError(f"act_mode must be 'static' (one range per layer) or 'dynamic' (per token), got {mode!r}")


def config_from_dict(d: dict) -> QuantConfig:
    """Build a method's config from {"method": name, ...}; unknown names or fields raise ValueError."""
    d = dict(d)
    name = d.pop("method", None)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    cls = METHODS[name][0]
    known = {f.name for f in fields(cls)}
    extra = set(d) - known
    if extra:
        raise ValueError(f"unknown option(s) {sorted(extra)} for method {name!r}; known: {sorted(known)}")
    if "keep_fp" in d:
        d["keep_fp"] = tuple(d["keep_fp"])
    return cls(**d)


def target_linears(model: nn.Module, keep_fp: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The nn.Linear layers a method quantizes: all but those under a kept prefix."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(name == p or name.startswith(p + ".") for p in keep_fp)
    }


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_each_layer(
    model: WorldModel, config: QuantConfig, calib: CalibrationSet, progress: Progress, build: Callable
) -> dict:
    """The one-pass methods: collect inputs, then swap each layer for `build(linear, rows)`."""
    layers = target_linears(model, config.keep_fp)
    progress("collecting", 0.0)
    inputs = collect_inputs(model, layers, calib, progress.bars)
    summary = {}
    for i, (name, lin) in enumerate(layers.items()):
        progress("calibrating", i / len(layers))
        q = build(lin, inputs[name].stacked()[0])
        swap_module(model, name, q)
        summary[name] = {"kind": "linear", "in": q.in_features, "out": q.out_features, "act_mode": q.act_mode}
    return {"layers": summary}


def quantize(
    model: WorldModel,
    config: QuantConfig,
    calibration: CalibrationSet | None = None,
    progress: bool | Progress = True,
) -> WorldModel:
    """A quantized copy of `model` (simulate mode); the original is left untouched.

    The copy carries `quant_info`: method, config, per-layer summary, frame weights and
    the calibration description, which `save_quantized` writes into the manifest.
    """
    if not isinstance(config, QuantConfig) or config.name not in METHODS:
        raise ValueError(f"config must be one of {', '.join(c.__name__ for c, _ in METHODS.values())}")
    calibration = calibration or CalibrationSet()
    qmodel = copy.deepcopy(model).float().eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    _, run = METHODS[config.name]
    if not isinstance(progress, Progress):
        progress = Progress(bars=progress)
    info = run(qmodel, config, calibration, progress)
    qmodel.quant_info = {"config": config.to_dict(), "calibration": calibration.describe(), **info}
    return qmodel
