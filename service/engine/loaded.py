"""The models the engine holds in memory, loaded from the model store on first use."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from qarvd_core import runtime
from qarvd_core.checkpoint import load_model
from qarvd_core.model import WorldModel
from qarvd_core.sampling import release_batch_buffers
from service.store import ModelStore

log = logging.getLogger("qarvd.engine")


class LoadedModels:
    """Up to `max_loaded` models in memory, on `device` in `dtype`, their blocks compiled if asked
    (`compile_quantized`, when given, for models with integer layers), each handed to
    `on_load(model_id, model)` once loaded (the engine warms it up there) before anyone gets it.

    Past the budget the least recently used model that no session is using is unloaded
    (`in_use` says which are). Thread-safe.
    """

    def __init__(
        self,
        store: ModelStore,
        max_loaded: int = 4,
        in_use: Callable[[], set[str]] = set,
        dtype: torch.dtype = torch.float32,
        compile_blocks: bool = False,
        compile_quantized: bool | None = None,
        max_autotune: bool = False,
        device: str = "cpu",
        on_load: Callable[[str, WorldModel], None] | None = None,
    ):
        self.store = store
        self.max_loaded = max_loaded
        self.in_use = in_use
        self.device, self.dtype = device, dtype
        self.compile_blocks, self.max_autotune = compile_blocks, max_autotune
        self.compile_quantized = compile_blocks if compile_quantized is None else compile_quantized
        self.on_load = on_load
        self._loaded: OrderedDict[str, WorldModel] = OrderedDict()
        self.load_seconds: dict[str, float] = {}  # loading, compiling and `on_load`, by model
        # Quantized models measured slower than FP32 on this host, with why: logged and shown in /v1/models.
        self.speed_warnings: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, model_id: str) -> WorldModel:
        """The loaded model, loading it on first use."""
        with self._lock:
            if model_id not in self._loaded:
                t0 = time.perf_counter()
                model = load_model(str(self.store.path_of(model_id)), dtype=self.dtype, device=self.device)
                rows = model.args.tokens_per_frame * model.args.frames_per_chunk
                if warning := runtime.speed_warning(model, rows):
                    log.warning("model %s: %s", model_id, warning)
                    self.speed_warnings[model_id] = warning
                model = model.compile_blocks(self.max_autotune) if self.compiles(model) else model
                if self.on_load is not None:
                    self.on_load(model_id, model)
                self._loaded[model_id] = model
                self.load_seconds[model_id] = time.perf_counter() - t0
                self._evict(keep=model_id)
            self._loaded.move_to_end(model_id)
            return self._loaded[model_id]

    def compiles(self, model: WorldModel) -> bool:
        return self.compile_quantized if hasattr(model, "quant_info") else self.compile_blocks

    def ids(self) -> list[str]:
        return list(self._loaded)

    def unload(self, model_id: str) -> None:
        with self._lock:
            self._drop(model_id)

    def _drop(self, model_id: str) -> None:
        model = self._loaded.pop(model_id, None)
        if model is not None:  # its batch buffers go with it, even while compiled code still refers to it
            release_batch_buffers(model)

    def _evict(self, keep: str) -> None:
        busy = self.in_use() | {keep}
        for victim in [m for m in self._loaded if m not in busy]:
            if len(self._loaded) <= self.max_loaded:
                break
            self._drop(victim)
