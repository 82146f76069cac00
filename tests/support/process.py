"""`qarvd serve` as a child process on a free loopback port, ready when /readyz says so."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts the server with QARVD_* settings from keyword arguments; `stop()` sends SIGTERM."""

    def __init__(self, ready_timeout: float = 120, command: list[str] | None = None, cwd=None, **settings):
        """`command` runs the CLI (default: this interpreter's `-m qarvd_core`), in `cwd`."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/stream"
        # fp32 eager unless a test asks: `auto` picks bf16 and compiles on AMX hosts, which would
        # make a test's numbers and start-up time depend on the machine it runs on.
        settings = {"dtype": "fp32", "compile": "false", **settings}
        env = {**os.environ, **{f"QARVD_{k.upper()}": str(v) for k, v in settings.items()}}
        # Output goes to a file: a pipe nobody drains fills up (64 KiB of access log) and
        # then blocks the server's event loop on its next log line.
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "qarvd_core"]), "serve", "--port", str(self.port)],
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + ready_timeout
        while time.time() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready:\n" + self.output())

    def output(self) -> str:
        """Everything the server printed so far."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
