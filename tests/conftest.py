"""Shared fixtures: keep them small and generic (module-specific helpers live in the test file)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sidecar.config import SnapshotSettings
from sidecar.testing.snapshot_server import SnapshotServer


@pytest.fixture
async def snapshot_server() -> AsyncIterator[SnapshotServer]:
    """A running SnapshotServer on 127.0.0.1 (port 0); register objects with `.add(...)`."""
    async with SnapshotServer() as server:
        yield server


@pytest.fixture
def fast_snapshot_settings() -> SnapshotSettings:
    """Snapshot download settings with near-zero backoff and short timeouts, for fault tests."""
    return SnapshotSettings(
        retries=5, backoff_initial=0.001, backoff_max=0.01, connect_timeout=2.0, read_timeout=2.0
    )


@pytest.fixture(autouse=True)
def _reset_structlog() -> object:
    """Each test starts and ends with structlog's defaults (a test may configure logging)."""
    import structlog

    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
