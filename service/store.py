"""The model store: every model the service can run, by id.

Ids name the shipped base models, the checkpoints in the artifact directory (the
quantized models that jobs publish) and the Wan model cards there (`NAME.json` with
`"format": "qarvd-wan-card"`, base models whose weights live where the card points) and
the cards named by path (`cards`, the QARVD_MODEL_CARDS setting). The
API lists and deletes models through it, the engine loads from it, and the worker finds
base models in it and publishes into it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qarvd_core.checkpoint import WEIGHTS_DIR, is_quantized_manifest, read_manifest, sha256_of, shipped_models
from qarvd_core.wan import is_card, read_card

# Ids are names, never paths: no '/', and no leading '.'.
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_ID = re.compile(MODEL_ID_PATTERN)


class UnknownModel(LookupError):
    pass


class DeleteRefused(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelRecord:
    """What the store knows of a model: its files and its manifest's summary."""

    id: str
    path: Path  # the weights, the manifest beside them (.json); or a model card
    kind: Literal["base", "quantized"]
    sha256: str
    size_bytes: int
    base: str | None = None  # the FP model a quantized one was made from
    method: str | None = None
    w_bits: int | None = None
    a_bits: int | None = None
    metrics: dict | None = None
    created: str | None = None
    kv_cache: dict | None = None  # how its streams store their KV cache (None: full precision)


class ModelStore:
    """Shipped base models, the checkpoints and model cards in `artifact_dir`, and the model
    cards named in `cards`; reads the disk on every call, so every process sharing the
    directory sees the same models."""

    def __init__(self, artifact_dir: Path, cards: Sequence[Path] = ()):
        self.artifact_dir = Path(artifact_dir)
        self.cards = {Path(c).stem: Path(c) for c in cards}

    def path_of(self, model_id: str) -> Path:
        """The weights of `model_id`, which has a manifest beside them, or its model card; raises UnknownModel."""
        if not _ID.match(model_id):
            raise UnknownModel(f"invalid model id {model_id!r}")
        for directory in (WEIGHTS_DIR, self.artifact_dir):
            p = directory / f"{model_id}.safetensors"
            if p.is_file() and p.with_suffix(".json").is_file():
                return p
        for card in (self.artifact_dir / f"{model_id}.json", self.cards.get(model_id)):
            if card is not None and is_card(card):
                return card
        raise UnknownModel(f"unknown model {model_id!r}; GET /v1/models lists the available ones")

    def ids(self) -> list[str]:
        found = set(shipped_models())
        if self.artifact_dir.is_dir():
            found |= {p.stem for p in self.artifact_dir.glob("*.safetensors") if p.with_suffix(".json").is_file()}
            found |= {p.stem for p in self.artifact_dir.glob("*.json") if is_card(p)}
        found |= {i for i, p in self.cards.items() if is_card(p)}
        return sorted(i for i in found if _ID.match(i))

    def record(self, model_id: str) -> ModelRecord:
        path = self.path_of(model_id)
        if path.suffix == ".json":  # a model card: the card's hash, the transformer's size
            weights = read_card(path).transformer
            size = weights.stat().st_size if weights.is_file() else 0
            return ModelRecord(id=model_id, path=path, kind="base", sha256=sha256_of(path), size_bytes=size)
        m = read_manifest(path)
        common = {"id": model_id, "path": path, "sha256": m["sha256"], "size_bytes": path.stat().st_size}
        if not is_quantized_manifest(m):
            return ModelRecord(kind="base", **common)
        cfg = m["quantization"]["config"]
        return ModelRecord(
            kind="quantized",
            base=m["base_model"]["id"],
            method=cfg["method"],
            w_bits=cfg["w_bits"],
            a_bits=cfg["a_bits"],
            metrics=m.get("evaluation"),
            created=m.get("created"),
            kv_cache=m.get("kv_cache"),
            **common,
        )

    def publish(self, weights: Path) -> str:
        """Move a checkpoint (weights and the manifest beside them) into the artifact directory,
        manifest last: a model is listed only once both files are complete. Returns its id."""
        weights = Path(weights)
        os.replace(weights, self.artifact_dir / weights.name)
        os.replace(weights.with_suffix(".json"), self.artifact_dir / weights.with_suffix(".json").name)
        return weights.stem

    def delete(self, model_id: str, in_use: set[str] = frozenset()) -> None:
        """Remove a quantized model's files; base models and the models `in_use` are refused."""
        record = self.record(model_id)
        if record.kind == "base":
            raise DeleteRefused(f"{model_id!r} is a base model; only quantized models can be deleted")
        if model_id in in_use:
            raise DeleteRefused(f"{model_id!r} is in use by a live session")
        record.path.with_suffix(".json").unlink(missing_ok=True)  # manifest first: unlisted at once
        record.path.unlink(missing_ok=True)
