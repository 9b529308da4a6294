"""HealthState (what the sidecar knows about itself) and the listener serving /healthz,
/readyz, /metrics and /status from it.

The listener is a small HTTP/1.1 server on asyncio streams (GET/HEAD, keep-alive, bounded
request heads), not aiohttp: importing aiohttp costs about 80 ms (it builds an SSL context at
import), which `sidecar run` without Realtime would otherwise pay before starting the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from sidecar.config import HttpSettings
from sidecar.metrics import Metrics
from sidecar.redact import redact

__all__ = ["HealthServer", "HealthState", "Phase", "serve"]

log = structlog.get_logger(component="health")

Phase = Literal["starting", "hydrating", "syncing", "stopping"]


@dataclass(slots=True)
class HealthState:
    """Mutable facts the components update in place and the HTTP handlers read (loop thread only).

    ``ready`` means: hydrated, subscribed, not halted, the apply lag under ``max_lag``, and the
    child (when there is one) not exited.
    """

    project_id: str = "local"
    session_id: str = "local"
    state: Phase = "starting"
    hydrated: bool = False
    subscribed: bool = False
    halted: bool = False
    last_event_at: float | None = None  # unix time of the last applied event
    lag_seconds: float | None = None  # how far the files are behind the channel
    max_lag: float = 30.0
    snapshot_id: str | None = None
    last_seq: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    last_error: str | None = None
    fault: str | None = None  # an environment fault being retried (disk full, read-only)
    child_pid: int | None = None
    child_status: int | None = None  # exit status once the child has exited
    started_at: float = field(default_factory=time.time)
    # Called before every read by the HTTP handlers, so answers reflect the components' live
    # state without a polling task (the app sets it).
    refresh: Callable[[], None] | None = field(default=None, repr=False)

    def refreshed(self) -> HealthState:
        """Run the refresh hook (if any) and return self."""
        if self.refresh is not None:
            self.refresh()
        return self

    @property
    def ready(self) -> bool:
        """True when /readyz should answer 200."""
        return not self.reasons()

    def reasons(self) -> list[str]:
        """Why the sidecar is not ready (empty when it is)."""
        reasons: list[str] = []
        if not self.hydrated:
            reasons.append("not hydrated")
        if not self.subscribed:
            reasons.append("not subscribed")
        if self.halted:
            reasons.append("halted")
        if self.fault:
            reasons.append(f"environment fault: {self.fault}")
        if self.lag_seconds is not None and self.lag_seconds > self.max_lag:
            reasons.append(f"lag {self.lag_seconds:.1f}s over {self.max_lag:g}s")
        if self.child_status is not None:
            reasons.append(f"child exited with status {self.child_status}")
        if self.state == "stopping":
            reasons.append("stopping")
        return reasons

    def status(self) -> dict[str, Any]:
        """The /status document, every string redacted."""
        doc = {
            "state": self.state,
            "ready": self.ready,
            "reasons": self.reasons(),
            "project_id": self.project_id,
            "session_id": self.session_id,
            "snapshot_id": self.snapshot_id,
            "last_seq": self.last_seq,
            "last_event_at": self.last_event_at,
            "lag_seconds": self.lag_seconds,
            "hydrated": self.hydrated,
            "subscribed": self.subscribed,
            "halted": self.halted,
            "counts": dict(self.counts),
            "conflicts": list(self.conflicts),
            "last_error": self.last_error,
            "fault": self.fault,
            "child": {"pid": self.child_pid, "status": self.child_status},
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }
        return redact(doc)  # type: ignore[no-any-return]


_MAX_HEAD = 16 * 1024  # request line + headers; a probe sends a few hundred bytes
_IDLE = 30.0  # seconds a keep-alive connection may stay silent
_JSON = "application/json; charset=utf-8"


@dataclass(slots=True)
class HealthServer:
    """Handle on the running listener; port is None when the listener is disabled."""

    host: str | None
    port: int | None
    _server: asyncio.Server | None = None
    _conns: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str | None:
        """Base URL, e.g. http://127.0.0.1:8787 (None when disabled)."""
        if self.port is None or self.host is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stop listening and close open connections; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._conns):
            writer.close()
        await server.wait_closed()
        log.info("health.stopped", port=self.port)


@contextlib.asynccontextmanager
async def serve(
    http: HttpSettings, state: HealthState, metrics: Metrics
) -> AsyncIterator[HealthServer]:
    """Serve the health endpoints on http.host:http.port (0 picks a free port) while inside.

    Yields a handle whose ``port`` is the bound port; with ``http.port is None`` nothing listens
    and the handle's port is None. Raises OSError when the address cannot be bound.
    """
    if http.port is None:
        yield HealthServer(host=None, port=None)
        return
    handle = HealthServer(host=http.host, port=None)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handle._conns.add(writer)
        try:
            await _serve_connection(reader, writer, state, metrics)
        finally:
            handle._conns.discard(writer)
            writer.close()

    server = await asyncio.start_server(on_connect, http.host, http.port, limit=_MAX_HEAD)
    handle._server = server
    handle.port = int(server.sockets[0].getsockname()[1])
    log.info("health.listening", host=http.host, port=handle.port)
    try:
        yield handle
    finally:
        await handle.close()


async def _serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    state: HealthState,
    metrics: Metrics,
) -> None:
    """Answer requests on one connection until the client closes it or asks to."""
    with contextlib.suppress(ConnectionError, TimeoutError, asyncio.IncompleteReadError):
        while True:
            try:
                async with asyncio.timeout(_IDLE):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                await _send(writer, 431, "text/plain", b"request head too large\n", close=True)
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                await _send(writer, 400, "text/plain", b"bad request\n", close=True)
                return
            method, target, version = parts
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
                # Probes send no body; not reading one would desynchronise the connection.
                await _send(writer, 400, "text/plain", b"unexpected body\n", close=True)
                return
            close = (
                version == "HTTP/1.0"
                if "connection" not in headers
                else headers["connection"].lower() == "close"
            )
            status, ctype, body = _route(method, target.partition("?")[0], state, metrics)
            await _send(writer, status, ctype, body, close=close, head_only=method == "HEAD")
            if close:
                return


def _route(method: str, path: str, state: HealthState, metrics: Metrics) -> tuple[int, str, bytes]:
    if method not in {"GET", "HEAD"}:
        return 405, "text/plain", b"method not allowed\n"
    if path == "/healthz":
        return 200, "text/plain; charset=utf-8", b"ok\n"
    if path == "/readyz":
        current = state.refreshed()
        reasons = current.reasons()
        metrics.ready.set(0 if reasons else 1)
        doc = {"ready": not reasons, "state": current.state, "reasons": redact(reasons)}
        return (503 if reasons else 200), _JSON, json.dumps(doc).encode()
    if path == "/metrics":
        metrics.ready.set(1 if state.refreshed().ready else 0)
        return 200, CONTENT_TYPE_LATEST, metrics.render()
    if path == "/status":
        return 200, _JSON, json.dumps(state.refreshed().status()).encode()
    return 404, "text/plain", b"not found\n"


async def _send(
    writer: asyncio.StreamWriter,
    status: int,
    ctype: str,
    body: bytes,
    *,
    close: bool,
    head_only: bool = False,
) -> None:
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Content-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n"
        + ("Allow: GET, HEAD\r\n" if status == 405 else "")
        + f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + (b"" if head_only else body))
    await writer.drain()
