"""Where models come from: shipped weights by name, or a path to a weights file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qarvd_core.model import ModelArgs, WorldModel

WEIGHTS_DIR = Path(__file__).parent / "weights"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the generation dtypes, by their CLI/setting names


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
    attention, kept layers), and their scales stay fp32.
    """
    weights = resolve_weights(name_or_path)
    manifest = read_manifest(weights)
    if manifest.get("format") == "qarvd-quantized":
        from qarvd_core.quant import set_compute_dtype, set_mode
        from qarvd_core.quant.serialization import load_quantized

        model = set_compute_dtype(load_quantized(weights).to(device), dtype)
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
