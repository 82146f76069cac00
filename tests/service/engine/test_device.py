"""The engine on its device: models loaded where QARVD_DEVICE says, an out-of-memory chunk ending
only its own batch, admission by each stream's measured bytes, and the device, memory and batch
metrics."""

import asyncio
import time

import numpy as np
import pytest
import torch

from qarvd_core import runtime
from qarvd_core.checkpoint import load_model
from qarvd_core.model import KVCache
from qarvd_core.quant.kv import KVQuantConfig
from qarvd_core.sampling import Stream, batch_row_bytes, to_uint8
from service.engine import Engine
from service.engine.engine import AUTO_MAX_SESSIONS, AUTO_SESSIONS_WITHOUT_BUDGET, AtCapacity
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


def metric(exposition: str, name: str) -> float:
    return float(next(line.split()[-1] for line in exposition.splitlines() if line.startswith(name)))


def test_admission_counts_each_streams_measured_bytes_against_the_memory_budget(artifact_dir):
    """A session is counted at what a real stream of its model holds (KV cache and its batched
    copy); `auto` max sessions is the budget over that, and an explicit number still wins."""
    stream = Stream(load_model(str(artifact_dir / "mini.safetensors")), "forest", 0)
    per_session = 2 * (stream.cache.k.nbytes + stream.cache.v.nbytes)  # no VAE: a pixel-space model
    budget_gib = 2.5 * per_session / 2**30

    async def scenario(**settings):
        engine = make_engine(artifact_dir, drift_sample_rate=0.0, memory_budget_gib=budget_gib, **settings)
        await engine.start()
        try:
            opened = [await engine.open_session("mini", "forest", seed, "jpeg", 80) for seed in (1, 2)]
            with pytest.raises(AtCapacity) as refused:
                await engine.open_session("mini", "forest", 3, "jpeg", 80)
            await wait_for(lambda: all(s.frames_generated > 0 for s in opened))
            exposition = engine.metrics.exposition().decode()
            engine.close_session(opened[0])
            again = await engine.open_session("mini", "forest", 4, "jpeg", 80)  # the budget is freed
            return engine.max_sessions, engine.session_bytes, str(refused.value), exposition, again
        finally:
            await engine.stop()

    limit, measured, refusal, exposition, _ = asyncio.run(scenario())
    assert measured["mini"] == per_session and limit == 2  # auto: 2.5 sessions' bytes hold 2
    assert refusal == "at capacity (2 sessions)"
    assert metric(exposition, 'qarvd_kv_cache_bytes{model="mini"}') == per_session  # two streams' caches
    assert metric(exposition, 'qarvd_session_bytes{model="mini"}') == per_session
    assert metric(exposition, "qarvd_max_sessions") == 2

    limit, _, refusal, exposition, _ = asyncio.run(scenario(max_sessions=3))  # an explicit number wins...
    assert limit == 3 and refusal.startswith("the memory budget is taken")  # ...and the budget still holds
    assert metric(exposition, 'qarvd_sessions_rejected_total{reason="memory_budget"}') == 1


def test_without_a_budget_auto_is_the_cpu_default_and_a_quantized_cache_measures_smaller(artifact_dir):
    async def scenario():
        engine = make_engine(artifact_dir)
        await engine.start()
        try:
            model = load_model(str(artifact_dir / "mini.safetensors"))
            model.kv_quant = KVQuantConfig(8, 8)
            engine._warm_up("mini-kv8", model)  # what a model with an int8 cache is counted at
            stored = KVCache(model.args, 1, quant=model.kv_quant).full_nbytes
            return engine.max_sessions, engine.session_bytes, stored, batch_row_bytes(model), model.args
        finally:
            await engine.stop()

    limit, measured, stored, row, args = asyncio.run(scenario())
    assert limit == AUTO_SESSIONS_WITHOUT_BUDGET
    # A quantized session: its stored codes and scales, their batched copy while a chunk is made,
    # and its row of one layer's working buffers (not a full-precision copy of the whole cache).
    assert measured["mini-kv8"] == 2 * stored + row
    assert row == KVCache(args, 1).nbytes // args.n_layers
    assert measured["mini"] / measured["mini-kv8"] > 2  # 2.2x here: one of only two layers is a large share


@pytest.mark.cuda
def test_on_cuda_a_session_counts_its_chunks_peak_and_frames_leave_through_pinned_memory(artifact_dir):
    x = torch.rand(2, 3, 3, 64, 64, device="cuda") * 2 - 1
    assert np.array_equal(to_uint8(x), to_uint8(x.cpu()))

    async def scenario():
        engine = make_engine(artifact_dir, device="cuda", drift_sample_rate=0.0)
        await engine.start()
        try:
            s = await engine.open_session("mini", "forest", 1, "jpeg", 80)
            await wait_for(lambda: s.frames_generated > 6)
            exposition = engine.metrics.exposition().decode()
            return engine.session_bytes["mini"], s.stream.cache.nbytes, engine.max_sessions, exposition
        finally:
            await engine.stop()

    per_session, cache, limit, exposition = asyncio.run(scenario())
    assert per_session > 2 * cache and 1 <= limit <= AUTO_MAX_SESSIONS  # the chunk's peak counts too
    assert "qarvd_device_memory_allocated_bytes" in exposition
