"""The engine client in process: renders, models, the render's share of the compute thread, frames
encoded beside the compute thread, and models warmed up when they load."""

import asyncio
import json
import shutil
import struct
import time

import pytest
from torch._dynamo.utils import counters
from typer.testing import CliRunner

from qarvd_core.checkpoint import load_model
from qarvd_core.cli import app
from qarvd_core.sampling import ScriptRender, Stream, step_streams
from qarvd_core.video import encode_mp4
from service.engine import DeleteRefused, Engine, UnknownModel
from service.engine.engine import RENDER_SHARE, Render, encode_frame
from service.metrics import Metrics
from service.settings import Settings
from service.store import ModelStore


def make_engine(artifact_dir, **settings) -> Engine:
    s = Settings(
        **{
            "artifact_dir": artifact_dir,
            "default_model": "mini",
            "threads": 1,
            "dtype": "fp32",
            "compile": False,
            **settings,
        }
    )
    return Engine(s, Metrics(), ModelStore(artifact_dir))


def test_a_render_is_qarvd_generate_byte_for_byte(artifact_dir, tmp_path):
    script = ["right"] * 5 + ["up"] * 3

    async def scenario():
        engine = make_engine(artifact_dir)
        await engine.start()
        try:
            frames = await engine.render("mini-rtn-w8a8", "forest", 2, script)
            video = await engine.render_video("mini-rtn-w8a8", "forest", 2, script, fps=8, scale=2)
            with pytest.raises(UnknownModel):
                await engine.render("nope", "forest", 2, script)
        finally:
            await engine.stop()
        return frames, video

    frames, video = asyncio.run(scenario())
    assert frames.shape[0] == len(script) and video == encode_mp4(frames, fps=8, scale=2)
    # The same script through the CLI: the same padding, steps, trimming and encoder.
    out = tmp_path / "v.mp4"
    args = ["--model", str(artifact_dir / "mini-rtn-w8a8.safetensors"), "--prompt", "forest", "--seed", "2"]
    args += ["--actions", "right*5,up*3", "--fps", "8", "--scale", "2", "--dtype", "fp32", "--no-compile"]
    args += ["--out", str(out)]
    r = CliRunner().invoke(app, ["generate", *args])
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == video


def test_models_are_listed_and_only_unused_quantized_ones_deleted(artifact_dir, tmp_path):
    arts = tmp_path / "a"
    shutil.copytree(artifact_dir, arts)

    async def scenario():
        engine = make_engine(arts)
        assert {"mini", "mini-rtn-w8a8"} <= {m.id for m in engine.models()}
        assert engine.model("mini-rtn-w8a8").base == "mini"
        session = await engine.open_session("mini-rtn-w8a8", "forest", 0, "jpeg", 80)
        with pytest.raises(DeleteRefused, match="in use"):
            engine.delete_model("mini-rtn-w8a8")
        with pytest.raises(DeleteRefused, match="base model"):
            engine.delete_model("mini")
        engine.close_session(session)
        engine.delete_model("mini-rtn-w8a8")
        with pytest.raises(UnknownModel):
            engine.model("mini-rtn-w8a8")
        await engine.stop()

    asyncio.run(scenario())
    assert not list(arts.glob("mini-rtn-w8a8.*"))


def test_renders_take_their_share_only_while_sessions_are_due(artifact_dir):
    async def scenario():
        engine = make_engine(artifact_dir, batch_sessions=False)
        session = await engine.open_session("mini", "forest", 0, "jpeg", 80)
        stream = Stream(load_model(str(artifact_dir / "mini.safetensors")), "forest", 1)
        now = time.perf_counter()
        render = Render("mini", stream, ScriptRender(["right"] * 9, 3), asyncio.get_running_loop().create_future())
        render.waiting_since, render.last_chunk_s = now, 0.1  # it has just had a 0.1 s chunk
        engine.renders.append(render)
        session.next_due = now  # a live session is due: the render waits its turn
        assert engine._due_groups(now) == [[session]]
        turn = now + 0.1 * (1 / RENDER_SHARE - 1)  # the others have had 85% of the time since
        assert engine._due_groups(turn - 0.01) == [[session]]
        assert engine._due_groups(turn + 1e-6) == [[session], [render]]
        session.next_due = now + 1  # no session due: the render goes at once
        assert engine._due_groups(now) == [[render]]
        await engine.stop()

    asyncio.run(scenario())


def test_a_quantized_model_slower_than_fp32_here_says_so_once_loaded(artifact_dir, monkeypatch, caplog):
    from qarvd_core import runtime
    from service.api.models import model_info

    # The measurement itself is timing (runtime.integer_speedup); here it reports a slow host.
    monkeypatch.setattr(runtime, "integer_speedup", lambda model, rows: 0.5 if hasattr(model, "quant_info") else None)

    async def scenario():
        engine = make_engine(artifact_dir)
        await engine.start()
        try:
            assert engine.speed_warning("mini-rtn-w8a8") is None  # not loaded yet: not measured
            await engine.render("mini-rtn-w8a8", "forest", 0, ["right"])
            return {r.id: model_info(r, engine) for r in engine.models()}
        finally:
            await engine.stop()

    infos = asyncio.run(scenario())
    assert infos["mini"].speed_warning is None
    assert "0.50x the speed of FP32" in infos["mini-rtn-w8a8"].speed_warning
    assert "mini-rtn-w8a8" in caplog.text and "0.50x" in caplog.text


def read_frames(session, n: int) -> list[tuple[dict, bytes]]:
    """The next n frames of a session's outbound queue as (header, image bytes)."""

    async def read():
        out = []
        while len(out) < n:
            item = await asyncio.wait_for(session.outbound.get(), timeout=60)
            assert item is not None, session.end_reason
            (size,) = struct.unpack(">I", item.data[:4])
            out.append((json.loads(item.data[4 : 4 + size]), item.data[4 + size :]))
        return out

    return read()


def test_frames_encoded_beside_the_compute_thread_keep_their_order_and_bytes(artifact_dir):
    """Two sessions batched for six chunks: each gets every frame, in order, byte for byte what
    the same streams stepped in process and encoded give; a session whose frames cannot be
    encoded ends alone."""
    n_chunks, actions = 6, ["right", "up"]

    async def scenario():
        engine = make_engine(artifact_dir, drift_sample_rate=0.0, outbound_frames=64, fps_target=1000.0)
        await engine.start()
        try:
            sessions = []
            for seed, action in zip((1, 2), actions):  # held paused until both are open: one batch
                sessions.append(await engine.open_session("mini", "forest", seed, "jpeg", 80))
                engine.set_paused(sessions[-1], True)
                engine.set_action(sessions[-1], action)
            doomed = await engine.open_session("mini-rtn-w8a8", "forest", 3, "nope", 80)  # no such format
            for s in sessions:
                engine.set_paused(s, False)
            n = n_chunks * sessions[0].stream.frames_per_chunk
            got = [await read_frames(s, n) for s in sessions]
            return got, doomed, [s.frames_dropped for s in sessions]
        finally:
            await engine.stop()

    got, doomed, dropped = asyncio.run(scenario())
    assert doomed.failed and doomed.end_reason.startswith("encoding failed: KeyError")
    assert dropped == [0, 0]
    model = load_model(str(artifact_dir / "mini.safetensors"))
    streams = [Stream(model, "forest", seed) for seed in (1, 2)]
    want = [[], []]
    for _ in range(n_chunks):
        for i, frames in enumerate(step_streams(streams, actions)):
            want[i] += [encode_frame(f, "jpeg", 80) for f in frames]
    for frames, expected, action in zip(got, want, actions):
        assert [h["frame"] for h, _ in frames] == list(range(len(expected)))
        assert {h["action"] for h, _ in frames} == {action}
        assert [image for _, image in frames] == expected


def test_a_model_is_warmed_up_when_it_loads_so_live_chunks_never_compile(artifact_dir, tmp_path):
    """Compiled blocks specialise on the batch size: a model loaded for its first session has
    compiled every batch size the loop can give it before that session is admitted."""
    arts = tmp_path / "a"
    shutil.copytree(artifact_dir, arts)
    for suffix in (".safetensors", ".json"):
        shutil.copy(arts / f"mini{suffix}", arts / f"other{suffix}")

    async def scenario():
        engine = make_engine(arts, compile=True, max_sessions=2, drift_sample_rate=0.0, fps_target=1000.0)
        await engine.start()
        try:
            first = await engine.open_session("other", "forest", 1, "jpeg", 80)  # loads and warms `other`
            graphs = counters["stats"]["unique_graphs"]
            await wait(lambda: first.frames_generated >= 3 * first.stream.frames_per_chunk)  # alone: batch 1
            second = await engine.open_session("other", "forest", 2, "jpeg", 80)
            await wait(lambda: second.frames_generated >= 6 * second.stream.frames_per_chunk)  # past a roll
            return graphs, counters["stats"]["unique_graphs"], engine.metrics.exposition().decode()
        finally:
            await engine.stop()

    before, after, exposition = asyncio.run(scenario())
    assert before > 0 and after == before
    assert 'qarvd_batch_sessions_bucket{le="2.0",model="other"}' in exposition


async def wait(condition, timeout: float = 120.0) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        assert time.perf_counter() < deadline, "timed out"
        await asyncio.sleep(0.02)
