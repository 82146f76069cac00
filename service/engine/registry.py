"""Model registry: shipped base models and quantized checkpoints in the artifact directory."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from qarvd_core.config import WEIGHTS_DIR, load_model, read_manifest, shipped_models
from qarvd_core.model import WorldModel
from service.schemas import ModelInfo

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class UnknownModel(LookupError):
    pass


class ModelRegistry:
    """Resolves model ids to weights files and keeps loaded models (thread-safe)."""

    def __init__(self, artifact_dir: Path):
        self.artifact_dir = Path(artifact_dir)
        self._loaded: dict[str, WorldModel] = {}
        self._lock = threading.Lock()
        self.load_seconds: dict[str, float] = {}

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
        if m.get("format") == "qarvd-quantized":
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
        return m["base_model"]["id"] if m.get("format") == "qarvd-quantized" else None

    def get(self, model_id: str) -> WorldModel:
        """The loaded model, loading it on first use."""
        with self._lock:
            if model_id not in self._loaded:
                t0 = time.perf_counter()
                self._loaded[model_id] = load_model(str(self.path_of(model_id)))
                self.load_seconds[model_id] = time.perf_counter() - t0
            return self._loaded[model_id]
