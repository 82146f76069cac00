"""Model registry: shipped base models and quantized checkpoints in the artifact directory."""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from qarvd_core.checkpoint import WEIGHTS_DIR, is_quantized_manifest, load_model, read_manifest, shipped_models
from qarvd_core.model import WorldModel
from service.schemas import ModelInfo

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class UnknownModel(LookupError):
    pass


class ModelInUse(RuntimeError):
    pass


class ModelRegistry:
    """Resolves model ids to weights files and keeps up to `max_loaded` models in memory.

    Loading is on demand; past the budget the least recently used model that no session
    is using is unloaded (`in_use` says which are). Thread-safe.
    """

    def __init__(
        self,
        artifact_dir: Path,
        max_loaded: int = 4,
        in_use: Callable[[], set[str]] = set,
        dtype: torch.dtype = torch.float32,
        compile_blocks: bool = False,
        max_autotune: bool = False,
    ):
        self.artifact_dir = Path(artifact_dir)
        self.max_loaded = max_loaded
        self.in_use = in_use
        self.dtype, self.compile_blocks, self.max_autotune = dtype, compile_blocks, max_autotune
        self._loaded: OrderedDict[str, WorldModel] = OrderedDict()
        self._lock = threading.Lock()

    def path_of(self, model_id: str) -> Path:
        # Ids are names, never paths: the pattern has no '/' and cannot start with '.'.
        if not _ID.match(model_id):
            raise UnknownModel(f"invalid model id {model_id!r}")
        for directory in (WEIGHTS_DIR, self.artifact_dir):
            p = directory / f"{model_id}.safetensors"
            if p.is_file() and p.with_suffix(".json").is_file():
                return p
        raise UnknownModel(f"unknown model {model_id!r}; GET /v1/models lists the available ones")

    def ids(self) -> list[str]:
        found = set(shipped_models())
        if self.artifact_dir.is_dir():
            found |= {p.stem for p in self.artifact_dir.glob("*.safetensors") if p.with_suffix(".json").is_file()}
        return sorted(i for i in found if _ID.match(i))

    def info(self, model_id: str) -> ModelInfo:
        path = self.path_of(model_id)
        m = read_manifest(path)
        common = {"id": model_id, "sha256": m["sha256"], "size_bytes": path.stat().st_size}
        if is_quantized_manifest(m):
            cfg = m["quantization"]["config"]
            return ModelInfo(
                kind="quantized",
                base=m["base_model"]["id"],
                method=cfg["method"],
                w_bits=cfg["w_bits"],
                a_bits=cfg["a_bits"],
                metrics=m.get("evaluation"),
                created=m.get("created"),
                **common,
            )
        return ModelInfo(kind="base", **common)

    def base_of(self, model_id: str) -> str | None:
        """The FP base model id of a quantized model (None for a base model)."""
        m = read_manifest(self.path_of(model_id))
        return m["base_model"]["id"] if is_quantized_manifest(m) else None

    def get(self, model_id: str) -> WorldModel:
        """The loaded model, loading it on first use."""
        with self._lock:
            if model_id not in self._loaded:
                model = load_model(str(self.path_of(model_id)), dtype=self.dtype)
                self._loaded[model_id] = model.compile_blocks(self.max_autotune) if self.compile_blocks else model
                self._evict(keep=model_id)
            self._loaded.move_to_end(model_id)
            return self._loaded[model_id]

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def _evict(self, keep: str) -> None:
        busy = self.in_use() | {keep}
        for victim in [m for m in self._loaded if m not in busy]:
            if len(self._loaded) <= self.max_loaded:
                break
            del self._loaded[victim]

    def delete(self, model_id: str) -> None:
        """Remove a quantized model's files; base models and models in use are refused."""
        path = self.path_of(model_id)
        if self.base_of(model_id) is None:
            raise ModelInUse(f"{model_id!r} is a base model; only quantized models can be deleted")
        if model_id in self.in_use():
            raise ModelInUse(f"{model_id!r} is in use by a live session")
        with self._lock:
            self._loaded.pop(model_id, None)
            path.with_suffix(".json").unlink(missing_ok=True)  # manifest first: unlisted at once
            path.unlink(missing_ok=True)
