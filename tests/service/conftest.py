"""A real uvicorn server process on a loopback port, serving miniature models from an artifact dir."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from qarvd_core.config import save_weights
from qarvd_core.quant import CalibrationSet, RTNConfig, quantize
from qarvd_core.quant.serialization import save_quantized


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory):
    """mini (FP) and mini-rtn-w8a8 (quantized from it), as the registry would hold them."""
    from tests.conftest import mini_model

    d = tmp_path_factory.mktemp("artifacts")
    base = mini_model()
    base_path = save_weights(base, d / "mini.safetensors", preset=None)
    q = quantize(
        base, RTNConfig(w_bits=8, a_bits=8), CalibrationSet(rollouts=1, chunks=2, tokens_per_pass=16), progress=False
    )
    save_quantized(q, d / "mini-rtn-w8a8.safetensors", "mini", base_path=base_path)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, artifact_dir, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/stream"
        full_env = {
            **os.environ,
            "QARVD_ARTIFACT_DIR": str(artifact_dir),
            "QARVD_DEFAULT_MODEL": "mini",
            "QARVD_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            **{f"QARVD_{k.upper()}": v for k, v in env.items()},
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qarvd_core", "serve", "--port", str(self.port)],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready:\n" + self.proc.stdout.read().decode(errors="replace"))

    def stop(self, sig=signal.SIGTERM, timeout=15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server(artifact_dir):
    s = Server(artifact_dir, max_sessions="3", actions_per_s="20", drift_sample_rate="1.0", send_buffer_bytes="16384")
    yield s
    s.stop()


@pytest.fixture
def make_server(artifact_dir):
    started = []

    def make(**env):
        started.append(Server(artifact_dir, **env))
        return started[-1]

    yield make
    for s in started:
        s.stop()
