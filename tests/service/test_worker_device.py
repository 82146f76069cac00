"""The job worker takes its device from QARVD_DEVICE, and refuses one this host lacks before it
touches Redis or its own priority."""

import asyncio

import pytest
import torch

from service.jobs.worker import run_worker
from service.settings import Settings


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_a_worker_on_a_missing_cuda_device_refuses_to_start(tmp_path):
    settings = Settings(redis_url="redis://127.0.0.1:9/0", device="cuda:0", artifact_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="sees no CUDA device"):
        asyncio.run(run_worker(settings))
    assert not (tmp_path / "a").exists()
