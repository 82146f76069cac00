import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from qarvd_core.video import read_mp4
from service.client import StreamClient
from service.main import create_app
from service.settings import Settings


def test_models_list_and_lookup(server):
    models = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()}
    assert models["mini"]["kind"] == "base" and len(models["mini"]["sha256"]) == 64
    q = models["mini-rtn-w8a8"]
    assert (q["kind"], q["base"], q["method"], q["w_bits"], q["a_bits"]) == ("quantized", "mini", "rtn", 8, 8)
    assert httpx.get(server.url + "/v1/models/mini").json()["id"] == "mini"
    for bad in ("nope", "..%2F..%2Fetc%2Fpasswd", ".hidden"):
        assert httpx.get(server.url + f"/v1/models/{bad}").status_code == 404


def test_videos_render_mp4_and_validate_input(server, tmp_path):
    r = httpx.post(
        server.url + "/v1/videos",
        json={"model": "mini", "prompt": "forest", "seed": 2, "actions": "right*4,up*3", "scale": 2},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    (tmp_path / "v.mp4").write_bytes(r.content)
    assert read_mp4(tmp_path / "v.mp4").shape == (7, 128, 128, 3)
    for body, code in (
        ({"actions": "right*3", "extra": 1}, 422),
        ({"actions": "jump"}, 422),
        ({"actions": "right*5000"}, 422),
        ({"actions": "right", "model": "nope"}, 404),
        ({"actions": "right", "seed": -1}, 422),
    ):
        assert httpx.post(server.url + "/v1/videos", json=body, timeout=30).status_code == code, body
    big = httpx.post(
        server.url + "/v1/videos", content=b"{" + b" " * 100_000 + b"}", headers={"content-type": "application/json"}
    )
    assert big.status_code == 413


def test_metrics_are_well_formed_and_complete(server):
    c = StreamClient(server.ws_url)
    c.start()
    c.frames(3)
    c.close()
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    for name in (
        "qarvd_time_to_first_frame_seconds",
        "qarvd_frame_generation_seconds",
        "qarvd_chunk_generation_seconds",
        "qarvd_frames_sent",
        "qarvd_frames_dropped",
        "qarvd_sessions_active",
        "qarvd_drift_psnr_db",
        "qarvd_model_load_seconds",
        "qarvd_ready",
    ):
        assert name in families, name
    assert families["qarvd_ready"].samples[0].value == 1
    ttff = [s for s in families["qarvd_time_to_first_frame_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in ttff) >= 1
    for f in families.values():  # no per-session ids as labels
        for s in f.samples:
            assert not ({"session", "session_id", "job"} & set(s.labels))


def test_readiness_waits_for_the_warmed_up_model(artifact_dir):
    app = create_app(Settings(artifact_dir=artifact_dir, default_model="mini", threads=1))

    async def scenario():
        transport = httpx.ASGITransport(app=app)  # no lifespan: the engine has not started
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code == 503
            await app.state.engine.start()
            ready = await client.get("/readyz")
            await app.state.engine.stop()
            return ready

    ready = asyncio.run(scenario())
    assert ready.status_code == 200 and ready.json()["model"] == "mini"


def test_demo_page_is_served(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "<canvas" in r.text and "/v1/stream" in r.text


def test_delete_model_endpoint(artifact_dir, tmp_path):
    import shutil

    from service.process import ServerProcess

    arts = tmp_path / "a"
    shutil.copytree(artifact_dir, arts)
    s = ServerProcess(artifact_dir=arts, default_model="mini", threads=1)
    try:
        assert httpx.delete(s.url + "/v1/models/mini").status_code == 409
        c = StreamClient(s.ws_url)
        c.start(model="mini-rtn-w8a8")
        assert httpx.delete(s.url + "/v1/models/mini-rtn-w8a8").status_code == 409
        c.send({"type": "stop"})
        c.close_code()
        time.sleep(0.5)
        assert httpx.delete(s.url + "/v1/models/mini-rtn-w8a8").status_code == 204
        ids = [m["id"] for m in httpx.get(s.url + "/v1/models").json()]
        assert "mini-rtn-w8a8" not in ids and "mini" in ids
        assert httpx.delete(s.url + "/v1/models/nope").status_code == 404
    finally:
        s.stop()
