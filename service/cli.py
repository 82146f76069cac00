"""The service's commands, `qarvd serve` and `qarvd worker`: pyproject.toml declares them in the
`qarvd.commands` entry-point group, and the core's `qarvd` command adds them from there.

The server's dependencies are imported when a command runs: `qarvd --help` lists these
commands by loading this module.
"""

from __future__ import annotations

import socket

import typer

from qarvd_core.cli import fail

app = typer.Typer(
    help="The qarvd service: API server and quantization worker.", no_args_is_help=True, add_completion=False
)


@app.command()
def serve(
    host: str = typer.Option(None, help="bind address (default QARVD_HOST or 127.0.0.1)"),
    port: int = typer.Option(None, help="port (default QARVD_PORT or 8000)"),
    model: str = typer.Option(None, help="default model (default QARVD_DEFAULT_MODEL or tiny-world)"),
):
    """Run the API server: WebSocket streams, videos, models, metrics, and the demo at /."""
    import uvicorn

    from service.main import create_app
    from service.server import Server
    from service.settings import Settings

    overrides = {k: v for k, v in {"host": host, "port": port, "default_model": model}.items() if v is not None}
    settings = Settings(**overrides)
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if settings.send_buffer_bytes:
        # Accepted sockets inherit it: a client that stops reading is felt after this many bytes.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.send_buffer_bytes)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as e:
        fail(f"cannot listen on {settings.host}:{settings.port}: {e.strerror}")
    embedded = None
    if not settings.redis_url:
        from service.jobs.embedded import EmbeddedQueue

        embedded = EmbeddedQueue(settings)
        settings = settings.model_copy(update={"redis_url": embedded.url, "threads": embedded.engine_threads})
    typer.echo(f"qarvd: demo at http://{settings.host}:{settings.port}/  (model {settings.default_model})", err=True)
    config = uvicorn.Config(
        create_app(settings, on_shutdown=embedded.stop if embedded else None),
        log_level="info",
        timeout_graceful_shutdown=5,
        ws_max_size=max(settings.max_message_bytes * 4, 16384),
    )
    try:
        Server(config).run(sockets=[sock])
    finally:
        if embedded is not None:
            embedded.stop()


@app.command()
def worker():
    """Run quantization jobs from the Redis queue (QARVD_REDIS_URL); any number, any host."""
    import asyncio
    import logging

    from service.jobs.worker import run_worker
    from service.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        status = asyncio.run(run_worker(Settings()))
    except ValueError as e:
        fail(str(e))
    raise typer.Exit(status)
