"""What the embedded HTTP servers share: the lifecycle (start on a (free) port, stop, use as an
async context manager), the standalone `python -m` entry, and the admin APIs' JSON body check."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn, Self

from aiohttp import web

__all__ = ["LoopbackServer", "json_body", "run_standalone", "until_terminated"]


class LoopbackServer:
    """An aiohttp server; subclasses add their routes in `routes()`.

    `port` is the bound port once started (port 0 picks a free one); start and stop are
    idempotent.
    """

    client_max_size = 64 * 1024 * 1024
    shutdown_timeout = 60.0  # aiohttp's default: how long stop() lets open requests finish

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = 0
        self._want_port = port
        self._runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        """Add this server's routes."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start listening (idempotent)."""
        if self._runner is not None:
            return
        app = web.Application(client_max_size=self.client_max_size)
        self.routes(app)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=self.shutdown_timeout
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._want_port)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening and drop open connections (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @property
    def base_url(self) -> str:
        """The root URL, e.g. http://127.0.0.1:PORT (loopback when bound to every address)."""
        host = "127.0.0.1" if self.host in {"0.0.0.0", ""} else self.host
        return f"http://{host}:{self.port}"


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body; 400 when it is not JSON or not an object."""
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="body must be JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


async def until_terminated() -> None:
    """Return on the first SIGTERM or SIGINT: the main loop of the standalone servers."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def run_standalone(main: Callable[[], int]) -> NoReturn:
    """`python -m` for a standalone server: JSON logs on stderr (stdout carries what the server
    prints, such as signed URLs), then exit with main()'s status."""
    from sidecar.log import configure_logging

    configure_logging("json", stream=sys.stderr)
    raise SystemExit(main())
