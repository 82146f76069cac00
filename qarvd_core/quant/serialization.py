"""Versioned quantized checkpoints: `NAME.safetensors` (integers, scales, kept FP weights) and
`NAME.json` (format version, base model id and sha256, method and full config, per-layer
layout with outlier counts, frame weights, calibration description, evaluation numbers).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qarvd_core.config import read_manifest, resolve_weights, sha256_of
from qarvd_core.model import ModelArgs, WorldModel
from qarvd_core.quant.api import config_from_dict, swap_module
from qarvd_core.quant.linear import DualScaleQuantLinear, QuantLinear

FORMAT = "qarvd-quantized"
FORMAT_VERSION = 1


def is_quantized_manifest(manifest: dict) -> bool:
    return manifest.get("format") == FORMAT


def save_quantized(
    qmodel: WorldModel, path: Path, base: str, evaluation: dict | None = None, base_path: Path | None = None
) -> Path:
    """Write the checkpoint pair atomically (temp files, fsync, rename); returns the weights path.

    `base` is the base model's id as the registry knows it; `base_path` its weights file
    when the id is not a shipped name or a path (e.g. a model in the artifact directory).
    """
    if not hasattr(qmodel, "quant_info"):
        raise ValueError("the model has no quant_info: pass the result of quantize(...)")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    base_path = Path(base_path) if base_path is not None else resolve_weights(base)
    quant_prefixes = tuple(qmodel.quant_info["layers"])
    state = {}
    for key, value in qmodel.state_dict().items():
        # Kept FP weights go to fp16 like the shipped base; scales, zeros and biases of
        # quantized layers stay fp32, integers stay integers.
        if value.is_floating_point() and not key.startswith(quant_prefixes):
            value = value.to(torch.float16)
        state[key] = value.contiguous()
    tmp = path.with_name(f".{path.name}.part")
    save_file(state, str(tmp))
    _fsync(tmp)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": {"id": base, "sha256": sha256_of(base_path)},
        "args": qmodel.args.to_dict(),
        "quantization": qmodel.quant_info,
        "sha256": sha256_of(tmp),
        "evaluation": evaluation,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    mtmp = path.with_name(f".{path.stem}.json.part")
    mtmp.write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync(mtmp)
    os.replace(tmp, path)
    os.replace(mtmp, path.with_suffix(".json"))
    return path


def _fsync(p: Path) -> None:
    with open(p, "rb") as f:
        os.fsync(f.fileno())


def load_quantized(path: Path | str) -> WorldModel:
    """Rebuild a quantized model; refuses unknown versions, other bases and damaged files."""
    path = Path(path)
    manifest = read_manifest(path)
    if not is_quantized_manifest(manifest):
        raise ValueError(f"{path} is not a qarvd quantized checkpoint (no format {FORMAT!r} in its manifest)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version}; this qarvd reads version {FORMAT_VERSION}: "
            "upgrade qarvd or re-run `qarvd quantize` with this version"
        )
    base = manifest["base_model"]
    try:
        base_path = resolve_weights(base["id"])
    except ValueError:
        base_path = None  # the base is not installed here; the checkpoint is self-contained
    if base_path is not None and sha256_of(base_path) != base["sha256"]:
        raise ValueError(
            f"{path} was quantized from a different {base['id']!r} (sha256 {base['sha256'][:12]}…, "
            f"installed {sha256_of(base_path)[:12]}…): re-run `qarvd quantize` on the installed base"
        )
    if sha256_of(path) != manifest["sha256"]:
        raise ValueError(
            f"{path} does not match the sha256 in its manifest (truncated or modified): "
            "copy it again or re-run `qarvd quantize`"
        )
    try:
        state = load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path} cannot be read ({e}): copy it again or re-run `qarvd quantize`") from e

    info = manifest["quantization"]
    config = config_from_dict(info["config"])
    model = WorldModel(ModelArgs(**manifest["args"]))
    for name, layer in info["layers"].items():
        lin = model.get_submodule(name)
        if layer["kind"] == "dual":
            idx = state[f"{name}.outlier_idx"]
            q = DualScaleQuantLinear(
                layer["in"],
                layer["out"],
                idx,
                config.w_spec,
                config.a_spec,
                layer.get("act_mode", "static"),
                bias=lin.bias is not None,
            )
        else:
            q = QuantLinear(
                layer["in"],
                layer["out"],
                config.w_spec,
                config.a_spec,
                layer.get("act_mode", "static"),
                bias=lin.bias is not None,
            )
        if f"{name}.smooth" in state:
            q.set_smoothing(state[f"{name}.smooth"])
        swap_module(model, name, q)
    model.load_state_dict({k: v.float() if v.dtype == torch.float16 else v for k, v in state.items()})
    model.quant_info = info
    model.manifest = manifest
    return model.eval()
