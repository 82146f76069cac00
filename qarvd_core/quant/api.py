"""One verb: `quantize(model, config, calibration)` returns a quantized copy of the model.

Configs are frozen dataclasses, one per method, registered by name; the CLI, REST and the
benchmarks name them through recipes (`qarvd_core.recipes`).
"""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import ClassVar, Union, get_args, get_origin, get_type_hints

from torch import nn

from qarvd_core.model import WorldModel
from qarvd_core.quant.calibration import CalibrationSet, collect_inputs
from qarvd_core.quant.primitives import QuantSpec
from qarvd_core.recipes import RECIPES

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

    @classmethod
    def upgrade(cls, saved: dict) -> dict:
        """A config an older qarvd saved in a manifest, with its options mapped to today's."""
        return saved


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


class ConfigError(ValueError):
    """A config that cannot be built; `field` names the offending option when one does."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _kind(hint) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_kind(a) for a in get_args(hint))
    if get_origin(hint) is tuple:
        return f"a list of {_KINDS[get_args(hint)[0]].removeprefix('a ').removeprefix('an ')}s"
    return _KINDS[hint]


def _fits(value, hint) -> bool:
    """JSON-typed `value` against a config field's type: no float for an int, no 0/1 for a bool."""
    if get_origin(hint) in (Union, types.UnionType):
        return any(_fits(value, a) for a in get_args(hint))
    if get_origin(hint) is tuple:
        return isinstance(value, list | tuple) and all(_fits(v, get_args(hint)[0]) for v in value)
    if hint is float:  # an integer is a number too
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _numbers(value) -> list:
    items = value if isinstance(value, list | tuple) else [value]
    return [v for v in items if isinstance(v, int | float) and not isinstance(v, bool)]


def config_from_dict(d: dict) -> QuantConfig:
    """Build a method's config from {"method": name, ...}, as JSON gives it (lists for tuples).

    `name` is a method or a recipe; the recipe's options are the defaults of the given ones.
    Unknown names or fields, values of the wrong type (a float for an integer, 0 for a bool,
    a number among layer names) and negative numbers raise ConfigError naming the field;
    each method's own range checks raise it without a field.
    """
    d = dict(d)
    name = d.pop("method", None)
    recipe = RECIPES.get(name) if isinstance(name, str) else None
    if recipe is not None:
        name, d = recipe.method, {**recipe.options, **d}
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(RECIPES)}", "method")
    cls = METHODS[name][0]
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    extra = sorted(set(d) - known)
    if extra:
        raise ConfigError(f"unknown option(s) {extra} for method {name!r}; known: {sorted(known)}", extra[0])
    for key, value in d.items():
        if not _fits(value, hints[key]):
            raise ConfigError(f"{key} must be {_kind(hints[key])}, got {value!r}", key)
        if any(v < 0 for v in _numbers(value)):
            raise ConfigError(f"{key} must not be negative, got {value!r}", key)
        if isinstance(value, list):
            d[key] = tuple(value)
    try:
        return cls(**d)
    except ValueError as e:  # the method's own range checks, which name their fields in the message
        raise ConfigError(str(e)) from e


def config_from_manifest(saved: dict) -> QuantConfig:
    """The config a quantized checkpoint's manifest records, also as older versions wrote it."""
    name = saved.get("method")
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r} in the manifest; this qarvd knows {', '.join(METHODS)}")
    return config_from_dict(METHODS[name][0].upgrade(dict(saved)))


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
