import json
import signal
import time

import httpx
import pytest

from service.client import StreamClient


def test_full_session_happy_path(server):
    c = StreamClient(server.ws_url)
    ready = c.start(prompt="snow", seed=4, format="jpeg", quality=70)
    assert ready["width"] == ready["height"] == 64 and ready["model"] == "mini" and ready["session"]
    frames = c.frames(6)
    assert len(frames) == 6
    header, image = frames[0]
    assert image.size == (64, 64) and image.format == "JPEG"
    assert {"frame", "chunk", "action", "latency_ms", "ts"} <= set(header)
    assert [h["frame"] for h, _ in frames] == sorted(h["frame"] for h, _ in frames)
    c.send({"type": "action", "action": "right"})
    later = c.frames(9)
    assert later[-1][0]["action"] == "right"
    stats = c.next_json("stats", timeout=5)
    assert stats["fps"] >= 0 and "frames_dropped" in stats
    c.send({"type": "prompt", "prompt": "desert"})
    assert len(c.frames(3)) == 3
    c.send({"type": "pause"})
    time.sleep(0.5)
    c.frames(20, timeout=1)  # drain what was queued
    assert c.frames(1, timeout=1.5) == []  # paused: nothing new
    c.send({"type": "resume"})
    assert len(c.frames(3)) == 3
    c.send({"type": "stop"})
    ended = c.next_json("ended")
    assert ended["reason"] == "stopped" and ended["frames_sent"] > 0
    assert c.close_code() == 1000


@pytest.mark.parametrize(
    "bad, code",
    [
        ("{not json", "bad_json"),
        ({"type": "teleport"}, "bad_message"),
        ({"type": "action", "action": "jump"}, "bad_message"),
        ({"type": "action", "action": 3}, "bad_message"),
        ({"type": "action", "action": "left", "extra": 1}, "bad_message"),
        ({"type": "start", "seed": "seven"}, "already_started"),
        (b"\x00\x01binary", "bad_message"),
    ],
)
def test_malformed_messages_get_an_error_and_the_session_survives(server, bad, code):
    c = StreamClient(server.ws_url)
    c.start()
    c.send(bad)
    err = c.next_json("error")
    assert err["code"] == code or (code == "already_started" and err["code"] == "bad_message")
    assert len(c.frames(3)) == 3  # still streaming
    c.close()


def test_messages_before_start_and_bad_start_fields(server):
    c = StreamClient(server.ws_url)
    c.send({"type": "action", "action": "left"})
    assert c.next_json("error")["code"] == "not_started"
    c.send({"type": "start", "prompt": "moon"})
    assert c.next_json("error")["code"] == "bad_message"
    c.send({"type": "start", "model": "../../etc/passwd"})
    assert c.next_json("error")["code"] == "bad_message"
    c.send({"type": "start", "model": "no-such-model"})
    assert c.next_json("error")["code"] == "unknown_model"
    assert c.start()["model"] == "mini"
    c.close()


def test_huge_message_closes_1009_and_floods_are_rate_limited_without_hurting_others(server):
    other = StreamClient(server.ws_url)
    other.start()
    c = StreamClient(server.ws_url)
    c.start()
    for _ in range(200):
        c.send({"type": "action", "action": "left"})
    assert any(m["type"] == "error" and m["code"] == "rate_limited" for m in [c.next_json("error") for _ in range(3)])
    assert len(other.frames(6)) == 6
    c.send(json.dumps({"type": "action", "action": "x" * 100_000}))
    assert c.close_code() == 1009
    assert len(other.frames(3)) == 3
    other.close()


def test_capacity_refuses_with_1013(server):
    clients = [StreamClient(server.ws_url) for _ in range(3)]
    for c in clients:
        c.start()
    extra = StreamClient(server.ws_url)
    extra.send({"type": "start"})
    assert extra.close_code() == 1013
    for c in clients:
        c.close()


def test_slow_reader_drops_frames_and_others_keep_streaming(server):
    slow = StreamClient(server.ws_url, recv_buffer=4096, max_queue=1)
    slow.start(format="png")  # then never reads again
    fast = StreamClient(server.ws_url)
    fast.start()
    t0 = time.time()
    got = fast.frames(40, timeout=60)
    assert len(got) == 40
    time.sleep(max(0, 4 - (time.time() - t0)))
    metrics = httpx.get(server.url + "/metrics").text
    dropped = sum(
        float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("qarvd_frames_dropped_total")
    )
    assert dropped > 0
    slow.close()
    fast.close()


def test_drift_is_measured_for_quantized_models(server):
    c = StreamClient(server.ws_url)
    c.start(model="mini-rtn-w8a8")
    c.frames(9)
    stats = c.next_json("stats", timeout=5)
    assert stats["drift_psnr_db"] is not None and stats["drift_psnr_db"] > 25
    c.close()


def test_api_keys_and_origins(make_server):
    s = make_server(api_keys='["k1","k2"]', allowed_origins='["http://good.example"]')
    assert StreamClient(s.ws_url).close_code() == 1008  # no key: refused before any session
    assert StreamClient(s.ws_url + "?api_key=wrong").close_code() == 1008
    bad_origin = StreamClient(s.ws_url, additional_headers={"X-API-Key": "k1"}, origin="http://evil.example")
    assert bad_origin.close_code() == 1008
    ok = StreamClient(s.ws_url, additional_headers={"Authorization": "Bearer k2"}, origin="http://good.example")
    assert ok.start()["model"] == "mini"
    ok.close()
    assert httpx.get(s.url + "/v1/models").status_code == 401
    assert httpx.get(s.url + "/v1/models", headers={"X-API-Key": "k1"}).status_code == 200
    assert httpx.get(s.url + "/healthz").status_code == 200


def test_sigterm_tells_sessions_1012_and_exits_cleanly(make_server):
    s = make_server()
    c = StreamClient(s.ws_url)
    c.start()
    c.frames(3)
    s.proc.send_signal(signal.SIGTERM)
    assert c.close_code(timeout=15) == 1012
    code = s.proc.wait(20)
    log = s.output()
    # uvicorn re-raises the signal after a graceful shutdown, so -SIGTERM is a clean exit here.
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in log


def test_compiled_bf16_server_warms_every_batch_size_and_streams(make_server):
    s = make_server(compile="true", dtype="bf16", max_sessions="2")
    clients = [StreamClient(s.ws_url) for _ in range(2)]
    for i, c in enumerate(clients):
        c.start(model="mini-rtn-w8a8", prompt="forest", seed=i)
    for c in clients:
        assert len(c.frames(6)) == 6
        c.close()
    metrics = httpx.get(s.url + "/metrics").text
    assert "qarvd_frames_sent_total" in metrics
