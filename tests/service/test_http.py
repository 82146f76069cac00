import asyncio
import base64
import json
import secrets
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from qarvd_core.video import read_mp4
from service.main import create_app
from service.settings import Settings
from tests.support.client import StreamClient


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

    from tests.support.process import ServerProcess

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


def _chunked(total: int, prefix: bytes = b""):
    """A body sent with Transfer-Encoding: chunked (no Content-Length), 64 KiB at a time."""
    yield prefix
    for _ in range(0, total, 65536):
        yield b" " * 65536


def _job_count(server) -> int:
    return len(httpx.get(server.url + "/v1/quantization-jobs", params={"limit": 500}).json())


def test_bodies_are_bounded_however_they_are_sent(server):
    r = httpx.post(
        server.url + "/v1/videos",
        content=_chunked(20_000_000, b'{"actions": "right", "pad": "'),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and len(r.content) < 200, r.text[:200]
    jobs_before = _job_count(server)
    job = b'{"base_model": "mini", "method": "rtn", "calibration_rollouts": 1, "calibration_chunks": 2}'
    r = httpx.post(
        server.url + "/v1/quantization-jobs",
        content=(part for part in [job[:-1], *_chunked(1_500_000), b"}"]),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and len(r.content) < 200, r.text[:200]
    assert _job_count(server) == jobs_before


def test_validation_errors_quote_only_an_excerpt_of_the_input(server):
    r = httpx.post(server.url + "/v1/videos", json={"actions": "right", "prompt": "x" * 60_000}, timeout=30)
    assert r.status_code == 422 and len(r.content) < 2000, len(r.content)
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "prompt"] and err["type"] and err["msg"] and len(err["input"]) < 120
    # 422s raised by the routes themselves have the same documented shape: a list of errors.
    r = httpx.post(server.url + "/v1/videos", json={"actions": "jump"}, timeout=30)
    assert r.status_code == 422 and {"loc", "msg", "type"} <= set(r.json()["detail"][0])


def test_video_script_length_is_checked_before_it_is_expanded(server):
    """10^8 frames, or a count of 1,980 digits: refused from the counts, never built."""
    for script in ("none*100000000", "right*3,none*" + "9" * 1980):
        r = httpx.post(server.url + "/v1/videos", json={"actions": script}, timeout=60)
        assert r.status_code == 422 and "over the limit of 600" in r.json()["detail"][0]["msg"], r.text[:300]
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_json_routes_refuse_other_content_types(server):
    """A cross-site HTML form can POST text/plain or a urlencoded body without a CORS preflight."""
    jobs_before = _job_count(server)
    job = '{"base_model": "mini", "method": "rtn", "calibration_rollouts": 1, "calibration_chunks": 2}'
    for route, body in (("/v1/quantization-jobs", job), ("/v1/videos", '{"actions": "right"}')):
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            r = httpx.post(server.url + route, content=body, headers={"content-type": content_type}, timeout=30)
            assert r.status_code == 415 and "application/json" in r.json()["detail"], (route, content_type)
    assert _job_count(server) == jobs_before


def test_bools_are_not_integers(server):
    for body in ({"actions": "right", "seed": False}, {"actions": "right", "fps": True}):
        r = httpx.post(server.url + "/v1/videos", json=body, timeout=30)
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "int_type", body
    job = {"base_model": "mini", "method": "rtn", "calibration_rollouts": 1, "calibration_chunks": 2}
    for field, value in (("seed", False), ("w_bits", True), ("calibration_rollouts", True)):
        r = httpx.post(server.url + "/v1/quantization-jobs", json={**job, field: value})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], (field, r.text[:300])
    c = StreamClient(server.ws_url)
    c.send({"type": "start", "seed": False})
    err = c.next_json("error")
    assert err["code"] == "bad_message" and "seed" in err["message"]
    c.close()


def test_405_lists_every_allowed_method(server):
    for method, path, allowed in (
        ("PUT", "/v1/models/mini", {"GET", "DELETE"}),
        ("POST", "/v1/quantization-jobs/" + "0" * 32, {"GET", "DELETE"}),
        ("DELETE", "/healthz", {"GET"}),
    ):
        r = httpx.request(method, server.url + path)
        assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == allowed, (path, r.headers)


def test_server_errors_are_counted(artifact_dir):
    app = create_app(Settings(artifact_dir=artifact_dir, default_model="mini", threads=1))

    async def scenario():
        transport = httpx.ASGITransport(app=app)  # no lifespan: no job queue, so job routes answer 503
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/v1/quantization-jobs")).status_code == 503
            assert (await client.get("/v1/models")).status_code == 200
            return (await client.get("/metrics")).text

    families = {f.name: f for f in text_string_to_metric_families(asyncio.run(scenario()))}
    samples = {
        s.labels["status"]: s.value for s in families["qarvd_http_server_errors"].samples if s.name.endswith("_total")
    }
    assert samples == {"503": 1}


def test_api_keys_never_reach_the_server_log(make_server):
    """The key sent every supported way (and in a URL, refused) never appears in the server's output."""
    key = "qk-" + secrets.token_urlsafe(16)
    s = make_server(api_keys=json.dumps([key]))
    encoded = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
    for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
        assert httpx.get(s.url + "/v1/models", headers=headers).status_code == 200
        c = StreamClient(s.ws_url, additional_headers=headers)
        assert c.start()["model"] == "mini" and c.frames(1)
        c.close()
    c = StreamClient(s.ws_url, subprotocols=["qarvd", "key." + encoded])  # the demo page's way
    assert c.ws.subprotocol == "qarvd" and c.start()["model"] == "mini" and c.frames(1)
    c.close()
    assert StreamClient(s.ws_url, subprotocols=["qarvd", "key.d3Jvbmc"]).close_code() == 1008
    # A key in the URL is not accepted, and is redacted from the access log all the same.
    assert httpx.get(s.url + "/v1/models", params={"api_key": key}).status_code == 401
    assert StreamClient(s.ws_url + f"?api_key={key}").close_code() == 1008
    r = httpx.get(s.url + "/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    s.stop()
    output = s.output()
    assert "GET /v1/models" in output and "/v1/stream" in output  # the access log is on
    assert key not in output and encoded not in output
