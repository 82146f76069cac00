"""The engine on its device: models loaded where QARVD_DEVICE says, an out-of-memory chunk ending
only its own batch, and the device and batch metrics."""

import asyncio
import time

import pytest
import torch

from qarvd_core import runtime
from service.engine import Engine
from service.engine.engine import session_bytes
from service.metrics import Metrics
from service.settings import Settings
from service.store import ModelStore


def make_engine(artifact_dir, **settings) -> Engine:
    s = Settings(artifact_dir=artifact_dir, default_model="mini", threads=1, dtype="fp32", compile=False, **settings)
    return Engine(s, Metrics(), ModelStore(artifact_dir))


async def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        assert time.perf_counter() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("asked", ["cpu", "auto"])
def test_the_engine_loads_its_models_and_shadows_on_its_device(artifact_dir, asked):
    engine = make_engine(artifact_dir, device=asked)
    want = runtime.resolve_device(asked)
    assert engine.device == want and engine.plan.device == str(want)
    for model_id in ("mini", "mini-rtn-w8a8"):
        assert {b.device for b in engine._models.get(model_id).buffers()} | {
            p.device for p in engine._models.get(model_id).parameters()
        } == {want}
    asyncio.run(engine.stop())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_an_engine_on_a_missing_cuda_device_refuses_to_start(artifact_dir):
    with pytest.raises(ValueError, match="sees no CUDA device"):
        make_engine(artifact_dir, device="cuda")


def test_out_of_device_memory_in_a_chunk_ends_only_that_batchs_sessions(artifact_dir):
    """A real torch.cuda.OutOfMemoryError from inside one model's forward pass ends the sessions of
    that batch (their clients get 1011), and the other model's session and new ones carry on."""

    def out_of_memory(_module, _args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    async def scenario():
        engine = make_engine(artifact_dir, drift_sample_rate=0.0)
        await engine.start()
        try:
            hook = engine._models.get("mini-rtn-w8a8").blocks[0].register_forward_pre_hook(out_of_memory)
            doomed = []
            for seed in (1, 2):  # held paused until both are open, so that they are one batch
                doomed.append(await engine.open_session("mini-rtn-w8a8", "forest", seed, "jpeg", 80))
                engine.set_paused(doomed[-1], True)
            for s in doomed:
                engine.set_paused(s, False)
            healthy = await engine.open_session("mini", "forest", 0, "jpeg", 80)
            await wait_for(lambda: all(s.end_reason is not None for s in doomed))
            hook.remove()
            made = healthy.frames_generated
            await wait_for(lambda: healthy.frames_generated > made + 6)
            again = await engine.open_session("mini-rtn-w8a8", "forest", 3, "jpeg", 80)
            await wait_for(lambda: again.frames_generated > 0)
            return doomed, healthy, engine.metrics.exposition().decode()
        finally:
            await engine.stop()

    doomed, healthy, exposition = asyncio.run(scenario())
    for s in doomed:
        assert s.failed and s.end_reason == "generation failed: out of device memory"
    assert healthy.end_reason is None
    assert 'qarvd_device_out_of_memory_total{model="mini-rtn-w8a8"} 1.0' in exposition  # one batch of two


def test_batch_sizes_are_exported_per_model_and_device_memory_only_on_cuda(artifact_dir):
    async def scenario():
        engine = make_engine(artifact_dir, drift_sample_rate=0.0)
        await engine.start()
        try:
            sessions = [await engine.open_session("mini", "forest", seed, "jpeg", 80) for seed in (1, 2)]
            await wait_for(lambda: all(s.frames_generated > 6 for s in sessions))
            return engine.metrics.exposition().decode()
        finally:
            await engine.stop()

    exposition = asyncio.run(scenario())
    assert 'qarvd_batch_sessions_count{model="mini"}' in exposition
    on_cuda = "qarvd_device_memory_allocated_bytes" in exposition
    assert on_cuda == torch.cuda.is_available() == ("qarvd_device_memory_reserved_bytes" in exposition)


def test_the_admission_estimate_covers_a_streams_cache_and_its_batched_copy(artifact_dir):
    from qarvd_core.checkpoint import load_model
    from qarvd_core.sampling import Stream

    model = load_model(str(artifact_dir / "mini.safetensors"), dtype=torch.bfloat16)
    cache = Stream(model, "forest", 0).cache
    held = cache.k.nbytes + cache.v.nbytes
    assert 2 * held < session_bytes(model.args, torch.bfloat16) < 3 * held
