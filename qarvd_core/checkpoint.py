"""Where model weights come from and go: shipped names, paths, manifests, and the two file
formats, base models (fp16 safetensors + manifest) and versioned quantized checkpoints.

A quantized checkpoint is `NAME.safetensors` (integers, scales, kept FP weights) and
`NAME.json` (format version, base model id and sha256, method and full config, per-layer
layout with outlier counts, frame weights, calibration description, evaluation numbers).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qarvd_core.model import ModelArgs, WorldModel
from qarvd_core.quant.api import config_from_manifest, swap_module
from qarvd_core.quant.kv import KVQuantConfig
from qarvd_core.quant.linear import DualScaleQuantLinear, QuantLinear, set_compute_dtype, set_mode
from qarvd_core.wan import CardParts, card_from_dict, card_to_dict, is_card, load_card_model

WEIGHTS_DIR = Path(__file__).parent / "weights"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the dtypes load_model runs in, by CLI/setting name
QUANTIZED_FORMAT = "qarvd-quantized"
QUANTIZED_FORMAT_VERSION = 1


def shipped_models() -> list[str]:
    """Model names whose weights ship with the package."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))


def resolve_weights(name_or_path: str) -> Path:
    """A shipped model name or a path -> the weights file. Raises ValueError saying what exists."""
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.exists():
        if not path.is_file():
            raise ValueError(f"no weights file at {name_or_path!r}")
        return path
    shipped = WEIGHTS_DIR / f"{name_or_path}.safetensors"
    if shipped.is_file():
        return shipped
    raise ValueError(
        f"unknown model {name_or_path!r}; use one of: {', '.join(shipped_models()) or '(none shipped)'}, "
        "or a path to a .safetensors file"
    )


def read_manifest(weights: Path) -> dict:
    """The JSON manifest beside a weights file (args, sha256, the command that made it)."""
    manifest = weights.with_suffix(".json")
    if not manifest.is_file():
        raise ValueError(f"{weights} has no manifest {manifest.name} beside it; it says which preset the weights are")
    return json.loads(manifest.read_text())


def is_quantized_manifest(manifest: dict) -> bool:
    return manifest.get("format") == QUANTIZED_FORMAT


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_weights(model: WorldModel, path: Path, **info) -> Path:
    """fp16 safetensors plus the manifest beside it (args, sha256, and `info`); atomic."""
    path = Path(path)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.part")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    manifest = {"args": model.args.to_dict(), "sha256": sha256_of(path), "dtype": "float16", **info}
    path.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def load_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu", quant_mode: str = "deploy"
) -> WorldModel:
    """Build the model its manifest describes and load its weights (eval mode).

    Quantized checkpoints load in `quant_mode` ('deploy': integer GEMMs; 'simulate': fake
    quant); `dtype` is then the dtype of everything around the quantized layers (norms,
    attention, kept layers), and their scales stay fp32. A Wan model card (qarvd_core/wan.py)
    loads the checkpoint it names.
    """
    if is_card(name_or_path):
        return load_card_model(name_or_path, dtype, device)
    weights = resolve_weights(name_or_path)
    manifest = read_manifest(weights)
    if is_quantized_manifest(manifest):
        model = set_compute_dtype(load_quantized(weights, device, dtype).to(device), dtype)
        return set_mode(model, quant_mode)
    args = ModelArgs(**manifest["args"])
    model = WorldModel(args)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match preset {manifest.get('preset')}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return model.to(device=device, dtype=dtype).eval()


def save_quantized(
    qmodel: WorldModel, path: Path, base: str, evaluation: dict | None = None, base_path: Path | None = None
) -> Path:
    """Write the checkpoint pair atomically (temp files, fsync, rename); returns the weights path.

    `base` is the base model's id as the registry knows it; `base_path` its weights file
    when the id is not a shipped name or a path (e.g. a model in the artifact directory). A base
    given as a file (weights or a Wan card) is recorded by its name, the file's stem, which is
    its id in a model store holding it, and by its path, which loading checks it against.
    """
    if not hasattr(qmodel, "quant_info"):
        raise ValueError("the model has no quant_info: pass the result of quantize(...)")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    base_record = {"id": base}
    if base_path is None and Path(base).is_file():
        base_record = {"id": Path(base).stem, "path": str(Path(base).resolve())}
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
        "format": QUANTIZED_FORMAT,
        "format_version": QUANTIZED_FORMAT_VERSION,
        "base_model": {**base_record, "sha256": sha256_of(base_path)},
        "args": qmodel.args.to_dict(),
        "quantization": qmodel.quant_info,
        "sha256": sha256_of(tmp),
        "evaluation": evaluation,
        # How streams of the model store their KV cache (absent: full precision).
        **({"kv_cache": qmodel.kv_quant.to_dict()} if getattr(qmodel, "kv_quant", None) is not None else {}),
        # A Wan model's card, so loading the checkpoint finds its text encoder and VAE.
        **({"card": card_to_dict(qmodel.card)} if getattr(qmodel, "card", None) is not None else {}),
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


def load_quantized(path: Path | str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> WorldModel:
    """Rebuild a quantized model; refuses unknown versions, other bases and damaged files.

    A model quantized from a Wan card gets the card back (`model.card`) and its text encoder
    and VAE (`model.parts`, loaded on first use on `device` in `dtype`).
    """
    path = Path(path)
    manifest = read_manifest(path)
    if not is_quantized_manifest(manifest):
        raise ValueError(f"{path} is not a qarvd quantized checkpoint (no format {QUANTIZED_FORMAT!r} in its manifest)")
    version = manifest.get("format_version")
    if version != QUANTIZED_FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version}; this qarvd reads version {QUANTIZED_FORMAT_VERSION}: "
            "upgrade qarvd or re-run `qarvd quantize` with this version"
        )
    base = manifest["base_model"]
    try:
        # A base quantized from a file is checked against that file, wherever the id resolves.
        base_path = resolve_weights(base.get("path", base["id"]))
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
    config = config_from_manifest(info["config"])
    with torch.device("meta"):  # every tensor comes from the file: no random init of a 1.3B model to hold
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
    model.load_state_dict({k: v.float() if v.dtype == torch.float16 else v for k, v in state.items()}, assign=True)
    model.quant_info = info
    model.manifest = manifest
    if "kv_cache" in manifest:
        model.kv_quant = KVQuantConfig.from_dict(manifest["kv_cache"])
    if "card" in manifest:
        model.card = card_from_dict(manifest["card"], path)
        model.parts = CardParts(model.card, device, dtype)
    return model.eval()
