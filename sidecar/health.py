"""HealthState (what the sidecar knows about itself) and the aiohttp listener serving /healthz,
/readyz, /metrics and /status from it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sidecar.config import HttpSettings
from sidecar.metrics import Metrics
from sidecar.redact import redact

__all__ = ["METRICS_KEY", "STATE_KEY", "HealthServer", "HealthState", "Phase", "make_app", "serve"]

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
        if self.lag_seconds is not None and self.lag_seconds > self.max_lag:
            reasons.append(f"lag {self.lag_seconds:.1f}s over {self.max_lag:g}s")
        if self.child_status is not None:
            reasons.append(f"child exited with status {self.child_status}")
        if self.state == "stopping":
            reasons.append("stopping")
        return reasons

    def count(self, key: str, n: int = 1) -> None:
        """Add n to counts[key]."""
        self.counts[key] = self.counts.get(key, 0) + n

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
            "child": {"pid": self.child_pid, "status": self.child_status},
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }
        return redact(doc)  # type: ignore[no-any-return]


STATE_KEY = web.AppKey("state", HealthState)
METRICS_KEY = web.AppKey("metrics", Metrics)


@dataclass(slots=True)
class HealthServer:
    """Handle on the running listener; port is None when the listener is disabled."""

    host: str | None
    port: int | None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str | None:
        """Base URL, e.g. http://127.0.0.1:8787 (None when disabled)."""
        if self.port is None or self.host is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stop listening; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("health.stopped", port=self.port)


def make_app(state: HealthState, metrics: Metrics) -> web.Application:
    """The aiohttp application with the four routes (exposed for tests and embedding)."""
    app = web.Application()
    app[STATE_KEY] = state
    app[METRICS_KEY] = metrics
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/status", _status)
    return app


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
    runner = web.AppRunner(make_app(state, metrics), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, http.host, http.port)
        await site.start()
        address = runner.addresses[0]
        handle = HealthServer(host=http.host, port=int(address[1]), _runner=runner)
    except BaseException:
        await runner.cleanup()
        raise
    log.info("health.listening", host=http.host, port=handle.port)
    try:
        yield handle
    finally:
        await handle.close()


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY].refreshed()
    reasons = state.reasons()
    request.app[METRICS_KEY].ready.set(0 if reasons else 1)
    return web.json_response(
        {"ready": not reasons, "state": state.state, "reasons": redact(reasons)},
        status=503 if reasons else 200,
    )


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    metrics.ready.set(1 if request.app[STATE_KEY].refreshed().ready else 0)
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].refreshed().status())
