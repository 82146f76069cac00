"""Shared fixtures: miniature models with real weights files, built in seconds."""

from __future__ import annotations

import os

# The FBGEMM backend is for AVX2-only hosts, whose int8 kernel saturates 16-bit pair sums; on a
# larger CPU FBGEMM would pick VNNI kernels that never saturate and hide what the backend must
# handle. Capping it (read at its first call) makes every host test the AVX2 kernel.
os.environ.setdefault("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")

import pytest  # noqa: E402
import torch  # noqa: E402

from qarvd_core.checkpoint import save_weights
from qarvd_core.model import ModelArgs, WorldModel

# Tests use one thread: the suite must share two cores with whatever else runs.
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


MINI = ModelArgs(dim=32, n_layers=2, n_heads=2, ffn_dim=64, text_dim=16, window_chunks=2, sink_chunks=1)


def mini_model(seed: int = 0, args: ModelArgs = MINI) -> WorldModel:
    """A miniature model with every weight non-zero (the zero inits would hide bugs)."""
    torch.manual_seed(seed)
    model = WorldModel(args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture
def mini():
    return mini_model()


@pytest.fixture
def mini_weights(tmp_path):
    """A miniature model saved like a shipped one; returns (path, model as loaded back in fp32)."""
    path = save_weights(mini_model(), tmp_path / "mini.safetensors", preset=None)
    from qarvd_core.checkpoint import load_model

    return path, load_model(str(path))


@pytest.fixture
def make_mini():
    return mini_model
