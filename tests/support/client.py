"""A small synchronous client for the WebSocket stream protocol (tests and benchmarks)."""

from __future__ import annotations

import io
import json
import socket
import struct
import time

from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect


def parse_frame(data: bytes) -> tuple[dict, Image.Image]:
    n = struct.unpack(">I", data[:4])[0]
    return json.loads(data[4 : 4 + n]), Image.open(io.BytesIO(data[4 + n :]))


class StreamClient:
    def __init__(self, url: str, recv_buffer: int | None = None, **kw):
        if recv_buffer is not None:  # a tiny kernel receive buffer makes a slow reader felt at once
            host, port = url.split("//")[1].split("/")[0].split(":")
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
            sock.connect((host, int(port)))
            kw["sock"] = sock
        self.ws = connect(url, open_timeout=10, max_size=2**22, legacy=True, **kw)
        self.messages: list[dict] = []

    def send(self, msg) -> None:
        self.ws.send(msg if isinstance(msg, str | bytes) else json.dumps(msg))

    def start(self, **fields) -> dict:
        self.send({"type": "start", **fields})
        return self.next_json("ready")

    def next_json(self, kind: str | None = None, timeout: float = 10) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = self.ws.recv(timeout=max(0.01, deadline - time.time()))
            if isinstance(m, str):
                j = json.loads(m)
                self.messages.append(j)
                if kind is None or j["type"] == kind:
                    return j
        raise TimeoutError(f"no {kind} message")

    def frames(self, n: int, timeout: float = 30) -> list[tuple[dict, Image.Image]]:
        out, deadline = [], time.time() + timeout
        while len(out) < n and time.time() < deadline:
            try:
                m = self.ws.recv(timeout=max(0.01, deadline - time.time()))
            except TimeoutError:
                break
            if isinstance(m, bytes):
                out.append(parse_frame(m))
            else:
                self.messages.append(json.loads(m))
        return out

    def close_code(self, timeout: float = 10) -> int | None:
        """Read until the server closes; its close code."""
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                self.ws.recv(timeout=max(0.01, deadline - time.time()))
        except ConnectionClosed as e:
            return e.rcvd.code if e.rcvd else None
        return None

    def close(self) -> None:
        self.ws.close()
