"""Shared fixtures: keep them small and generic (module-specific helpers live in the test file).

Markers by place: everything under tests/e2e is `e2e`, everything under tests/testing (the test
servers' own conformance) is `fake_server`; by need: a test that uses the session's PostgreSQL
cluster (`pg_cluster`, tests/pgfixtures.py) is `pg`. `SLOW` marks the unit tests that take a second or
more on these machines, so that `scripts/test --fast` stays an edit loop; the full suite
(`scripts/test`, CI) runs them all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.config import SnapshotSettings
from sidecar.testing.snapshot_server import SnapshotServer

TESTS = Path(__file__).resolve().parent
BY_DIRECTORY = {"e2e": pytest.mark.e2e, "testing": pytest.mark.fake_server}
# Test functions (all their parameters) over a second on a 2-core VM, and why.
SLOW = {
    "live/test_apply.py::test_any_delivery_order_converges_to_the_database": "hypothesis",
    "live/test_apply.py::test_content_url_failures_ask_for_resync": "waits out fetch timeouts",
    "live/test_engine.py::test_burst_of_thousands_is_applied_in_order_with_bounded_memory": "10k",
    "live/test_engine.py::test_random_histories_converge": "hypothesis",
    "live/test_subscription.py::test_fault_is_survived": "real backoffs, one per fault",
    "live/test_subscription.py::test_token_rotation_keeps_the_channel_past_exp": "token expiry",
    "live/test_subscription.py::test_expired_token_then_rotation_rebuilds": "token expiry",
    "live/test_subscription.py::test_refused_token_is_fatal": "the auth-failure window",
    "live/test_subscription.py::test_stall_is_caught_by_the_supervisor_ping": "ping timeout",
    "live/test_subscription.py::test_idle_channel_sends_at_most_one_ping_per_interval": "intervals",
    "live/test_tokens.py::test_idle_token_file_watch_wakes_rarely": "measures 3 s at rest",
    "live/test_subscription.py::test_message_over_1_mib_costs_one_reconnect_not_a_loop": "reconnect",
    "orch/test_token.py::test_minted_token_is_scoped_to_its_project": "subprocess per key type",
    "orch/test_token.py::test_refusals_are_one_line_config_errors": "a subprocess per refusal",
    "snapshot/test_build.py::test_cli_builds_with_created_at_or_source_date_epoch_are_byte_for_byte_equal": "CLI subprocesses",
    "snapshot/test_extract.py::test_round_trip_thousands_of_files_in_one_feed": "thousands of files",
    "snapshot/test_hydrate.py::test_cancellation_leaves_project_unchanged": "a trickled download",
    "snapshot/test_tarstream.py::test_agrees_with_tarfile": "hypothesis",
    "twoway/test_localsync.py::test_interleaved_edits_converge_without_losing_bytes": "hypothesis",
    "twoway/test_merge.py::test_merge_properties": "hypothesis, 300 examples",
    "twoway/test_watcher.py::test_echo_suppression_under_a_storm": "a storm of writes",
    "twoway/test_watcher.py::test_resync_of_thousands_of_files_reports_no_local_change": "8k files",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Apply the markers by directory, by need and the SLOW list (see the module docstring)."""
    for item in items:
        rel = item.path.relative_to(TESTS)
        marker = BY_DIRECTORY.get(rel.parts[0])
        if marker is not None:
            item.add_marker(marker)
        if "pg_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.pg)
        if f"{rel.as_posix()}::{getattr(item, 'originalname', item.name)}" in SLOW:
            item.add_marker(pytest.mark.slow)


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
