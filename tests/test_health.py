"""Tests for sidecar.health: real HTTP requests to a listener on 127.0.0.1, port 0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from sidecar.config import HttpSettings
from sidecar.health import HealthServer, HealthState, serve
from sidecar.metrics import Metrics
from sidecar.redact import register_secret

LOCAL = HttpSettings(host="127.0.0.1", port=0)
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYXV0aGVudGljYXRlZCJ9.c2lnbmF0dXJlLWJ5dGVz"
SIGNED_URL = "https://x.supabase.co/storage/v1/object/sign/p/s.tar.zst?token=sig-abc123&t=1"


@pytest.fixture
def state() -> HealthState:
    """A fresh HealthState for project p1."""
    return HealthState(project_id="p1", session_id="s1", max_lag=5.0)


@pytest.fixture
def metrics() -> Metrics:
    """A fresh metrics registry."""
    return Metrics("p1", "s1")


@pytest.fixture
async def server(state: HealthState, metrics: Metrics) -> AsyncIterator[HealthServer]:
    """The health listener on a free local port."""
    async with serve(LOCAL, state, metrics) as handle:
        yield handle


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session."""
    async with aiohttp.ClientSession() as session:
        yield session


def make_ready(state: HealthState) -> None:
    """Put state into the ready condition."""
    state.hydrated = True
    state.subscribed = True
    state.state = "syncing"


async def test_binds_port_zero_and_answers_healthz(
    server: HealthServer, http: aiohttp.ClientSession
) -> None:
    """With port 0 the handle reports the bound port, and /healthz answers 200 ok."""
    assert server.port is not None
    assert server.port > 0
    async with http.get(f"{server.url}/healthz") as resp:
        assert resp.status == 200
        assert (await resp.text()).strip() == "ok"


async def test_readiness_follows_state(
    server: HealthServer, http: aiohttp.ClientSession, state: HealthState
) -> None:
    """/readyz is 503 with reasons until ready, and turns unready and ready again with the state."""

    async def readyz() -> tuple[int, dict[str, Any]]:
        async with http.get(f"{server.url}/readyz") as resp:
            return resp.status, await resp.json()

    status, body = await readyz()
    assert status == 503
    assert body["ready"] is False
    assert body["reasons"] == ["not hydrated", "not subscribed"]

    make_ready(state)
    assert await readyz() == (200, {"ready": True, "state": "syncing", "reasons": []})

    state.lag_seconds = 12.5
    status, body = await readyz()
    assert status == 503
    assert body["reasons"] == ["lag 12.5s over 5s"]

    state.lag_seconds = 0.2
    assert (await readyz())[0] == 200

    state.subscribed = False
    status, body = await readyz()
    assert (status, body["reasons"]) == (503, ["not subscribed"])

    state.subscribed = True
    state.halted = True
    assert (await readyz())[1]["reasons"] == ["halted"]

    state.halted = False
    state.child_status = 1
    assert (await readyz())[1]["reasons"] == ["child exited with status 1"]

    state.child_status = None
    assert (await readyz())[0] == 200
    state.state = "stopping"
    assert (await readyz())[1]["reasons"] == ["stopping"]


async def test_metrics_exposition(
    server: HealthServer, http: aiohttp.ClientSession, state: HealthState, metrics: Metrics
) -> None:
    """/metrics serves the Prometheus text format, with the ready gauge kept current."""
    metrics.child_restarts.inc()
    async with http.get(f"{server.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await resp.text()
    assert 'sidecar_ready{project_id="p1",session_id="s1"} 0.0' in text
    assert 'sidecar_child_restarts_total{project_id="p1",session_id="s1"} 1.0' in text

    make_ready(state)
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert 'sidecar_ready{project_id="p1",session_id="s1"} 1.0' in text


async def test_status_is_redacted(
    server: HealthServer, http: aiohttp.ClientSession, state: HealthState
) -> None:
    """/status reports the state as JSON with tokens and signed-URL queries redacted."""
    make_ready(state)
    literal = "plain-secret-value-1234"
    register_secret(literal)
    state.snapshot_id = "snap-7"
    state.last_seq = 41
    state.counts["applied"] = 4
    state.conflicts.append({"path": "a.txt", "policy": "remote-wins", "detail": JWT})
    state.last_error = f"refused {JWT} fetching {SIGNED_URL} with {literal}"
    state.child_pid = 1234
    async with http.get(f"{server.url}/status") as resp:
        assert resp.status == 200
        raw = await resp.text()
        body = await resp.json()
    assert JWT not in raw
    assert "sig-abc123" not in raw
    assert literal not in raw
    assert body["state"] == "syncing"
    assert body["ready"] is True
    assert body["project_id"] == "p1"
    assert body["session_id"] == "s1"
    assert body["snapshot_id"] == "snap-7"
    assert body["last_seq"] == 41
    assert body["counts"] == {"applied": 4}
    assert body["conflicts"][0]["path"] == "a.txt"
    assert body["child"] == {"pid": 1234, "status": None}
    assert "https://x.supabase.co/storage/v1/object/sign/p/s.tar.zst" in body["last_error"]
    assert "redacted" in body["last_error"]


async def test_disabled_listener_yields_no_port(state: HealthState, metrics: Metrics) -> None:
    """With port None nothing listens and the handle says so."""
    async with serve(HttpSettings(port=None), state, metrics) as handle:
        assert handle.port is None
        assert handle.url is None


async def test_close_stops_listening(state: HealthState, metrics: Metrics) -> None:
    """After the context exits the port refuses connections; close() is idempotent."""
    async with serve(LOCAL, state, metrics) as handle:
        url = f"{handle.url}/healthz"
        await handle.close()
        await handle.close()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(url):
                pass


def test_ready_property_and_reasons() -> None:
    """ready is true exactly when reasons() is empty."""
    state = HealthState()
    observed = [(state.ready, state.reasons())]
    make_ready(state)
    observed.append((state.ready, state.reasons()))
    state.lag_seconds = state.max_lag  # the bound itself is still fresh
    observed.append((state.ready, state.reasons()))
    assert observed == [
        (False, ["not hydrated", "not subscribed"]),
        (True, []),
        (True, []),
    ]


async def test_keep_alive_head_unknown_paths_and_oversized_heads(server: HealthServer) -> None:
    """Two requests on one kept-alive connection, HEAD without a body, 404 and 405, and a
    request head over 16 KiB answered 431 and closed; close() ends idle connections."""
    assert server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nHEAD /status HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    first = await reader.readuntil(b"ok\n")
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: keep-alive" in first
    second = await reader.readuntil(b"\r\n\r\n")
    assert second.startswith(b"HTTP/1.1 200 OK\r\n")
    writer.write(b"GET /nope HTTP/1.1\r\n\r\nPOST /healthz HTTP/1.1\r\n\r\n")
    assert (await reader.readuntil(b"not found\n")).startswith(b"HTTP/1.1 404 ")
    allowed = await reader.readuntil(b"method not allowed\n")
    assert allowed.startswith(b"HTTP/1.1 405 ")
    assert b"Allow: GET, HEAD" in allowed
    await server.close()
    assert await reader.read() == b""  # closed by the server
    writer.close()


async def test_oversized_request_head_is_refused(server: HealthServer) -> None:
    assert server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    answer = await reader.read()
    assert answer.startswith(b"HTTP/1.1 431 ")
    writer.close()
