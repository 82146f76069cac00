"""A real uvicorn server process on a loopback port, serving miniature models from an artifact dir."""

from __future__ import annotations

import tempfile

import pytest

from qarvd_core.checkpoint import save_quantized, save_weights
from qarvd_core.quant import CalibrationSet, RTNConfig, quantize
from tests.support.process import ServerProcess


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory):
    """mini (FP) and mini-rtn-w8a8 (quantized from it), as the model store would hold them."""
    from tests.conftest import mini_model

    d = tmp_path_factory.mktemp("artifacts")
    base = mini_model()
    base_path = save_weights(base, d / "mini.safetensors", preset=None)
    q = quantize(
        base, RTNConfig(w_bits=8, a_bits=8), CalibrationSet(rollouts=1, chunks=2, tokens_per_pass=16), progress=False
    )
    save_quantized(q, d / "mini-rtn-w8a8.safetensors", "mini", base_path=base_path)
    return d


def start_server(artifact_dir, **settings) -> ServerProcess:
    """A server on the miniature models (`mini` first unless asked), one compute thread, its own
    embedded Redis directory."""
    settings = {"default_model": "mini", "threads": 1, "data_dir": tempfile.mkdtemp(prefix="qarvd-data-"), **settings}
    return ServerProcess(artifact_dir=artifact_dir, **settings)


@pytest.fixture(scope="module")
def server(artifact_dir):
    s = start_server(
        artifact_dir, max_sessions="3", actions_per_s="20", drift_sample_rate="1.0", send_buffer_bytes="16384"
    )
    yield s
    s.stop()


@pytest.fixture
def make_server(artifact_dir):
    started = []

    def make(**env):
        started.append(start_server(artifact_dir, **env))
        return started[-1]

    yield make
    for s in started:
        s.stop()
