"""A Wan model card end to end, on a tiny random card: load -> `qarvd quantize --method qarvd
--w-bits 4 --a-bits 8` on calibration prompts -> save -> load -> a real server streaming the
quantized model over the WebSocket with a text prompt and a prompt switch, and rendering a
video of a number of chunks; and the same through a quantization job on the server's worker."""

from __future__ import annotations

import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from qarvd_core.checkpoint import load_model, read_manifest
from qarvd_core.cli import app
from qarvd_core.eval.metrics import psnr
from qarvd_core.sampling import Stream
from tests.support.client import StreamClient
from tests.support.process import ServerProcess
from tests.support.wan_card import write_wan_card

pytest.importorskip("diffusers")  # the [wan] extra

PROMPTS = ["a red fox runs in snow", "", "a cat on the beach at night"]
FOX, CITY = "a red fox runs in snow", "a blue city at night"


@pytest.fixture(scope="module")
def starting(tmp_path_factory):
    """The card `tiny-wan` in an artifact directory, and `qarvd serve` on it (its own Redis server
    and worker; every chunk shadowed in FP) starting on a thread: it loads while the model is
    quantized and checked here, a quantized model appearing in the directory as it would in use."""
    arts = tmp_path_factory.mktemp("artifacts")
    write_wan_card(arts)
    settings = dict(artifact_dir=arts, default_model="tiny-wan", threads=1, worker_nice=0)
    settings.update(data_dir=tempfile.mkdtemp(prefix="qarvd-data-"), drift_sample_rate="1.0", max_frame_age_s="30")
    with ThreadPoolExecutor(1) as pool:
        server = pool.submit(ServerProcess, **settings)
        yield arts, server
        if server.exception() is None:
            server.result().stop()


@pytest.fixture(scope="module")
def artifacts(starting, tmp_path_factory):
    """The artifact directory, now also holding the card's W4A8 Q-ARVD checkpoint `tiny-wan-w4a8`."""
    arts, _ = starting
    prompts = tmp_path_factory.mktemp("calibration") / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["quantize", "--model", str(arts / "tiny-wan.json"), "--method", "qarvd", "--w-bits", "4", "--a-bits", "8"]
    args += ["--prompts", str(prompts), "--calib-chunks", "2", "--out", str(arts / "tiny-wan-w4a8.safetensors")]
    args += ["-o", "recon_iters=2", "-o", "sensitivity_rollouts=1"]  # the method's every stage, briefly
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return arts


@pytest.fixture(scope="module")
def server(starting, artifacts):
    """The started server, once the quantized model is in its directory."""
    return starting[1].result()


def test_the_checkpoint_records_its_card_and_prompts_and_streams_like_its_base(artifacts, tmp_path):
    manifest = read_manifest(artifacts / "tiny-wan-w4a8.safetensors")
    # Quantized from the card's path: the base is named as the store knows it, and its file kept.
    base = manifest["base_model"]
    assert (base["id"], base["path"]) == ("tiny-wan", str((artifacts / "tiny-wan.json").resolve()))
    assert manifest["card"]["vae"] == str((artifacts / "Wan2.1-T2V-1.3B-Diffusers/vae").resolve())
    calibration = manifest["quantization"]["calibration"]
    assert (calibration["prompts"], calibration["rollouts"]) == ([PROMPTS[0], PROMPTS[2]], 2)
    evaluation = manifest["evaluation"]  # -FP on the calibration prompts, unseen noise
    assert len(evaluation["psnr_db_per_chunk"]) == 3 and evaluation["psnr_db_mean"] > 20
    shown = CliRunner().invoke(app, ["inspect", str(artifacts / "tiny-wan-w4a8.safetensors")]).output
    assert f"card         sampling self-forcing, text encoder {manifest['card']['text_encoder']}" in shown

    quant = load_model(str(artifacts / "tiny-wan-w4a8.safetensors"))
    base = load_model(str(artifacts / "tiny-wan.json"))
    assert replace(quant.parts.card, path=base.card.path) == base.card

    # W4A8 tracks the FP model it was made from, on prompts it was not calibrated on.
    prompts, report = tmp_path / "eval.txt", tmp_path / "eval.json"
    prompts.write_text(f"{FOX}\n{CITY}\n")
    args = [
        "eval",
        "--model",
        str(artifacts / "tiny-wan-w4a8.safetensors"),
        "--reference",
        str(artifacts / "tiny-wan.json"),
    ]
    result = CliRunner().invoke(app, [*args, "--prompts", str(prompts), "--chunks", "2", "--json", str(report)])
    assert result.exit_code == 0, result.output
    measured = json.loads(report.read_text())
    assert len(measured["psnr_db_per_chunk"]) == 2 and len(measured["psnr_db_per_prompt"]) == 2
    assert measured["psnr_db_mean"] > 20
    # The same report as a world model's: the Markdown table (printed) and the plots beside the JSON.
    per_chunk = ", ".join(f"{v:.2f}" for v in measured["psnr_db_per_chunk"])
    assert f"| PSNR dB per chunk | {per_chunk} |" in result.stdout
    assert f"| PSNR dB vs reference | {measured['psnr_db_mean']:.3f} |" in report.with_suffix(".md").read_text()
    assert report.with_suffix(".png").stat().st_size > 1000


def _drain(client: StreamClient) -> list:
    """Every frame already on its way."""
    frames = []
    while batch := client.frames(100, timeout=1.5):
        frames += batch
    return frames


def test_a_quantized_card_streams_text_prompts_and_renders_videos(artifacts, server):
    models = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()}
    assert models["tiny-wan"]["kind"] == "base"
    assert models["tiny-wan-w4a8"]["kind"] == "quantized"

    c = StreamClient(server.ws_url)
    c.send({"type": "start", "model": "tiny-wan-w4a8"})  # a text model needs its prompt
    assert c.next_json("error")["code"] == "bad_prompt"
    ready = c.start(model="tiny-wan-w4a8", prompt=FOX, seed=5, format="png")
    assert (ready["width"], ready["height"], ready["frames_per_chunk"]) == (48, 32, 12)
    first = c.frames(9)
    assert [h["index_in_chunk"] for h, _ in first] == list(range(9))
    assert {(h["chunk"], h["action"]) for h, _ in first} == {(0, None)}
    assert first[0][1].size == (48, 32)
    c.send({"type": "action", "action": "left"})
    assert c.next_json("error")["code"] == "action_not_supported"

    c.send({"type": "pause"})
    before = first + _drain(c)
    c.send({"type": "prompt", "prompt": CITY})
    c.send({"type": "resume"})
    after = c.frames(12)
    # Shadowed on the card it was quantized from, which the manifest names by its path.
    assert c.next_json("stats", timeout=5)["drift_psnr_db"] > 20
    switched = after[0][0]["chunk"]
    assert [h["chunk"] for h, _ in after] == [switched] * 12
    assert len(before) == 9 + 12 * (switched - 1)  # nothing lost on the way
    c.send({"type": "stop"})
    assert c.close_code() == 1000

    # The same stream in this process, switching before the same chunk, makes the same frames
    # (up to the server's kernels); staying on the first prompt makes others.
    model = load_model(str(artifacts / "tiny-wan-w4a8.safetensors"))
    here = Stream(model, FOX, 5)
    for _ in range(switched):
        here.step()
    stayed = here.fork()
    here.set_prompt(CITY)
    got = np.stack([np.asarray(img) for _, img in after])
    same, other = psnr(got, here.step()), psnr(got, stayed.step())
    assert same.min() > 60
    assert other.mean() < same.mean() - 20

    request = {"model": "tiny-wan-w4a8", "prompt": FOX}
    video = httpx.post(server.url + "/v1/videos", json={**request, "chunks": 2}, timeout=60)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    refused = httpx.post(server.url + "/v1/videos", json={**request, "actions": "left*3"}, timeout=60)
    assert refused.status_code == 422 and "takes no actions" in refused.json()["detail"][0]["msg"]


def test_a_job_quantizes_a_card_on_prompts_into_a_model_that_streams(server):
    request = {
        "base_model": "tiny-wan",
        "method": "qarvd",
        "w_bits": 4,
        "a_bits": 8,
        "options": {"recon_iters": 2, "sensitivity_rollouts": 1},
        "calibration_prompts": [FOX, CITY],
        "calibration_chunks": 2,
    }
    job = httpx.post(server.url + "/v1/quantization-jobs", json=request, timeout=30).json()["id"]
    deadline = time.time() + 120
    while (view := httpx.get(f"{server.url}/v1/quantization-jobs/{job}", timeout=10).json())["status"] not in (
        "succeeded",
        "failed",
    ):
        assert time.time() < deadline, "the job did not finish:\n" + server.output()[-3000:]
        time.sleep(0.3)
    assert view["status"] == "succeeded", view["error"]
    assert view["metrics"]["psnr_db_mean"] > 20
    model = view["result_model"]
    assert httpx.get(f"{server.url}/v1/models/{model}").json()["base"] == "tiny-wan"

    c = StreamClient(server.ws_url)
    assert c.start(model=model, prompt=CITY)["model"] == model
    assert [h["index_in_chunk"] for h, _ in c.frames(21)] == [*range(9), *range(12)]
    # Every chunk is shadowed on the FP card, from the same state: its frames are close.
    assert c.next_json("stats", timeout=5)["drift_psnr_db"] > 20
    c.close()
