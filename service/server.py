"""uvicorn's server, adapted to live streams: small send buffers, and streams told why they end."""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

# How long clients get to read their `ended` message and close before uvicorn drops them.
END_SESSIONS_TIMEOUT_S = 1.0
# Bytes of a WebSocket that may wait unsent in the kernel and in the transport's buffer: about
# a frame. Past it a send waits, and newer frames wait in the session's queue, where they are
# dropped when stale. Kernel buffers sized for throughput hold seconds of frames that could
# never be taken back (a client that stops reading would later see a world seconds old).
UNSENT_BYTES = 4096


class _WebSocketProtocol(AutoWebSocketsProtocol):  # type: ignore[misc, valid-type]
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=UNSENT_BYTES)  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_NOTSENT_LOWAT"):  # Linux and macOS
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, UNSENT_BYTES)


class Server(uvicorn.Server):
    """On shutdown uvicorn closes every WebSocket at once, with 1012 and no reason, before the
    app hears of it. Ending the sessions first sends each client an `ended` message with the
    reason "server restarting" and a 1012 close that says so."""

    def __init__(self, config: uvicorn.Config):
        config.ws = _WebSocketProtocol
        super().__init__(config)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.config.app.state.engine.end_sessions("server restarting", END_SESSIONS_TIMEOUT_S)
        await super().shutdown(sockets)
